"""`jam services up|down|status`: the spot profile's shared services, started on this machine for trying and testing.

Three real servers, each bound to 127.0.0.1 on the port its URL in the profile names: a moto S3 server
(`services.s3_endpoint_url`), an MLflow tracking server (`project.mlflow_uri`; sqlite store under `state_dir`,
artifacts proxied to `services.mlflow_artifact_root` on S3, so clients need only the tracking URI) and a Prefect
server (`services.prefect_api_url`; its database under `state_dir`). `up` creates the buckets the profile names.

`<state_dir>/state.json` records each server's pid, start time, port, URL and log. `down` stops exactly those
process groups: a pid that now belongs to another process (different start time) is left alone.
`check_reachable(cfg)` is what every entry point runs before any work when a profile names services.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

from pipeline.core import cluster
from pipeline.core.config import Config
from pipeline.core.constants import OFFLINE_ENV
from pipeline.core.files import read_json, write_json
from pipeline.core.profile import S3_ENDPOINT_ENV

LOOPBACK = ("127.0.0.1", "localhost")
STATE_NAME = "state.json"
STOP_GRACE_S = 10.0  # seconds between SIGTERM and SIGKILL of a server's process group
POLL_S = 0.5  # seconds between health probes
PROBE_TIMEOUT_S = 3.0  # seconds one health request may take


class ServicesError(RuntimeError):
    """A service could not be started, stopped or reached; the message names it."""


@dataclass(frozen=True)
class Service:
    """One server: what clients call it, where it answers health probes, how to start it."""

    name: str  # s3 | mlflow | prefect
    url: str
    health: str
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def _loopback_port(url: str, key: str) -> int:
    parsed = urlparse(url)
    if parsed.hostname not in LOOPBACK or parsed.port is None:
        raise ServicesError(f"{key}: `jam services up` serves on 127.0.0.1:<port> only, got {url}")
    return parsed.port


def _bin(name: str) -> str:
    """A console script of this environment (the venv's prefect/mlflow), whatever PATH says."""
    return str(Path(sys.executable).parent / name)


def bucket_urls(cfg: Config) -> list[str]:
    """S3 URLs the profile names (artifact root, DVC remote, checkpoint dir): their buckets must exist."""
    sc = cfg.services
    urls = (sc.mlflow_artifact_root, sc.dvc_remote, cfg.checkpoint.dir)
    return [u for u in urls if u and u.startswith("s3://")]


def plan(cfg: Config, state_dir: Path) -> list[Service]:
    """The three servers of the profile, in start order (S3 first: MLflow writes there).

    Raises:
        ServicesError: the profile lacks a URL, or one is not on loopback.
    """
    sc, mlflow_uri = cfg.services, cfg.project.mlflow_uri
    needed = {
        "services.s3_endpoint_url": sc.s3_endpoint_url,
        "services.prefect_api_url": sc.prefect_api_url,
        "services.mlflow_artifact_root": sc.mlflow_artifact_root,
        "project.mlflow_uri (http://127.0.0.1:<port>)": mlflow_uri if mlflow_uri.startswith("http") else None,
    }
    missing = [key for key, value in needed.items() if not value]
    if missing:
        raise ServicesError(f"the services profile does not name {', '.join(missing)} (see params-spot.yaml)")
    s3_port = _loopback_port(sc.s3_endpoint_url, "services.s3_endpoint_url")
    mlflow_port = _loopback_port(mlflow_uri, "project.mlflow_uri")
    prefect_port = _loopback_port(sc.prefect_api_url, "services.prefect_api_url")
    s3_env = (
        (S3_ENDPOINT_ENV, sc.s3_endpoint_url),
        ("MLFLOW_S3_ENDPOINT_URL", sc.s3_endpoint_url),
        ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),  # its GenAI job runner: 5 idle consumer processes
    )
    host, prefect_home = LOOPBACK[0], (state_dir / "prefect").resolve()
    s3_cmd = (_bin("moto_server"), "-H", host, "-p", str(s3_port))
    store = f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"
    mlflow_cmd = (_bin("mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", store, "--artifacts-destination", sc.mlflow_artifact_root)  # fmt: skip
    prefect_cmd = (_bin("prefect"), "server", "start", "--host", host, "--port", str(prefect_port))
    prefect_env = (("PREFECT_HOME", str(prefect_home)), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"))
    return [
        Service("s3", sc.s3_endpoint_url, sc.s3_endpoint_url, s3_cmd),
        Service("mlflow", mlflow_uri, f"{mlflow_uri.rstrip('/')}/health", mlflow_cmd, s3_env),
        Service("prefect", sc.prefect_api_url, f"{sc.prefect_api_url.rstrip('/')}/health", prefect_cmd, prefect_env),
    ]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start(svc: Service, state_dir: Path) -> tuple[subprocess.Popen, Path]:
    log = state_dir / f"{svc.name}.log"
    env = {**os.environ, **OFFLINE_ENV, **dict(svc.env)}
    env.pop("PREFECT_API_URL", None)  # a server must not report to another server
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            svc.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=state_dir,
            start_new_session=True,  # its own process group: `down` stops it and every worker it forks
        )  # fmt: skip
    return proc, log


def _wait_healthy(svc: Service, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while not _healthy(svc.health):
        if proc.poll() is not None:
            raise ServicesError(f"{svc.name} exited with {proc.returncode} before answering:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise ServicesError(f"{svc.name} did not answer at {svc.health} in time:\n{_tail(log)}")
        time.sleep(POLL_S)


def make_buckets(cfg: Config) -> list[str]:
    """Create the buckets the profile's S3 URLs name (existing ones are kept). Returns the bucket names."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=cfg.services.s3_endpoint_url)
    buckets = sorted({urlparse(u).netloc for u in bucket_urls(cfg)})
    for bucket in buckets:
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    return buckets


def _check_credentials() -> None:
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise ServicesError(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the local moto server takes any)"
        )


def _record(proc: subprocess.Popen, svc: Service, log: Path) -> dict[str, Any]:
    import psutil

    create_time = psutil.Process(proc.pid).create_time()
    return {"pid": proc.pid, "create_time": create_time, "url": svc.url, "health": svc.health, "log": str(log)}


def up(cfg: Config, state_dir: Path | None = None) -> dict[str, Any]:
    """Start the three servers, wait until each answers, create the buckets, write the state file.

    Returns:
        The state: {"services": {name: {pid, create_time, url, health, log}}, "buckets": [...]}.

    Raises:
        ServicesError: already up, a port taken, a server that exits or stays silent (its log tail is in the
            message); whatever was started is stopped again.
    """
    state_dir = Path(state_dir or cfg.services.state_dir)
    if any(s["alive"] for s in status(state_dir)):
        raise ServicesError(f"services already running (state in {state_dir / STATE_NAME}); `jam services down`")
    services = plan(cfg, state_dir)
    _check_credentials()
    taken = [s.name for s in services if _healthy(s.health)]
    if taken:
        raise ServicesError(f"something already answers at the port of {', '.join(taken)}")
    state_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"services": {}, "buckets": []}
    deadline = time.monotonic() + cfg.services.startup_timeout_s
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for svc in services:  # S3 first (MLflow writes there); the slower two then start side by side
            procs[svc.name] = proc, log = _start(svc, state_dir)
            state["services"][svc.name] = _record(proc, svc, log)
            write_json(state_dir / STATE_NAME, state)
            if svc.name == "s3":
                _wait_healthy(svc, proc, log, deadline)
                state["buckets"] = make_buckets(cfg)
        for svc in services[1:]:
            _wait_healthy(svc, *procs[svc.name], deadline)
    except Exception:
        down(state_dir)
        raise
    write_json(state_dir / STATE_NAME, state)
    return state


def _process(entry: dict[str, Any]):
    """The recorded server's `psutil.Process`, or None when it is gone or its pid now names another process."""
    import psutil

    try:
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["create_time"]) > 0.01:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.NoSuchProcess:
        return None


def _stop(entry: dict[str, Any]) -> bool:
    """SIGTERM the server's process group, SIGKILL what is left after `STOP_GRACE_S`. False: it was not running."""
    import psutil

    leader = _process(entry)
    if leader is None:
        return False
    procs = [leader, *leader.children(recursive=True)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(entry["pid"], signal.SIGTERM)  # its own session: the group id is the leader's pid
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)
    return True


def down(state_dir: Path) -> list[str]:
    """Stop exactly the servers `up` recorded in `state_dir`; remove the state file. Returns the names stopped."""
    path = Path(state_dir) / STATE_NAME
    state = read_json(path, default=None)
    if not state:
        return []
    stopped = [name for name, entry in state["services"].items() if _stop(entry)]
    path.unlink(missing_ok=True)
    return stopped


def status(state_dir: Path) -> list[dict[str, Any]]:
    """One row per recorded server: name, url, pid, alive (the recorded process), healthy (answers its probe)."""
    state = read_json(Path(state_dir) / STATE_NAME, default=None) or {"services": {}}
    rows = []
    for name, entry in state["services"].items():
        alive = _process(entry) is not None
        rows.append({"name": name, "url": entry["url"], "pid": entry["pid"], "alive": alive,
                     "healthy": alive and _healthy(entry["health"]), "log": entry["log"]})  # fmt: skip
    return rows


def unreachable(cfg: Config) -> list[str]:
    """What of the profile does not answer now, one line each naming the key (empty: all reachable)."""
    sc, problems = cfg.services, []
    probes = {
        "services.prefect_api_url": sc.prefect_api_url and f"{sc.prefect_api_url.rstrip('/')}/health",
        "project.mlflow_uri": cfg.project.mlflow_uri.startswith("http") and f"{cfg.project.mlflow_uri}/health",
        "services.s3_endpoint_url": sc.s3_endpoint_url,
    }
    for key, url in probes.items():
        if url and not _healthy(url):
            problems.append(f"{key}: nothing answers at {url}")
    problems += cluster.unreachable(cfg.project)
    if problems:
        return problems
    for url in bucket_urls(cfg):
        options = dict(cfg.checkpoint.storage_options) if url == cfg.checkpoint.dir else {}
        options.setdefault("config_kwargs", {"connect_timeout": PROBE_TIMEOUT_S, "retries": {"max_attempts": 1}})
        try:
            fs, path = fsspec.core.url_to_fs(url, **options)
            fs.ls(path.split("/")[0], refresh=True)
        except Exception as err:  # botocore raises a zoo of types for DNS, auth and missing buckets
            problems.append(f"S3 bucket of {url}: {type(err).__name__}: {err}")
    return problems


def check_reachable(cfg: Config) -> None:
    """Raise `ServicesError` naming every service of the profile that does not answer (before any work)."""
    problems = unreachable(cfg)
    if problems:
        raise ServicesError("services unreachable:\n  " + "\n  ".join(problems))
