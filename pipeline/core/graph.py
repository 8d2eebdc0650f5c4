"""The stage graph: the one place that names the stages, what each reads, writes and is configured by.

Wiring as data (Kedro's `pipeline.py`): the Prefect flow, `jam stage`, `jam run --until`, the CLI's stage list and
dvc.yaml (`jam dvc-yaml`) all derive from `STAGES`. A stage function never looks for its upstream folders; it is
called as `fn(cfg, inputs, out_dir)` where `inputs` maps each upstream stage name to that stage's output folder.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config import Config

Kind = Literal["data", "train", "model"]
FIRST_PARTY = ("pipeline", "realtime")  # packages whose modules count as a stage's code dependencies
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stage:
    """One node of the graph.

    Attributes:
        name: the stage's name; its outputs live in `<project.data_dir>/<name>/`.
        func: "module:function" of the stage function, imported lazily (stages pull in heavy libraries).
        inputs: upstream stages whose output folders the function reads (passed to it as `inputs`).
        params: params.yaml sections (or dotted keys) that shape the outputs.
        kind: data (in-process, item-wise), train (a child process, retried after preemption) or model (MLflow).
        after: stages that must run first without being read (acquire reads the demo's audio through its sources).
        enabled_by: a boolean params key that switches the stage off (`demo.enabled`); None = always on.
        dvc: whether dvc.yaml tracks it (evaluate and promote write to MLflow, not to files DVC versions).
    """

    name: str
    func: str
    inputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    kind: Kind = "data"
    after: tuple[str, ...] = ()
    enabled_by: str | None = None
    dvc: bool = True

    @property
    def module(self) -> str:
        return self.func.split(":")[0]

    def function(self) -> Callable[..., Any]:
        module, func = self.func.split(":")
        return getattr(importlib.import_module(module), func)

    def enabled(self, cfg: Config) -> bool:
        if self.enabled_by is None:
            return True
        section, key = self.enabled_by.split(".")
        return bool(getattr(getattr(cfg, section), key))


STAGES: tuple[Stage, ...] = (
    Stage("demo", "pipeline.data.demo:run_demo", params=("demo",), enabled_by="demo.enabled"),
    Stage("base", "pipeline.data.base:run_base", params=("base",)),
    Stage("acquire", "pipeline.data.acquire:run_acquire", params=("acquire", "styles"), after=("demo",)),
    Stage("transcribe", "pipeline.data.transcribe:run_transcribe", ("acquire",), ("transcribe",)),
    Stage("clean", "pipeline.data.clean:run_clean", ("transcribe", "base"), ("clean",)),
    Stage("split", "pipeline.data.split:run_split", ("clean", "acquire"), ("split", "styles")),
    Stage("augment", "pipeline.data.augment:run_augment", ("clean", "split"), ("augment",)),
    Stage("tokenize", "pipeline.data.tokenize:run_tokenize", ("clean", "split", "augment"), ("tokenize",)),
    Stage(
        "pretrain",
        "pipeline.train.pretrain:run_pretrain",
        ("tokenize",),
        ("model", "pretrain", "project.seed"),
        kind="train",
    ),
    Stage(
        "finetune",
        "pipeline.train.finetune:run_finetune",
        ("tokenize", "pretrain"),
        ("finetune", "styles", "project.seed"),
        kind="train",
    ),
    Stage(
        "evaluate",
        "pipeline.evaluate.stage:run_evaluate",
        ("tokenize", "clean", "split"),
        ("evaluate", "styles"),
        kind="model",
        after=("finetune",),
        dvc=False,
    ),
    Stage(
        "promote",
        "pipeline.registry.promote:run_promote",
        params=("promote", "evaluate"),  # evaluate.max_forgetting: the forgetting gate
        kind="model",
        after=("evaluate",),
        dvc=False,
    ),
)
BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)


class UnknownStage(ValueError):
    """A stage name the graph does not have."""


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise UnknownStage(f"unknown stage {name!r}; one of: {', '.join(NAMES)}")
    return BY_NAME[name]


def names(kind: Kind | None = None) -> tuple[str, ...]:
    return tuple(s.name for s in STAGES if kind is None or s.kind == kind)


def until(last: str | None) -> tuple[Stage, ...]:
    """The stages up to and including `last` (all when None), in run order."""
    if last is None:
        return STAGES
    return STAGES[: NAMES.index(stage(last).name) + 1]


def io(cfg: Config, name: str) -> tuple[dict[str, Path], Path]:
    """(inputs, out_dir) of a stage under `cfg.project.data_dir`."""
    node = stage(name)
    return {up: cfg.stage_dir(up) for up in node.inputs}, cfg.stage_dir(node.name)


def run_stage(name: str, cfg: Config, **kwargs: Any) -> Any:
    """Call a stage function with its inputs and output folder from the graph (in this process)."""
    inputs, out_dir = io(cfg, name)
    return stage(name).function()(cfg, inputs, out_dir, **kwargs)


# --- dvc.yaml -------------------------------------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    """First-party modules `path` imports anywhere (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in FIRST_PARTY and _module_file(m) is not None}


def code_deps(module: str) -> list[str]:
    """Every first-party source file a stage module runs, transitively, relative to the repo root (sorted)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(_imported(_module_file(current)) - seen)
    files = {_module_file(m) for m in seen}
    return sorted(str(f.relative_to(REPO_ROOT)) for f in files if f is not None and f.stat().st_size > 0)


def dvc_stages(data_dir: str = "data") -> dict[str, Any]:
    """The `stages:` mapping of dvc.yaml. Outputs persist: each stage manages its own folder incrementally."""
    out: dict[str, Any] = {}
    tracked = {s.name for s in STAGES if s.dvc}
    for node in STAGES:
        if not node.dvc:
            continue
        upstream = [f"{data_dir}/{u}" for u in (*node.after, *node.inputs) if u in tracked]
        out[node.name] = {
            "cmd": f"jam stage {node.name}",
            "deps": [*code_deps(node.module), *upstream],
            "params": list(node.params),
            "outs": [{f"{data_dir}/{node.name}": {"persist": True}}],
        }
    return out


DVC_HEADER = """\
# Generated from the stage graph (pipeline/core/graph.py) by `jam dvc-yaml`; edit the graph, not this file.
# The same stages `jam run` runs, for `dvc repro`. Outputs persist: every stage is incremental per item and
# manages its own folder, so DVC must not wipe it before a run. `jam run` ends with `dvc commit`, so after it
# `dvc status` reports nothing changed. Deps are every module a stage runs, found by following its imports.
# evaluate and promote are not here: they read and write the MLflow store, which DVC does not version.
"""


def dvc_yaml(data_dir: str = "data") -> str:
    import yaml

    return DVC_HEADER + yaml.safe_dump({"stages": dvc_stages(data_dir)}, sort_keys=False, width=120)
