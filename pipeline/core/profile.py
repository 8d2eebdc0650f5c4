"""The services profile: where the shared services of a run across machines live (params.yaml `services:`).

All keys unset (the default) is the single-machine setup: Prefect's temporary local server, the sqlite MLflow
store, data and checkpoints on this disk. A spot profile (params-spot.yaml) names a Prefect server, an MLflow
tracking server (`project.mlflow_uri: http://...`, artifacts on S3), a DVC remote and `checkpoint.dir` on S3.
Credentials are never here: boto3, s3fs and DVC read the usual AWS variables (or ~/.aws) themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pydantic import field_validator

from pipeline.core.section import Section

S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"  # botocore's own variable: boto3, s3fs (DVC) and MLflow all honour it


class ServicesConfig(Section):
    """Shared services (README "Running on spot machines"); None everywhere = this machine only."""

    prefect_api_url: str | None = None  # e.g. http://127.0.0.1:4200/api; None = temporary server or PREFECT_API_URL
    mlflow_artifact_root: str | None = None  # s3://bucket/mlflow: where `jam services up`'s MLflow server writes
    dvc_remote: str | None = None  # s3://bucket/dvc: data stages pushed after each run, pulled on a fresh machine
    s3_endpoint_url: str | None = None  # S3-compatible endpoint (moto, MinIO); None = AWS. Exported to children
    work_pool: str = "jam"  # Prefect process work pool that `jam deploy` targets
    deployment: str = "spot"  # deployment name: flow runs are `jam-pipeline/<deployment>`
    state_dir: Path = Path(".services")  # `jam services up`: state.json (pids, ports), logs, sqlite stores
    startup_timeout_s: float = 180.0  # seconds for all three to answer; Prefect's server takes ~30 s on 2 cores

    @field_validator("prefect_api_url", "s3_endpoint_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in ("http", "https"):
            raise ValueError(f"expected an http(s) URL, got {v!r}")
        return v

    @field_validator("mlflow_artifact_root", "dvc_remote")
    @classmethod
    def _remote(cls, v: str | None) -> str | None:
        # an absolute path is a shared mount (a notebook's Google Drive, NFS); DVC takes plain paths, not file://
        if v is not None and "://" not in v and not Path(v).is_absolute():
            raise ValueError(f"expected a remote URL such as s3://bucket/prefix or an absolute path, got {v!r}")
        return v


def client_env(services: ServicesConfig) -> dict[str, str]:
    """Environment that points Prefect and every S3 client of this process and its children at the services."""
    env = {}
    if services.prefect_api_url:
        env["PREFECT_API_URL"] = services.prefect_api_url
    if services.s3_endpoint_url:
        env[S3_ENDPOINT_ENV] = services.s3_endpoint_url
        env["MLFLOW_S3_ENDPOINT_URL"] = services.s3_endpoint_url
    return env


def export_env(services: ServicesConfig) -> None:
    """Called by entry points after loading the config (never at import)."""
    os.environ.update(client_env(services))
