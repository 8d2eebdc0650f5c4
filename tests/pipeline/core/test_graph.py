"""The stage graph is the one place that names the stages; the flow, the CLI and dvc.yaml follow it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import graph
from pipeline.core.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[3]


def test_dvc_yaml_is_generated_from_the_graph():
    assert (REPO / "dvc.yaml").read_text() == graph.dvc_yaml(), "dvc.yaml is stale: run `jam dvc-yaml`"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [s.name for s in graph.STAGES if s.dvc]
    for name, spec in stages.items():
        node = graph.stage(name)
        assert spec["cmd"] == f"jam stage {name}"
        assert str(graph._module_file(node.module).relative_to(REPO)) in spec["deps"]  # module or package
        # shared modules every stage runs are deps too: a changed default in config.py makes `dvc status` dirty
        assert {"pipeline/core/config.py", "pipeline/core/items.py"} <= set(spec["deps"])
        assert [d for d in spec["deps"] if d.startswith("data/")] == [
            f"data/{u}" for u in (*node.after, *node.inputs) if graph.stage(u).dvc
        ]


def test_code_deps_follow_lazy_imports_and_modules_imported_by_name():
    deps = graph.code_deps("pipeline.data.demo")
    assert "pipeline/data/base.py" in deps  # demo lists music21 pieces through the base stage's helpers
    assert all((REPO / d).is_file() for d in deps)


def test_graph_is_ordered_and_names_real_functions_and_params():
    seen: set[str] = set()
    sections = set(Config.model_fields)
    for node in graph.STAGES:
        assert set(node.inputs) | set(node.after) <= seen, f"{node.name} runs before what it reads"
        seen.add(node.name)
        assert {p.split(".")[0] for p in node.params} <= sections
        params = list(inspect.signature(node.function()).parameters)
        assert params[:3] == ["cfg", "inputs", "out_dir"], f"{node.func} must take (cfg, inputs, out_dir)"


def test_io_maps_inputs_to_upstream_folders(tmp_path):
    cfg = config_from_dict({"project": {"data_dir": str(tmp_path)}})
    inputs, out_dir = graph.io(cfg, "tokenize")
    assert inputs == {"clean": tmp_path / "clean", "split": tmp_path / "split", "augment": tmp_path / "augment"}
    assert out_dir == tmp_path / "tokenize"
    assert [s.name for s in graph.until("clean")] == list(graph.NAMES[: graph.NAMES.index("clean") + 1])
    with pytest.raises(graph.UnknownStage, match="one of: demo, base"):
        graph.stage("nope")


def test_cli_stage_names_come_from_the_graph(tmp_path):
    runner = CliRunner()
    for args in (["stage", "nope"], ["run", "--until", "nope"]):
        result = runner.invoke(app, [*args, "-p", str(tmp_path / "missing.yaml")])
        assert result.exit_code == 1 and ", ".join(graph.NAMES) in result.output
    check = runner.invoke(app, ["dvc-yaml", "--check", "--path", str(REPO / "dvc.yaml")])
    assert check.exit_code == 0, check.output
