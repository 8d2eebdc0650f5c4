from __future__ import annotations

import json

import pytest

from pipeline.core.config import SplitConfig
from pipeline.core.files import piece_id, read_json
from pipeline.core.graph import run_stage
from pipeline.data.split import assign_pieces, split_items, style_items

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


def _manifest(cfg, styles: dict[str, str]) -> None:
    rows = "".join(json.dumps({"id": piece, "style": style}) + "\n" for piece, style in styles.items())
    (cfg.stage_dir("acquire")).mkdir(parents=True, exist_ok=True)
    (cfg.stage_dir("acquire") / "manifest.jsonl").write_text(rows)


def test_run_split_writes_base_and_every_style(make_cfg):
    styles = {"jazz": {"sources": ["x"]}, "folk": {"sources": ["y"]}}
    cfg = make_cfg(split={"seed": 3}, styles=styles)
    clean = cfg.stage_dir("clean")
    for corpus, n in (("style", 12), ("base", 30)):
        (clean / corpus).mkdir(parents=True)
        for item in items(n, segments=2 if corpus == "style" else 1):
            (clean / corpus / f"{item}.mid").write_bytes(b"")
    # pieces 0-7 are jazz, 8-10 folk, 11 came from a style no longer configured
    _manifest(cfg, {f"piece-{p:03d}": "jazz" if p < 8 else "folk" if p < 11 else "gone" for p in range(12)})
    report = run_stage("split", cfg)
    split = read_json(cfg.stage_dir("split") / "split.json")
    assert set(split) == {"styles", "base"} and set(split["styles"]) == {"jazz", "folk"}
    assert sum(len(v) for v in split["styles"]["jazz"].values()) == 16
    assert all(split["styles"]["folk"][s] for s in ("train", "valid", "test"))  # each style holds pieces out
    assert style_items(split, "train") == sorted(split["styles"]["jazz"]["train"] + split["styles"]["folk"]["train"])
    assert sorted(report.dropped) == ["piece-011__s00", "piece-011__s01"]
    assert report.stats["base"]["test"]["pieces"] >= 1 and report.stats["jazz"]["valid"]["items"] >= 2
    again = run_stage("split", cfg)
    assert again.cached == ["split.json"] and not again.processed


def test_run_split_without_clean_items_fails_clearly(make_cfg):
    with pytest.raises(FileNotFoundError, match="clean"):
        run_stage("split", make_cfg())
