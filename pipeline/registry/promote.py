"""Promotion: pick the best evaluated fine-tune, gate it, register its bundle, move the `champion` alias.

`select_best` and `gate_reasons` are pure (they take `RunSummary` rows) so the policy is unit-tested without a
store. The registry holds the run's `bundle` artifact folder itself as the version's source, so
`models:/<project.name>@champion` downloads to a folder with bundle.json: base + adapter, no hub involved.
The champion being replaced keeps the alias `previous`; `rollback` swaps the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.core.config import Config, PromoteConfig
from pipeline.registry.client import mlflow_client
from pipeline.registry.runs import RunSummary, list_runs
from realtime.bundle_format import BUNDLE_ARTIFACT, BUNDLE_FILE

CHAMPION = "champion"
PREVIOUS = "previous"


@dataclass
class PromoteResult:
    """What `run_promote` or `rollback` did.

    action: "promoted", "unchanged" (best is already champion), "blocked" (gates failed), "none" (no candidate),
    "rolled_back", or "refused" (rollback impossible).
    """

    action: Literal["promoted", "unchanged", "blocked", "none", "rolled_back", "refused"]
    message: str
    run_id: str | None = None
    version: str | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.action in ("promoted", "rolled_back")


def select_best(runs: list[RunSummary], metric: str, mode: Literal["min", "max"] = "min") -> RunSummary | None:
    """The run with the best finite value of `metric`; ties go to the newest run. None if no run has it.

    Args:
        runs: candidate runs.
        metric: metric name, e.g. "test_nll".
        mode: "min" (lower is better) or "max".
    """
    scored = [r for r in runs if metric in r.metrics and math.isfinite(r.metrics[metric])]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda r: (sign * r.metrics[metric], -r.start_time))


def gate_reasons(run: RunSummary, pc: PromoteConfig, max_forgetting: float | None = None) -> list[str]:
    """Why `run` may not be promoted, one line per failed gate; an empty list means it passes.

    Gates: it beats its base by `min_gain` (the upper end of nll_ratio's 95 % CI, or nll_ratio itself when no CI
    is logged, below 1 - min_gain), reaches `min_validity`, and, when `max_forgetting` is given (evaluate's) and
    `base_corpus_nll_change` is logged, its base corpus NLL rose by at most that share (skipped when not logged:
    evaluations without a base corpus test split).
    """
    reasons = []
    high = run.metrics.get("nll_ratio_ci_high")  # the CI's pessimistic end; the point value when none is logged
    ratio, what = (high, "nll_ratio_ci_high") if high is not None else (run.metrics.get("nll_ratio"), "nll_ratio")
    validity = run.metrics.get("validity_rate")
    limit = 1.0 - pc.min_gain
    if ratio is None:
        reasons.append("base gate: no nll_ratio logged (run `jam evaluate`)")
    elif not ratio < limit:
        reasons.append(f"base gate: {what} {ratio:.4f} >= {limit:.4f} (must beat its base by {pc.min_gain:.0%})")
    if validity is None:
        reasons.append("validity gate: no validity_rate logged (run `jam evaluate`)")
    elif not validity >= pc.min_validity:
        reasons.append(f"validity gate: validity_rate {validity:.3f} < {pc.min_validity:.3f}")
    change = run.metrics.get("base_corpus_nll_change")
    if max_forgetting is not None and change is not None and not change <= max_forgetting:
        reasons.append(
            f"forgetting gate: base_corpus_nll_change {change:+.1%} > {max_forgetting:+.1%} (evaluate.max_forgetting)"
        )
    return reasons


def _alias_version(client, name: str, alias: str):
    """The model version holding `alias`, or None (no registered model or alias unset)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER_VALUE
        return None


def _has_bundle(client, run: RunSummary) -> bool:
    try:
        return any(Path(f.path).name == BUNDLE_FILE for f in client.list_artifacts(run.run_id, BUNDLE_ARTIFACT))
    except Exception:  # unreadable artifact store counts as missing
        return False


def _register(client, name: str, run: RunSummary, pc: PromoteConfig):
    """The model version for `run`'s bundle: reused if the run was registered before, else created."""
    existing = client.search_model_versions(f"name='{name}' and run_id='{run.run_id}'")
    if existing:
        return max(existing, key=lambda mv: int(mv.version))
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        client.create_registered_model(name, description="Jam partner bundles (base + style adapter).")
    keys = (pc.metric, "nll_ratio", "validity_rate", "style_score")
    tags = {k: str(run.metrics[k]) for k in keys if k in run.metrics}
    return client.create_model_version(
        name,
        source=f"{run.artifact_uri}/{BUNDLE_ARTIFACT}",
        run_id=run.run_id,
        tags=tags,
        description=f"bundle of run {run.run_id} ({pc.metric}={run.metrics.get(pc.metric)})",
    )


def run_promote(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> PromoteResult:
    """Register the best gated fine-tune of the experiment and point `champion` at it.

    Nothing changes when no run is evaluated, the best one fails a gate (reasons listed), or it is champion already.

    Raises:
        RunsError: no MLflow store or experiment.
    """
    pc, name = cfg.promote, cfg.project.name
    client = mlflow_client(cfg)
    best = select_best(list_runs(cfg, role="finetune", client=client), pc.metric, pc.mode)
    if best is None:
        return PromoteResult("none", f"no finished fine-tune run has metric {pc.metric!r}: run `jam evaluate` first")
    value = f"{pc.metric}={best.metrics[pc.metric]:.4f}"
    current = _alias_version(client, name, CHAMPION)
    if current is not None and current.run_id == best.run_id:
        return PromoteResult(
            "unchanged",
            f"best run {best.short_id} ({value}) is already {CHAMPION} (version {current.version})",
            best.run_id,
            str(current.version),
        )
    reasons = gate_reasons(best, pc, cfg.evaluate.max_forgetting)
    if not _has_bundle(client, best):
        reasons.append(f"bundle gate: run has no '{BUNDLE_ARTIFACT}/{BUNDLE_FILE}' artifact")
    if reasons:
        return PromoteResult("blocked", f"best run {best.short_id} ({value}) not promoted", best.run_id, None, reasons)
    mv = _register(client, name, best, pc)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, mv.version)
    was = f"; version {current.version} is now {PREVIOUS}" if current is not None else ""
    return PromoteResult(
        "promoted",
        f"run {best.short_id} ({value}) is {CHAMPION} as {name} version {mv.version}{was}",
        best.run_id,
        str(mv.version),
    )


def rollback(cfg: Config) -> PromoteResult:
    """Swap `champion` and `previous`; refuses (changing nothing) when either is missing."""
    name = cfg.project.name
    client = mlflow_client(cfg)
    champ, prev = _alias_version(client, name, CHAMPION), _alias_version(client, name, PREVIOUS)
    if champ is None:
        return PromoteResult("refused", f"registered model {name!r} has no {CHAMPION}: nothing to roll back")
    if prev is None:
        msg = f"{name!r} has no {PREVIOUS} version to roll back to ({CHAMPION} stays version {champ.version})"
        return PromoteResult("refused", msg, champ.run_id, str(champ.version))
    client.set_registered_model_alias(name, CHAMPION, prev.version)
    client.set_registered_model_alias(name, PREVIOUS, champ.version)
    return PromoteResult(
        "rolled_back",
        f"{CHAMPION} is version {prev.version} again (run {prev.run_id[:8]}); version {champ.version} is {PREVIOUS}",
        prev.run_id,
        str(prev.version),
    )
