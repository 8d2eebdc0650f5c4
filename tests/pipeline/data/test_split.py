from __future__ import annotations

import pytest

from pipeline.core.config import SplitConfig
from pipeline.core.files import piece_id, read_json
from pipeline.core.graph import run_stage
from pipeline.data.split import assign_pieces, split_items

CFG = SplitConfig(valid_fraction=0.1, test_fraction=0.15, seed=7)


def items(n_pieces: int, segments: int = 3) -> list[str]:
    return [f"piece-{p:03d}__s{s:02d}" for p in range(n_pieces) for s in range(segments)]


def test_pieces_never_straddle_splits():
    split = split_items(items(40), CFG)
    pieces = {name: {piece_id(i) for i in ids} for name, ids in split.items()}
    assert not pieces["train"] & pieces["valid"] and not pieces["train"] & pieces["test"]
    assert not pieces["valid"] & pieces["test"]
    assert sum(len(v) for v in split.values()) == 120
    assert all(len(v) % 3 == 0 for v in split.values())  # whole pieces only


def test_deterministic_and_seeded():
    assert split_items(items(40), CFG) == split_items(list(reversed(items(40))), CFG)
    other = split_items(items(40), CFG.model_copy(update={"seed": 8}))
    assert other != split_items(items(40), CFG)


def test_adding_a_piece_moves_no_other_piece():
    pieces = [f"piece-{i:03d}" for i in range(60)]
    before = assign_pieces(pieces, CFG)
    after = assign_pieces([*pieces, "piece-new"], CFG)
    assert {p: after[p] for p in pieces} == before


@pytest.mark.parametrize("n", [3, 4, 5])
def test_small_corpora_hold_out_one_piece_each(n):
    assignment = assign_pieces([f"p{i}" for i in range(n)], CFG)
    assert {"train", "valid", "test"} == set(assignment.values())


def test_two_pieces_all_train():
    assert set(assign_pieces(["a", "b"], CFG).values()) == {"train"}


def test_run_split_writes_both_corpora(make_cfg):
    cfg = make_cfg(split={"seed": 3})
    clean = cfg.stage_dir("clean")
    for corpus, n in (("style", 12), ("base", 30)):
        (clean / corpus).mkdir(parents=True)
        for item in items(n, segments=2 if corpus == "style" else 1):
            (clean / corpus / f"{item}.mid").write_bytes(b"")
    report = run_stage("split", cfg)
    split = read_json(cfg.stage_dir("split") / "split.json")
    assert set(split) == {"style", "base"} and set(split["style"]) == {"train", "valid", "test"}
    assert sum(len(v) for v in split["style"].values()) == 24
    assert report.stats["base"]["test"]["pieces"] >= 1 and report.stats["style"]["valid"]["items"] >= 2
    again = run_stage("split", cfg)
    assert again.cached == ["split.json"] and not again.processed


def test_run_split_without_clean_items_fails_clearly(make_cfg):
    with pytest.raises(FileNotFoundError, match="clean"):
        run_stage("split", make_cfg())
