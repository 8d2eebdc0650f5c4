from __future__ import annotations

import pytest

from pipeline.core.files import atomic_path, piece_id, read_json, slug, write_json
from pipeline.core.items import AllItemsFailed, ItemIndex, StageReport, raise_if_all_failed


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_whole(tmp_path):
    dest = tmp_path / "a" / "x.json"
    write_json(dest, {"a": 1})
    write_json(dest, {"a": 2})
    assert read_json(dest) == {"a": 2}
    assert [p.name for p in dest.parent.iterdir()] == ["x.json"]


def test_index_fresh_needs_same_key_and_outputs(tmp_path):
    index = ItemIndex(tmp_path / "index.json")
    (tmp_path / "o.mid").write_bytes(b"x")
    index.record("a", "k1", outputs=["o.mid"])
    reloaded = ItemIndex(tmp_path / "index.json")
    assert reloaded.fresh("a", "k1", tmp_path)
    assert not reloaded.fresh("a", "k2", tmp_path)
    (tmp_path / "o.mid").unlink()
    assert not reloaded.fresh("a", "k1", tmp_path)


def test_index_prune_removes_outputs(tmp_path):
    index = ItemIndex(tmp_path / "index.json")
    for name in ("a", "b"):
        (tmp_path / f"{name}.mid").write_bytes(b"x")
        index.record(name, "k", outputs=[f"{name}.mid"])
    assert index.prune({"a"}, tmp_path) == ["b"]
    assert not (tmp_path / "b.mid").exists() and (tmp_path / "a.mid").exists()


def test_all_failed_raises_with_first_reason():
    report = StageReport("transcribe", items_in=2, failed={"x": "corrupt audio", "y": "silent"})
    with pytest.raises(AllItemsFailed, match="corrupt audio"):
        raise_if_all_failed(report)
    raise_if_all_failed(StageReport("transcribe", items_in=2, failed={"x": "bad"}))


def test_report_written(tmp_path):
    report = StageReport("clean", items_in=1, processed=["a"], outputs=1).finish(tmp_path, '{"k": 1}')
    assert read_json(tmp_path / "report.json")["processed"] == ["a"]
    assert read_json(tmp_path / "config.json") == {"k": 1}
    assert "1 processed" in report.summary()


def test_ids():
    assert slug("Maple Leaf Rag (1899)!") == "maple-leaf-rag-1899"
    assert piece_id("abc__s02__ap+2_v-8") == "abc"
    assert piece_id("abc__ap+2") == "abc"


def test_index_journal_survives_without_save(tmp_path):
    index = ItemIndex(tmp_path / "index.json")
    index.record("a", "k1")
    index.record("b", "k2")
    index.record("a", "k3")
    # no save(): a crashed process; the journal alone carries the entries
    with open(tmp_path / "index.json.log", "a") as f:
        f.write('["c", {"key": "trunc')  # a line cut short
    reloaded = ItemIndex(tmp_path / "index.json")
    assert {k: v["key"] for k, v in reloaded.entries.items()} == {"a": "k3", "b": "k2"}
    assert not (tmp_path / "index.json.log").exists()  # compacted into the snapshot
    assert read_json(tmp_path / "index.json")["a"]["key"] == "k3"


def test_atomic_outputs_are_world_readable(tmp_path):
    write_json(tmp_path / "x.json", {})
    assert (tmp_path / "x.json").stat().st_mode & 0o044 == 0o044
