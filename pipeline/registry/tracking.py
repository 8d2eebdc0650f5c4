"""MLflow for training runs: one run per training across resumes, metrics that never repeat a step, the bundle.

Everything goes through an explicit `MlflowClient` and run id (no fluent active-run state); the client comes from
`pipeline.registry.client`, which sets the tracking URI inside the call. Conventions: docs/ARCHITECTURE.md "MLflow
conventions".
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.files import atomic_path, sha256_file
from pipeline.registry.client import experiment_id, mlflow_client
from realtime.bundle_format import BUNDLE_ARTIFACT, BUNDLE_FILE, read_bundle

log = logging.getLogger(__name__)

ROLE_TAG = "jam.role"
BASE_RUN_TAG = "jam.base_run_id"
BASE_PATH_TAG = "jam.base_path"
STYLE_TAG = "jam.style"  # the style (player) a fine-tune learned; its adapter's name
RESUMED_FROM_TAG = "jam.resumed_from_run_id"
LOSS_PLOT = "loss.png"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_BATCH = 100  # params per log_batch call (MLflow's limit); metrics allow 1000


def run_name(stage: str, fingerprint: str, *parts: str) -> str:
    """What the MLflow UI shows for a training run: `pretrain-1a2b3c4d`, `finetune-style-r8-1a2b3c4d`.

    The fingerprint (params + data hash) ends the name, so two runs of the same training are recognisable.
    """
    return "-".join([stage, *parts, fingerprint[:8]])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_version(lock: Path = Path("dvc.lock")) -> str:
    """sha256 of dvc.lock (what DVC says the data is), or "none" outside a DVC checkout."""
    return sha256_file(lock) if lock.is_file() else "none"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"finetune.lora_r": "4", ...}; lists become JSON, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def run_tags(role: str, tokenizer: Path, **extra: str) -> dict[str, str]:
    """The tags every training run carries (role, code, data and tokenizer versions)."""
    return {
        ROLE_TAG: role,
        "git_commit": git_commit(),
        "data_version": data_version(),
        "tokenizer_sha256": sha256_file(tokenizer),
        **extra,
    }


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process in MiB.

    /proc is per process image; `ru_maxrss` is not: it keeps the parent's peak across fork + exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_mem_mb(device: Any) -> float:
    """Peak memory so far: CUDA max allocated, else the process's peak RSS (MiB)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb()


class MetricBuffer:
    """Metrics held back until the checkpoint covering their step is committed.

    After a SIGKILL the steps since the last checkpoint are trained again; since their metrics never reached
    MLflow, replaying them logs each step once. Entries: (key, value, step, timestamp ms).
    """

    def __init__(self, items: list[list[Any]] | None = None):
        self.items: list[list[Any]] = [list(i) for i in items or []]

    def add(self, step: int, **values: float) -> None:
        now = int(time.time() * 1000)
        self.items.extend([key, float(value), int(step), now] for key, value in values.items())

    def drop_logged(self, client, run_id: str) -> None:
        """Forget entries MLflow already has (a flush that completed just before a kill)."""
        seen = set()
        for key in {i[0] for i in self.items}:
            seen.update((key, m.step) for m in client.get_metric_history(run_id, key))
        self.items = [i for i in self.items if (i[0], i[2]) not in seen]

    def flush(self, client, run_id: str) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key=k, value=v, timestamp=t, step=s) for k, v, s, t in self.items]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        self.items = []


class RunTracker:
    """The MLflow run of one training: created once, reopened by id on every resume.

    Args:
        cfg: the resolved config (URI, experiment, params).
        tags: tags set when the run is created (see `run_tags`).
        system_metrics: also sample CPU/RAM/GPU into `system/*` metrics every 10 s.
        name: the run name shown in the MLflow UI (see `run_name`); MLflow picks a random one if empty.
    """

    def __init__(self, cfg: Config, tags: dict[str, str], system_metrics: bool = True, name: str = ""):
        self.cfg, self.tags, self.system_metrics, self.name = cfg, tags, system_metrics, name
        self.run_id = ""
        self._monitor = None
        self._client = None

    @property
    def client(self):
        """Made on first use, so only the process that logs (the main one of several) touches the store."""
        if self._client is None:
            self._client = mlflow_client(self.cfg, create=True)
        return self._client

    def open(self, run_id: str | None) -> str:
        """Create the run (None) or reopen `run_id`; a run missing from this store is replaced by a new one."""
        resumed = False
        if run_id:
            try:
                self.client.get_run(run_id)
                resumed = True
            except Exception:  # mlflow raises MlflowException subclasses per store; the store lacks this run
                log.warning("MLflow run %s is not in %s; continuing in a new run", run_id, self.cfg.project.mlflow_uri)
        if resumed:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**self.tags, **({RESUMED_FROM_TAG: run_id} if run_id else {})}
            exp = experiment_id(self.client, self.cfg, create=True)
            self.run_id = self.client.create_run(exp, tags=tags, run_name=self.name or None).info.run_id
            self._log_params(flatten(self.cfg.model_dump(mode="json")))
        self._start_monitor(resumed)
        return self.run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH])

    def _start_monitor(self, resumed: bool) -> None:
        if not self.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id, resume_logging=resumed, tracking_uri=self.cfg.project.mlflow_uri
        )
        self._monitor.start()

    def close(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run FINISHED, KILLED (preempted) or FAILED."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def log_config(client, run_id: str, cfg: Config) -> None:
    """The resolved config as artifact `config.json`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
        client.log_artifact(run_id, str(path))


def log_bundle(client, run_id: str, bundle_dir: Path) -> None:
    """Log the bundle entries named by bundle.json (not whatever else shares the folder) as artifact `bundle`."""
    info = read_bundle(bundle_dir)
    client.log_artifact(run_id, str(bundle_dir / BUNDLE_FILE), BUNDLE_ARTIFACT)
    client.log_artifact(run_id, str(bundle_dir / info["tokenizer"]), BUNDLE_ARTIFACT)
    client.log_artifacts(run_id, str(bundle_dir / info["base"]), f"{BUNDLE_ARTIFACT}/{info['base']}")
    for rel in info.get("adapters", {}).values():
        client.log_artifacts(run_id, str(bundle_dir / rel), f"{BUNDLE_ARTIFACT}/{rel}")


def loss_plot(client, run_id: str, dest: Path) -> Path:
    """PNG of train_loss and valid_loss (nats/token) against optimizer step, from the run's logged history."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for key, style in (("train_loss", "-"), ("valid_loss", "o-")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], style, label=key, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return dest


def finish_run(client, run_id: str, cfg: Config, bundle_dir: Path, out_dir: Path) -> None:
    """Log what a finished training leaves behind: bundle, resolved config, loss plot."""
    log_bundle(client, run_id, bundle_dir)
    log_config(client, run_id, cfg)
    client.log_artifact(run_id, str(loss_plot(client, run_id, out_dir / LOSS_PLOT)))
