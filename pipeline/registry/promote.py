"""Promotion: per style the best evaluated fine-tune, every one gated, released together as the `champion`.

The champion is one bundle holding every style's adapter on their shared base (not one registered model per style):
`jam play -a NAME` picks a style and `-a a=2 -a b=1` blends them, which needs the adapters side by side on one base,
and a release either has every configured style or is not made. The bundle is assembled from the chosen runs'
bundles, logged to a `release` run (tags name the fine-tune run of each style), and that run's `bundle` artifact
is the model version's source, so `models:/<project.name>@champion` downloads to a folder with bundle.json.
`select_best`, `gate_reasons` and `select_release` are pure (they take `RunSummary` rows) so the policy is
unit-tested without a store. The champion being replaced keeps the alias `previous`; `rollback` swaps the two.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.core.config import Config, PromoteConfig
from pipeline.registry.client import RunsError, experiment_id, mlflow_client
from pipeline.registry.runs import RunSummary, download_bundle, list_runs
from pipeline.registry.tracking import BASE_PATH_TAG, BASE_RUN_TAG, ROLE_TAG, STYLE_TAG
from realtime.bundle_format import BUNDLE_ARTIFACT, BUNDLE_FILE, BundleError, combine_bundles

CHAMPION = "champion"
PREVIOUS = "previous"
RELEASE_ROLE = "release"
SOURCES_TAG = "jam.sources"  # on a release run and its model version: JSON {style: fine-tune run id}
RELEASE_METRICS = ("test_nll", "nll_ratio", "validity_rate", "style_score", "style_attribution")


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


def _base_of(run: RunSummary) -> str:
    return run.tags.get(BASE_RUN_TAG) or run.tags.get(BASE_PATH_TAG) or ""


@dataclass
class Release:
    """The fine-tune run chosen for each style (all on one base), or why none could be chosen."""

    runs: dict[str, RunSummary]
    reasons: list[str] = field(default_factory=list)

    @property
    def sources(self) -> dict[str, str]:
        return {style: run.run_id for style, run in self.runs.items()}


def select_release(
    runs: list[RunSummary], styles: list[str], pc: PromoteConfig, max_forgetting: float | None = None
) -> Release | None:
    """Per style its best run by `pc.metric`, all on one base; the base whose picks are best on average wins.

    A base qualifies when every style has a run on it and each style's best passes `gate_reasons`. When none
    qualifies, the base of the newest run is reported with every reason (per style). None: no run has the metric.
    """
    by_base: dict[str, list[RunSummary]] = {}
    for run in runs:
        if run.tags.get(STYLE_TAG) in styles:
            by_base.setdefault(_base_of(run), []).append(run)
    sign = 1.0 if pc.mode == "min" else -1.0
    candidates, newest = [], None
    for base, group in by_base.items():
        picks = {s: select_best([r for r in group if r.tags.get(STYLE_TAG) == s], pc.metric, pc.mode) for s in styles}
        reasons = [f"{s}: no evaluated fine-tune run on this base" for s, r in picks.items() if r is None]
        for s, r in picks.items():
            reasons += [f"{s} ({r.short_id}): {why}" for why in gate_reasons(r, pc, max_forgetting)] if r else []
        release = Release({s: r for s, r in picks.items() if r is not None}, reasons)
        if not release.runs:
            continue
        start = max(r.start_time for r in release.runs.values())
        if newest is None or start > newest[0]:
            newest = (start, release)
        if not reasons:
            mean = sum(r.metrics[pc.metric] for r in release.runs.values()) / len(styles)
            candidates.append((sign * mean, -start, base, release))
    if candidates:
        return min(candidates, key=lambda c: c[:3])[3]
    return newest[1] if newest else None


def _release_run(client, cfg: Config, release: Release, bundle: Path) -> tuple[str, str]:
    """A finished `release` run holding the combined bundle, tagged with its sources and their key metrics.

    Returns:
        (its artifact URI, its run id).
    """
    from mlflow.entities import Metric

    tags = {ROLE_TAG: RELEASE_ROLE, SOURCES_TAG: json.dumps(release.sources, sort_keys=True),
            "mlflow.runName": "release-" + "-".join(f"{s}.{r.short_id}" for s, r in release.runs.items())}  # fmt: skip
    tags.update({f"{STYLE_TAG}.{s}": r.run_id for s, r in release.runs.items()})
    run_id = client.create_run(experiment_id(client, cfg), tags=tags).info.run_id
    metrics = [
        Metric(f"{style}/{k}", float(run.metrics[k]), 0, 0)
        for style, run in release.runs.items()
        for k in RELEASE_METRICS
        if k in run.metrics
    ]
    client.log_batch(run_id, metrics=metrics)
    client.log_artifacts(run_id, str(bundle), BUNDLE_ARTIFACT)
    client.set_terminated(run_id)
    return client.get_run(run_id).info.artifact_uri, run_id


def _register(client, cfg: Config, release: Release):
    """The model version of this exact combination of runs: reused if it was released before, else created."""
    name, sources = cfg.project.name, json.dumps(release.sources, sort_keys=True)
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(SOURCES_TAG) == sources:
            return mv
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        client.create_registered_model(name, description="Jam partner bundles (base + one adapter per style).")
    with tempfile.TemporaryDirectory(prefix="jam-release-") as tmp:
        bundles = {s: download_bundle(cfg, r.run_id, Path(tmp) / "runs") for s, r in release.runs.items()}
        combined = Path(tmp) / "bundle"
        combine_bundles(combined, bundles, release_sources=release.sources)
        artifact_uri, run_id = _release_run(client, cfg, release, combined)
    tags = {SOURCES_TAG: sources}
    tags.update({f"{s}/{k}": str(r.metrics[k]) for s, r in release.runs.items() for k in RELEASE_METRICS
                 if k in r.metrics})  # fmt: skip
    return client.create_model_version(
        name, source=f"{artifact_uri}/{BUNDLE_ARTIFACT}", run_id=run_id, tags=tags,
        description="release of " + ", ".join(f"{s} (run {r.short_id})" for s, r in release.runs.items()),
    )  # fmt: skip


def _describe(release: Release, metric: str) -> str:
    runs = release.runs.items()
    return ", ".join(f"{s} {r.short_id} ({metric}={r.metrics.get(metric, float('nan')):.4f})" for s, r in runs)


def run_promote(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> PromoteResult:
    """Release the best gated fine-tune of every style together and point `champion` at it.

    Nothing changes when no run is evaluated, a style has no run passing the gates (reasons listed), or the best
    combination is champion already.

    Raises:
        RunsError: no MLflow store or experiment.
    """
    pc, name = cfg.promote, cfg.project.name
    client = mlflow_client(cfg)
    runs = list_runs(cfg, role="finetune", client=client)
    release = select_release(runs, list(cfg.styles), pc, cfg.evaluate.max_forgetting)
    if release is None:
        return PromoteResult("none", f"no finished fine-tune run of {list(cfg.styles)} has metric {pc.metric!r}: "
                                     "run `jam evaluate` first")  # fmt: skip
    what = _describe(release, pc.metric)
    current = _alias_version(client, name, CHAMPION)
    same = current is not None and current.tags.get(SOURCES_TAG) == json.dumps(release.sources, sort_keys=True)
    if same and not release.reasons:
        return PromoteResult("unchanged", f"best release {what} is already {CHAMPION} (version {current.version})",
                             current.run_id, str(current.version))  # fmt: skip
    reasons = list(release.reasons)
    reasons += [f"{s} ({r.short_id}): bundle gate: run has no '{BUNDLE_ARTIFACT}/{BUNDLE_FILE}' artifact"
                for s, r in release.runs.items() if not _has_bundle(client, r)]  # fmt: skip
    if reasons:
        return PromoteResult("blocked", f"best release {what} not promoted", None, None, reasons)
    try:
        mv = _register(client, cfg, release)
    except (BundleError, RunsError) as err:
        return PromoteResult("blocked", f"best release {what} not promoted", None, None, [f"bundle gate: {err}"])
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, mv.version)
    was = f"; version {current.version} is now {PREVIOUS}" if current is not None else ""
    return PromoteResult("promoted", f"{what} are {CHAMPION} as {name} version {mv.version}{was}", mv.run_id,
                         str(mv.version))  # fmt: skip


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
