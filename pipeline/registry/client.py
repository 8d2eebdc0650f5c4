"""The one way this project talks to MLflow: `mlflow_client(cfg)` and `experiment_id(client, cfg)`.

The tracking (and registry) URI is set here, inside the call, never at import. Training creates what is missing
(`create=True`: the sqlite store's folder, the experiment); evaluation, promotion and `jam runs` only read, and fail
with a clear `RunsError` when there is nothing to read.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import Config


class RunsError(RuntimeError):
    """No store, no experiment, or a run without what was asked of it; the message says which."""


def mlflow_client(cfg: Config, create: bool = False):
    """An `MlflowClient` on `project.mlflow_uri` (tracking and registry).

    Args:
        cfg: project config.
        create: make a local sqlite store's folder if missing (training); else a missing store is an error.

    Raises:
        RunsError: `create` is False and the sqlite store does not exist.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = cfg.project.mlflow_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
        elif not db.exists():
            raise RunsError(f"no MLflow store at {uri}: train a model first (or set project.mlflow_uri)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, cfg: Config, create: bool = False) -> str:
    """Id of the experiment named `project.name`; with `create`, made (artifacts under `project.artifact_dir`, or
    the tracking server's artifact store when `project.mlflow_uri` is http).

    Raises:
        RunsError: `create` is False and there is no such experiment.
    """
    exp = client.get_experiment_by_name(cfg.project.name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        raise RunsError(f"no MLflow experiment {cfg.project.name!r} in {cfg.project.mlflow_uri}: train a model first")
    # A tracking server stores artifacts where it was told to (`mlflow server --artifacts-destination s3://...`);
    # a local path here would send every machine's artifacts to its own disk.
    remote = cfg.project.mlflow_uri.startswith(("http://", "https://"))
    location = None if remote else Path(cfg.project.artifact_dir).resolve().as_uri()
    return client.create_experiment(cfg.project.name, artifact_location=location)
