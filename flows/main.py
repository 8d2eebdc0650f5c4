"""The Prefect flow: wiring only. Every task calls a stage function from `pipeline/`.

Runs on Prefect's temporary local server by default; with `PREFECT_API_URL` set, on a real one, where runs,
retries and the summary artifact show in the UI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pipeline.config import Config
from pipeline.files import StageReport, raise_if_all_failed

DATA_STAGES = ("demo", "base", "acquire", "transcribe", "clean", "split", "augment", "tokenize")
NETWORK_STAGES = {"acquire"}  # the only ones worth retrying: a download can fail and then succeed


def _run_stage(name: str, cfg: Config) -> StageReport:
    from pipeline.cli import resolve_stage

    report = resolve_stage(name)(cfg)
    logger = get_run_logger()
    logger.info(report.summary())
    for item, why in report.failed.items():
        logger.warning("%s: %s failed: %s", name, item, why)
    raise_if_all_failed(report)
    return report


def stage_task(name: str, cfg: Config):
    """A Prefect task for one stage, retried only where a retry can help."""
    retries = cfg.acquire.retries if name in NETWORK_STAGES else 0
    return task(
        _run_stage,
        name=name,
        retries=retries,
        retry_delay_seconds=cfg.acquire.backoff_s,
        cache_policy=NONE,
    )


def summary_markdown(reports: dict[str, StageReport]) -> str:
    rows = [
        "| stage | in | processed | cached | dropped | failed | out | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in reports.items():
        rows.append(
            f"| {name} | {r.items_in} | {len(r.processed)} | {len(r.cached)} | {len(r.dropped)} | "
            f"{len(r.failed)} | {r.outputs} | {r.seconds:.1f} |"
        )
    failures = [f"- `{name}` / `{item}`: {why}" for name, r in reports.items() for item, why in r.failed.items()]
    if failures:
        rows += ["", "**Failed items**", *failures]
    return "\n".join(rows)


def headline(reports: dict[str, StageReport]) -> str:
    """sources -> MIDI -> train pieces after augmentation -> tokens, the one line a user wants."""
    parts = []
    if "acquire" in reports:
        parts.append(f"{reports['acquire'].outputs} sources")
    if "transcribe" in reports:
        parts.append(f"{reports['transcribe'].outputs} MIDI")
    if "augment" in reports:
        aug = reports["augment"]
        pieces_in = aug.stats.get("pieces_in", 0)
        parts.append(
            f"{pieces_in} train pieces -> {aug.outputs} after augmentation (x{aug.stats.get('factor', 0):.1f})"
        )
    if "tokenize" in reports:
        splits = reports["tokenize"].stats.get("splits", {})
        tokens = sum(s["tokens"] for s in splits.values())
        windows = sum(s["windows"] for s in splits.values())
        parts.append(f"{tokens:,} tokens in {windows:,} windows (vocab {reports['tokenize'].stats.get('vocab_size')})")
    return " -> ".join(parts)


def dvc_commit_outputs(repo: Path = Path(".")) -> None:
    """Record the flow's outputs in dvc.lock so `dvc status` agrees with what `jam run` produced."""
    if not (repo / "dvc.yaml").exists() or not (repo / ".dvc").exists():
        return
    cmd = [sys.executable, "-m", "dvc", "commit", "--force", "--quiet"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        get_run_logger().warning("dvc commit failed (outputs are fine, dvc.lock not updated): %s", proc.stderr.strip())


@flow(name="jam-partner", log_prints=True)
def jam_flow(
    cfg: Config,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    dvc_commit: bool = True,
    until: str | None = None,
) -> str:
    """Sources -> transcribed, cleaned, split, augmented, tokenized corpus; `until` stops after that stage."""
    if until is not None and until not in DATA_STAGES:
        raise ValueError(f"until: unknown stage {until!r}; one of {', '.join(DATA_STAGES)}")
    reports: dict[str, StageReport] = {}
    for name in DATA_STAGES:
        if name == "demo" and not cfg.demo.enabled:
            continue
        reports[name] = stage_task(name, cfg)(name, cfg)
        if name == until:
            break

    table = summary_markdown(reports)
    create_markdown_artifact(key="jam-partner-summary", markdown=f"# jam-partner run\n\n{headline(reports)}\n\n{table}")
    if dvc_commit and not overrides and Path(params_path).name == "params.yaml":
        dvc_commit_outputs()  # dvc.lock records params.yaml; outputs made with overrides would not match it
    return f"{headline(reports)}\n\n{table}"
