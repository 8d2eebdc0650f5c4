"""The project's MLflow runs: listing, bundle download, the `jam runs` table, the `jam ui` command.

Everything takes the `Config` and builds its client inside the function (`pipeline.registry.client`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.registry.client import RunsError, experiment_id, mlflow_client
from pipeline.registry.tracking import ROLE_TAG, STYLE_TAG
from realtime.bundle_format import BUNDLE_ARTIFACT, BUNDLE_FILE

EVAL_KEY_TAG = "jam.eval_key"
ALIASES = ("champion", "previous")

# Table columns: header -> param names looked up as the exact key or as the last part of a dotted key.
PARAM_COLUMNS = {"lora_r": ("lora_r", "lora.r", "r"), "steps": ("max_steps", "steps"), "lr": ("lr", "learning_rate")}
# Training logs the whole resolved config flattened ("finetune.lora_r"); a run's own section holds its values.
ROLE_SECTIONS = {"finetune": "finetune", "base": "pretrain"}
# Metrics with a logged bootstrap CI (`<name>_ci_low/_high`) show it beside the value.
# style_attribution_real: real held-out passages of the samples' length, what a perfect imitation would score
METRIC_COLUMNS = ("test_nll", "nll_ratio", "validity_rate", "style_score", "style_attribution",
                  "style_attribution_real", "base_style_attribution", "base_corpus_nll_change")  # fmt: skip


@dataclass
class RunSummary:
    """What evaluation, promotion and the table need from one MLflow run."""

    run_id: str
    role: str = ""
    status: str = "FINISHED"
    start_time: int = 0  # ms since epoch
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifact_uri: str = ""

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    @classmethod
    def from_run(cls, run: Any) -> RunSummary:
        """From an `mlflow.entities.Run`."""
        return cls(
            run_id=run.info.run_id,
            role=run.data.tags.get(ROLE_TAG, ""),
            status=run.info.status,
            start_time=run.info.start_time or 0,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
            artifact_uri=run.info.artifact_uri,
        )


def list_runs(cfg: Config, role: str | None = None, client=None, finished_only: bool = True) -> list[RunSummary]:
    """The experiment's runs, newest first.

    Args:
        cfg: project config (store and experiment name).
        role: keep only runs tagged `jam.role=<role>` (base, finetune); None keeps all.
        client: an existing `MlflowClient`, else one is made.
        finished_only: drop running, failed and killed runs (they have no complete bundle).
    """
    client = client or mlflow_client(cfg)
    filters = []
    if role:
        filters.append(f"tags.`{ROLE_TAG}` = '{role}'")
    if finished_only:
        filters.append("attributes.status = 'FINISHED'")
    runs = client.search_runs(
        [experiment_id(client, cfg)], filter_string=" and ".join(filters), order_by=["attributes.start_time DESC"]
    )
    return [RunSummary.from_run(r) for r in runs]


def get_run(cfg: Config, run_id: str, client=None) -> RunSummary:
    """One run by id (a clear `RunsError` if it does not exist)."""
    client = client or mlflow_client(cfg)
    try:
        return RunSummary.from_run(client.get_run(run_id))
    except Exception as err:  # MlflowException: RESOURCE_DOES_NOT_EXIST
        raise RunsError(f"no MLflow run {run_id!r}: {str(err).splitlines()[0]}") from None


def download_bundle(cfg: Config, run_id: str, cache_dir: Path) -> Path:
    """Local copy of a run's `bundle` artifact (downloaded once into `cache_dir/<run_id>/bundle`).

    Returns:
        The folder holding bundle.json.

    Raises:
        RunsError: the run has no bundle artifact or it lacks bundle.json (`read_bundle` checks the rest).
    """
    import mlflow

    dest = cache_dir / run_id / BUNDLE_ARTIFACT
    if (dest / BUNDLE_FILE).exists():
        return dest
    mlflow_client(cfg)  # sets the URI download_artifacts resolves run ids against
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=cache_dir))
    try:
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=BUNDLE_ARTIFACT, dst_path=str(tmp)))
        if not (got / BUNDLE_FILE).exists():
            raise RunsError(f"run {run_id[:8]}: its '{BUNDLE_ARTIFACT}' artifact has no {BUNDLE_FILE}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        got.rename(dest)
    except RunsError:
        raise
    except Exception as err:  # MlflowException / OSError: artifact missing or store unreadable
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunsError(f"run {run_id[:8]}: no '{BUNDLE_ARTIFACT}' artifact ({first})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def same_vocab(a, b) -> bool:
    """Whether two miditok tokenizers map ids to the same tokens (base vocabulary and BPE merges)."""
    return a.vocab == b.vocab and len(a) == len(b) and (a.vocab_model or {}) == (b.vocab_model or {})


def alias_map(client, name: str) -> dict[str, list[str]]:
    """Run id -> registry aliases (champion, previous) of the model versions made from it."""
    out: dict[str, list[str]] = {}
    for alias in ALIASES:
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except Exception:  # no registered model, or alias unset
            continue
        out.setdefault(mv.run_id, []).append(alias)
    return out


def _param(params: dict[str, str], names: tuple[str, ...], role: str) -> str:
    """A key param: from the role's config section when the run logged the whole config, else by plain name."""
    section = ROLE_SECTIONS.get(role)
    for name in names:
        if section and f"{section}.{name}" in params:
            return params[f"{section}.{name}"]
        if name in params:
            return params[name]
    if section and any(k.startswith(f"{section}.") for k in params):
        return ""  # the section was logged and lacks the param (e.g. lora_r of a base run)
    for name in names:
        for key, value in params.items():
            if key.endswith("." + name):
                return value
    return ""


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _fmt_metric(metrics: dict[str, float], name: str) -> str:
    """`value`, or `value [ci_low, ci_high]` when evaluation logged the metric's bootstrap 95 % CI."""
    lo, hi = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    ci = f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None and name in metrics else ""
    return _fmt(metrics.get(name)) + ci


def table_rows(runs: list[RunSummary], aliases: dict[str, list[str]]) -> list[list[str]]:
    """Header plus one row per run: id, role, start, key params, eval metrics, registry aliases."""
    header = ["run", "role", "style", "started", *PARAM_COLUMNS, *METRIC_COLUMNS, "alias"]
    rows = [header]
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_time / 1000)) if r.start_time else ""
        rows.append(
            [
                r.short_id,
                r.role or "-",
                r.tags.get(STYLE_TAG, ""),
                started,
                *(_param(r.params, names, r.role) for names in PARAM_COLUMNS.values()),
                *(_fmt_metric(r.metrics, m) for m in METRIC_COLUMNS),
                ",".join(aliases.get(r.run_id, [])),
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned plain-text columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def runs_table(cfg: Config) -> str:
    """The `jam runs` table of every run in the experiment, newest first, champion/previous marked."""
    client = mlflow_client(cfg)
    runs = list_runs(cfg, client=client, finished_only=False)
    if not runs:
        return f"no runs in experiment {cfg.project.name!r}"
    return format_table(table_rows(runs, alias_map(client, cfg.project.name)))


def ui_command(cfg: Config, port: int = 5000) -> tuple[list[str], str]:
    """The `mlflow ui` command line for the project's store, on loopback only, and the URL it serves."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        cfg.project.mlflow_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return cmd, f"http://127.0.0.1:{port}"


def serve(cmd: list[str]) -> int:
    """Run a server command until it exits, Ctrl-C or SIGTERM; its whole process group is stopped with it.

    `mlflow ui` starts uvicorn as a child, so terminating only the direct child would orphan the server.
    """
    import os
    import signal
    import subprocess

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    proc = subprocess.Popen(cmd, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
