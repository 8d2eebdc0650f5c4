"""Promotion policy (pure) and registry moves on a temporary sqlite MLflow store."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.core.config import Config, config_from_dict
from pipeline.core.graph import run_stage
from pipeline.registry.client import RunsError, mlflow_client
from pipeline.registry.promote import gate_reasons, rollback, select_best, select_release
from pipeline.registry.runs import RunSummary
from realtime.bundle import BundleError, resolve_bundle

GOOD = {"nll_ratio": 0.9, "validity_rate": 1.0}


@functools.cache
def _template_db() -> Path:
    """An empty, migrated MLflow sqlite db made once per session (migrations take seconds); tests copy it."""
    import mlflow

    folder = tempfile.mkdtemp(prefix="mlflow-template-")
    atexit.register(shutil.rmtree, folder, True)
    db = Path(folder) / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def make_store(root: Path, name: str = "jam-test") -> Config:
    """A Config whose MLflow store is a fresh sqlite db under `root`, with experiment `name` created."""
    root.mkdir(parents=True, exist_ok=True)
    db = root / "mlflow.db"
    if not db.exists():
        shutil.copy(_template_db(), db)
    cfg = config_from_dict(
        {
            "project": {
                "name": name,
                "data_dir": str(root / "data"),
                "mlflow_uri": f"sqlite:///{db}",
                "artifact_dir": str(root / "artifacts"),
            },
            "promote": {"min_validity": 0.8},  # the GPU profile's gate (the demo default is 0.3)
        }
    )
    client = mlflow_client(cfg)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(root / "artifacts").resolve().as_uri())
    return cfg


def fake_run(
    cfg: Config,
    role: str,
    metrics: dict[str, float] | None = None,
    base_run_id: str | None = None,
    bundle: Path | bool | None = True,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log a finished run like training does: role tags, params, metrics, and a `bundle` artifact.

    `bundle=True` logs a stub bundle (bundle.json only); a Path logs that folder; False logs none.
    """
    client = mlflow_client(cfg)
    exp = client.get_experiment_by_name(cfg.project.name).experiment_id
    tags = {"jam.role": role, **({"jam.base_run_id": base_run_id} if base_run_id else {}), **(tags or {})}
    run_id = client.create_run(exp, tags=tags).info.run_id
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    if bundle is True:
        stub = Path(tempfile.mkdtemp()) / "bundle"
        stub.mkdir()
        (stub / "bundle.json").write_text(json.dumps({"format": 1, "source_run_id": run_id}))
        bundle = stub
    if bundle:
        client.log_artifacts(run_id, str(bundle), "bundle")
    client.set_terminated(run_id)
    return run_id


# ---------------------------------------------------------------- pure policy


def _summary(run_id: str, start: int, **metrics: float) -> RunSummary:
    return RunSummary(run_id=run_id, role="finetune", start_time=start, metrics=metrics)


def test_select_best_by_direction_and_ties():
    runs = [
        _summary("a", 1, test_nll=2.0, style_score=0.5),
        _summary("b", 2, test_nll=1.5, style_score=0.4),
        _summary("c", 3, style_score=0.9),
        _summary("d", 4, test_nll=1.5),
    ]
    assert select_best(runs, "test_nll", "min").run_id == "d"  # tie with b: the newer run wins
    assert select_best(runs, "style_score", "max").run_id == "c"
    assert select_best(runs, "valid_loss", "min") is None
    assert select_best([_summary("n", 1, test_nll=float("nan"))], "test_nll") is None


def test_gate_reasons_per_gate():
    pc = Config().promote.model_copy(update={"min_validity": 0.8})  # min_gain 0.02 (default), the GPU gate
    assert gate_reasons(_summary("a", 1, nll_ratio=0.9, validity_rate=0.9), pc) == []
    reasons = gate_reasons(_summary("b", 1, nll_ratio=0.99, validity_rate=0.5), pc)
    assert len(reasons) == 2
    assert reasons[0].startswith("base gate: nll_ratio 0.9900 >= 0.9800")
    assert reasons[1].startswith("validity gate: validity_rate 0.500 < 0.800")
    # the CI's pessimistic end decides when it is logged: a point value under the limit is not enough
    assert gate_reasons(_summary("e", 1, nll_ratio=0.9, nll_ratio_ci_high=0.97, validity_rate=0.9), pc) == []
    wide = gate_reasons(_summary("f", 1, nll_ratio=0.9, nll_ratio_ci_high=0.985, validity_rate=0.9), pc)
    assert wide and wide[0].startswith("base gate: nll_ratio_ci_high 0.9850 >= 0.9800")
    missing = gate_reasons(_summary("c", 1), pc)
    assert [r.split(":")[0] for r in missing] == ["base gate", "validity gate"]
    assert "jam evaluate" in missing[0]


def test_forgetting_gate_blocks_a_run_that_forgot_its_base_corpus():
    pc, limit = Config().promote, Config().evaluate.max_forgetting  # 0.40: the demo measured +23 % and +35 %
    ok = _summary("a", 1, **GOOD, base_corpus_nll_change=limit)
    assert gate_reasons(ok, pc, limit) == []
    forgot = _summary("b", 1, **GOOD, base_corpus_nll_change=limit + 0.01)
    (reason,) = gate_reasons(forgot, pc, limit)
    assert reason.startswith("forgetting gate: base_corpus_nll_change +41.0% > +40.0%")
    assert gate_reasons(forgot, pc) == []  # no margin given: no gate
    assert gate_reasons(_summary("c", 1, **GOOD), pc, limit) == []  # not logged (no base corpus test split): skipped


def test_select_release_needs_every_style_on_one_base_and_picks_the_best_base():
    pc = Config().promote

    def ft(run_id: str, style: str, base: str, start: int, nll: float, **metrics: float) -> RunSummary:
        tags = {"jam.style": style, "jam.base_run_id": base}
        return RunSummary(run_id, "finetune", start_time=start, metrics={"test_nll": nll, **GOOD, **metrics}, tags=tags)

    runs = [ft("a1", "a", "B1", 1, 2.0), ft("b1", "b", "B1", 2, 2.2), ft("a2", "a", "B2", 3, 1.0)]
    release = select_release(runs, ["a", "b"], pc)
    assert release.sources == {"a": "a1", "b": "b1"} and not release.reasons  # B2 has no run of b
    runs.append(ft("b2", "b", "B2", 4, 1.5))
    assert select_release(runs, ["a", "b"], pc).sources == {"a": "a2", "b": "b2"}  # B2 is better on average
    runs.append(ft("a3", "a", "B2", 5, 0.5, validity_rate=0.2))  # B2's best a fails a gate: B1 is released
    assert select_release(runs, ["a", "b"], pc).sources == {"a": "a1", "b": "b1"}
    blocked = select_release([ft("a9", "a", "B9", 9, 1.0, nll_ratio=1.2)], ["a", "b"], pc)
    assert blocked.sources == {"a": "a9"}
    assert blocked.reasons[0] == "b: no evaluated fine-tune run on this base"
    assert blocked.reasons[1].startswith("a (a9): base gate: nll_ratio 1.2000")
    assert select_release([], ["a"], pc) is None


# ---------------------------------------------------------------- registry

STYLES = ("low", "high")


@functools.cache
def _style_bundle(style: str) -> Path:
    """A one-style bundle (adapter named `style`) on the same tiny random base as every other style's."""
    from realtime.synthetic import make_random_bundle

    folder = Path(tempfile.mkdtemp(prefix=f"bundle-{style}-")) / "bundle"
    atexit.register(shutil.rmtree, folder.parent, True)
    make_random_bundle(folder, hidden=16, layers=1, heads=2, intermediate=32, bpe_vocab=None, max_seq_len=64,
                       adapters=(style,), seed=0)  # fmt: skip
    return folder


def styled_store(root: Path, name: str) -> Config:
    cfg = make_store(root, name)
    return cfg.model_copy(update={"styles": config_from_dict({"styles": {s: {"sources": [s]} for s in STYLES}}).styles})


def release(cfg: Config, base: str, bundle: bool = True, **nll: float) -> dict[str, str]:
    """One fine-tune run per style given (style=test_nll) on `base`, passing every gate. Returns style -> run id."""
    return {style: fake_run(cfg, "finetune", {"test_nll": value, **GOOD}, base,
                            _style_bundle(style) if bundle else False, tags={"jam.style": style})
            for style, value in nll.items()}  # fmt: skip


def _aliases(cfg: Config) -> dict[str, dict[str, str]]:
    """alias -> the fine-tune run of each style in the release it points at."""
    client = mlflow_client(cfg)
    out = {}
    for alias in ("champion", "previous"):
        with contextlib.suppress(Exception):  # alias unset
            mv = client.get_model_version_by_alias(cfg.project.name, alias)
            out[alias] = json.loads(mv.tags["jam.sources"])
    return out


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("promote_store")


def test_promote_rollback_lifecycle(store_root, tmp_path):
    cfg = styled_store(store_root, "jam-life")
    assert run_stage("promote", cfg).action == "none"  # nothing evaluated yet

    base = fake_run(cfg, "base", {"test_nll": 2.2})
    first = release(cfg, base, low=2.0, high=2.1)
    only_low = release(cfg, base, low=1.9)
    result = run_stage("promote", cfg)
    assert result.action == "promoted" and _aliases(cfg) == {"champion": {**first, **only_low}}
    champion = resolve_bundle(f"models:/{cfg.project.name}@champion", cfg.project.mlflow_uri, tmp_path)
    info = json.loads((champion / "bundle.json").read_text())
    assert info["adapters"] == {"low": "adapters/low", "high": "adapters/high"} and info["default_adapter"] == "low"
    assert info["release_sources"] == {**first, **only_low} and set(info["styles"]) == {"low", "high"}
    (release_run,) = mlflow_client(cfg).search_runs(
        [mlflow_client(cfg).get_experiment_by_name(cfg.project.name).experiment_id], "tags.`jam.role` = 'release'"
    )
    assert release_run.info.run_id == result.run_id and release_run.data.metrics["low/test_nll"] == 1.9

    assert run_stage("promote", cfg).action == "unchanged"

    better = release(cfg, base, high=1.5)
    assert run_stage("promote", cfg).action == "promoted"
    assert _aliases(cfg) == {"champion": {**only_low, **better}, "previous": {**first, **only_low}}

    assert rollback(cfg).action == "rolled_back"
    assert _aliases(cfg)["champion"] == {**first, **only_low}
    assert rollback(cfg).action == "rolled_back"

    # A better run failing both gates changes nothing and says why, per style and gate.
    fake_run(cfg, "finetune", {"test_nll": 1.0, "nll_ratio": 0.995, "validity_rate": 0.5}, base,
             _style_bundle("low"), tags={"jam.style": "low"})  # fmt: skip
    blocked = run_stage("promote", cfg)
    assert blocked.action == "blocked" and not blocked.changed
    assert [r.split(":")[1].strip() for r in blocked.reasons] == ["base gate", "validity gate"]
    assert blocked.reasons[0].startswith("low (")
    assert _aliases(cfg)["champion"] == {**only_low, **better}


def test_rereleasing_the_same_runs_reuses_their_version(store_root):
    cfg = styled_store(store_root, "jam-reuse")
    a = release(cfg, "B", low=1.0, high=1.0)
    first = run_stage("promote", cfg)
    b = release(cfg, "B", low=0.9)
    run_stage("promote", cfg)
    rollback(cfg)  # champion a again, previous a+b
    client = mlflow_client(cfg)
    client.log_metric(b["low"], "test_nll", 0.8)  # b is still the best: promoting it again reuses its version
    again = run_stage("promote", cfg)
    assert again.action == "promoted"
    assert len(client.search_model_versions(f"name='{cfg.project.name}'")) == 2
    assert _aliases(cfg) == {"champion": {**a, **b}, "previous": a} and first.version == "1"


def test_a_missing_style_or_bundle_blocks(store_root):
    cfg = styled_store(store_root, "jam-nobundle")
    release(cfg, "B", low=1.0)
    result = run_stage("promote", cfg)
    assert result.action == "blocked" and result.reasons == ["high: no evaluated fine-tune run on this base"]
    release(cfg, "B", bundle=False, high=1.0)
    result = run_stage("promote", cfg)
    assert result.action == "blocked" and len(result.reasons) == 1
    assert (
        result.reasons[0].startswith("high (")
        and "bundle gate: run has no 'bundle/bundle.json' artifact" in (result.reasons[0])
    )
    assert _aliases(cfg) == {}


def test_registry_without_champion(store_root, tmp_path):
    cfg = styled_store(store_root, "jam-empty")
    result = rollback(cfg)
    assert result.action == "refused" and "no champion" in result.message
    with pytest.raises(BundleError, match="not in the registry"):
        resolve_bundle(f"models:/{cfg.project.name}@champion", cfg.project.mlflow_uri, tmp_path)
    release(cfg, "B", low=1.0, high=1.0)
    assert run_stage("promote", cfg).action == "promoted"
    only = rollback(cfg)
    assert only.action == "refused" and "no previous" in only.message


def test_missing_store_or_experiment(tmp_path, store_root):
    cfg = config_from_dict({"project": {"mlflow_uri": f"sqlite:///{tmp_path}/nope/mlflow.db"}})
    with pytest.raises(RunsError, match="no MLflow store"):
        run_stage("promote", cfg)
    project = make_store(store_root, "jam-exists").project.model_dump(mode="json")
    ghost = config_from_dict({"project": {**project, "name": "ghost"}})
    with pytest.raises(RunsError, match="no MLflow experiment 'ghost'"):
        run_stage("promote", ghost)


def test_cli_promote_says_why_and_rollback_refusal_exits_1(store_root, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    cfg = styled_store(store_root, "jam-cli")
    for style in STYLES:
        fake_run(cfg, "finetune", {"test_nll": 1.0, "nll_ratio": 1.01, "validity_rate": 0.9}, "B",
                 tags={"jam.style": style})  # fmt: skip
    params = tmp_path / "params.yaml"
    styles = {s: {"sources": [s]} for s in STYLES}
    params.write_text(yaml.safe_dump({"project": cfg.project.model_dump(mode="json"), "styles": styles}))
    runner = CliRunner()
    blocked = runner.invoke(app, ["promote", "-p", str(params)])
    assert blocked.exit_code == 0 and "not promoted" in blocked.output and "base gate: nll_ratio" in blocked.output
    refused = runner.invoke(app, ["promote", "--rollback", "-p", str(params)])
    assert refused.exit_code == 1 and "no champion" in refused.output
    assert _aliases(cfg) == {}
