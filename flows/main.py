"""The Prefect flow: wiring only. Every task calls a stage function from `pipeline/`.

Runs on Prefect's temporary local server by default; with `PREFECT_API_URL` set, on a real one, where runs,
retries and the summary artifact show in the UI.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pipeline import datasync
from pipeline.core import graph
from pipeline.core.config import Config, load_config
from pipeline.core.constants import EXIT_PREEMPTED
from pipeline.core.items import StageReport, raise_if_all_failed
from pipeline.core.profile import export_env
from pipeline.services import check_reachable


class TrainingPreempted(RuntimeError):
    """Training checkpointed and exited on SIGTERM (exit 75): the retry resumes it."""


def _run_stage(name: str, cfg: Config) -> StageReport:
    report = graph.run_stage(name, cfg)
    logger = get_run_logger()
    logger.info(report.summary())
    for item, why in report.failed.items():
        logger.warning("%s: %s failed: %s", name, item, why)
    raise_if_all_failed(report)
    return report


def _train(name: str, cfg: Config) -> StageReport:
    """`python -m pipeline.train --stage NAME` in a child process, so a SIGTERM meant for training stops only it.

    The child reads the exact resolved config this flow runs with (params file and overrides applied). Its log lines
    (`step 12/120 ...`, `checkpoint step 40 -> s3://...`, `resumed from step 40`) go to the run's log as they come,
    so the UI shows a training's progress, and which machine resumed it from where.
    """
    logger = get_run_logger()
    tail: collections.deque[str] = collections.deque(maxlen=5)
    with tempfile.TemporaryDirectory(prefix="jam-train-") as tmp:
        resolved = Path(tmp) / "params.yaml"
        resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        cmd = [sys.executable, "-m", "pipeline.train", "--stage", name, "--params", str(resolved)]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                if line.strip():
                    tail.append(line.rstrip())
                    logger.info("%s: %s", name, tail[-1])
        returncode = proc.wait()
    if returncode == EXIT_PREEMPTED:
        logger.warning("%s preempted after a checkpoint; resuming", name)
        raise TrainingPreempted(f"{name}: stopped by SIGTERM after a checkpoint")
    if returncode != 0:
        raise RuntimeError(f"{name} failed (exit {returncode}): " + "\n".join(tail))
    return StageReport.load(cfg.stage_dir(name))


def _only_preemption(task, task_run, state) -> bool:  # Prefect's retry_condition_fn signature
    try:
        state.result()
    except TrainingPreempted:
        return True
    except Exception:
        return False
    return False


def _promote(name: str, cfg: Config) -> str:
    result = graph.run_stage(name, cfg)
    lines = [f"promote: {result.action}: {result.message}", *(f"  - {why}" for why in result.reasons)]
    get_run_logger().info("\n".join(lines))
    return "\n".join(lines)


def stage_task(node: graph.Stage, cfg: Config):
    """The Prefect task for one stage node: retried only where a retry can help."""
    if node.kind == "train":  # a preempted child is retried (it resumes); any other failure is not
        options = dict(retries=cfg.checkpoint.preemption_retries, retry_condition_fn=_only_preemption)
        return task(_train, name=node.name, retry_delay_seconds=0, cache_policy=NONE, **options)
    if node.name == "promote":
        return task(_promote, name=node.name, cache_policy=NONE)
    # No task retries for data stages, acquire included: yt-dlp knows which errors are transient and retries the
    # request that failed (acquire.retries, acquire.backoff_s), not the whole stage; a URL that still fails is
    # reported and tried again next run.
    return task(_run_stage, name=node.name, cache_policy=NONE)


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


def _sync_pull(cfg: Config) -> list[str]:
    """With a DVC remote: this machine's remote config, then what the remote has of the stages it lacks.

    Returns:
        The stages pulled.
    """
    if not datasync.enabled(cfg):
        return []
    datasync.configure(cfg)
    pulled = datasync.pull(cfg, [node.name for node in graph.STAGES if node.dvc])
    get_run_logger().info("pulled from %s: %s", cfg.services.dvc_remote, ", ".join(pulled) or "nothing")
    return pulled


def _needs_push(node: graph.Stage, cfg: Config, pulled: list[str], result: object) -> bool:
    """A DVC stage's outputs go to the remote after it ran, unless they just came from there unchanged (a
    replacement machine's no-op stages: each push is a `dvc commit` + `dvc push`, seconds apiece)."""
    if not node.dvc or not datasync.enabled(cfg):
        return False
    return not (node.name in pulled and isinstance(result, StageReport) and not result.processed)


def _run_graph(cfg: Config, params_path: str, overrides: list[str], dvc_commit: bool, until: str | None) -> str:
    reports: dict[str, StageReport] = {}
    promoted = ""
    pulled = _sync_pull(cfg)
    for node in graph.until(until):
        if not node.enabled(cfg):
            continue
        result = stage_task(node, cfg)(node.name, cfg)
        if isinstance(result, StageReport):
            reports[node.name] = result
        else:
            promoted = result
        if _needs_push(node, cfg, pulled, result):  # a machine reclaimed after this loses nothing of this stage
            task(datasync.push, name=f"push-{node.name}", cache_policy=NONE)(cfg, node.name)

    table = summary_markdown(reports)
    create_markdown_artifact(
        key="jam-partner-summary", markdown=f"# jam-partner run\n\n{headline(reports)}\n\n{table}\n\n{promoted}"
    )
    if dvc_commit and not overrides and Path(params_path).name == "params.yaml":
        dvc_commit_outputs()  # dvc.lock records params.yaml; outputs made with overrides would not match it
    return "\n\n".join(part for part in (headline(reports), table, promoted) if part)


@flow(name="jam-partner", log_prints=True)
def jam_flow(
    cfg: Config,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    dvc_commit: bool = True,
    until: str | None = None,
) -> str:
    """Every enabled stage of the graph in order (sources -> corpus -> models -> champion); `until` stops early."""
    return _run_graph(cfg, params_path, list(overrides or []), dvc_commit, until)


@flow(name="jam-pipeline", log_prints=True)
def jam_pipeline(params: str = "params.yaml", overrides: list[str] | None = None, until: str | None = None) -> str:
    """The deployment's flow (`jam deploy`): the params file is read on the worker, in its own checkout.

    Args:
        params: params file relative to the worker's checkout (e.g. params-spot.yaml).
        overrides: `dotted.key=value` overrides, as `jam run --set`.
        until: stop after this stage.
    """
    cfg = load_config(params, overrides)
    export_env(cfg.services)
    check_reachable(cfg)  # a clear error naming the service, before any work
    return _run_graph(cfg, params, list(overrides or []), True, until)
