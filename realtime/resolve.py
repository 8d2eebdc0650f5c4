"""`models:/<name>@<alias>` or `models:/<name>/<version>` to a local bundle folder, cached by model version.

A registered model version's files never change, so the first start downloads them once into
`<cache>/<store key>/<name>/v<version>/` and every later start only asks the registry which version the alias
points to now (a new champion is picked up at the next start). For a sqlite store that question is two read-only SQL
queries on MLflow's `registered_model_aliases` and `model_versions` tables: no MLflow import (~1.5 s of a start).
Any other store, or a schema these queries do not fit, goes through `MlflowClient`, as does the download.
The store key hashes the store (a sqlite file by its absolute path), and a copy is used only while its stamp (the
version's artifact source and run id) matches the registry's: two checkouts, or one store cleaned and trained
again, each get their own copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from realtime import constants as C
from realtime.bundle_format import BUNDLE_ARTIFACT, BUNDLE_FILE, BundleError

SQLITE_PREFIX = "sqlite:///"
SOURCE_FILE = ".source"  # in a cached copy: the artifact source and run id of the version it was downloaded from


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    source: str  # artifact URI of the version's files
    run_id: str | None


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3")."""
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise BundleError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, None, version


def model_cache_dir() -> Path:
    """Where registry copies are kept: `$JAM_MODEL_CACHE`, else `constants.MODEL_CACHE_DIR`."""
    return Path(os.environ.get(C.MODEL_CACHE_ENV) or C.MODEL_CACHE_DIR).expanduser()


def _sqlite_lookup(tracking_uri: str, name: str, alias: str | None, version: str | None) -> ModelVersion | None:
    """The version from the sqlite store directly; None when the store or its schema is not what we expect."""
    db = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            if alias is not None:
                row = con.execute(
                    "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, alias)
                ).fetchone()
                if row is None:
                    return None  # MlflowClient words the error
                version = str(row[0])
            row = con.execute(
                "SELECT source, run_id FROM model_versions WHERE name = ? AND version = ?", (name, int(version))
            ).fetchone()
    except (sqlite3.Error, ValueError):
        return None
    return None if row is None else ModelVersion(name, version, row[0], row[1])


def lookup(tracking_uri: str, name: str, alias: str | None, version: str | None) -> ModelVersion:
    """Which version `name@alias` (or `name/version`) is, with its artifact source.

    Raises:
        BundleError: no store at the URI, or no such model, alias or version.
    """
    if tracking_uri.startswith(SQLITE_PREFIX):
        if not Path(tracking_uri.removeprefix(SQLITE_PREFIX)).exists():
            raise BundleError(f"no MLflow store at {tracking_uri}: train and promote a model, or pass --model PATH")
        found = _sqlite_lookup(tracking_uri, name, alias, version)
        if found is not None:
            return found
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    ref = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as err:  # MlflowException: RESOURCE_DOES_NOT_EXIST
        raise BundleError(f"{ref}: not in the registry at {tracking_uri} ({str(err).splitlines()[0]})") from None
    return ModelVersion(name, str(mv.version), mv.source, mv.run_id)


def store_key(tracking_uri: str) -> str:
    """12 hex digits naming a store; a sqlite store by its file's absolute path: the project's relative URI
    (`sqlite:///mlruns/mlflow.db`) is another store in every checkout."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        tracking_uri = SQLITE_PREFIX + str(Path(tracking_uri.removeprefix(SQLITE_PREFIX)).resolve())
    return hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]


def _stamp(mv: ModelVersion) -> str:
    return f"{mv.source}\n{mv.run_id}\n"


def _download(mv: ModelVersion, tracking_uri: str, dst: Path) -> Path:
    """The version's files into `dst` (atomic: a half download is never taken for a cached copy), stamped with
    where they came from."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bar in a jam's output
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        try:
            got = download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=tracking_uri)
        except Exception:  # a logged-model source: fall back to the run's bundle artifact
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            got = client.download_artifacts(mv.run_id, BUNDLE_ARTIFACT, str(tmp))
        found = find_bundle_dir(Path(got))
        (found / SOURCE_FILE).write_text(_stamp(mv))
        shutil.rmtree(dst, ignore_errors=True)
        found.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def find_bundle_dir(root: Path) -> Path:
    """The shallowest folder under `root` holding bundle.json."""
    hits = sorted(root.rglob(BUNDLE_FILE), key=lambda p: len(p.parts))
    if not hits:
        raise BundleError(f"{root}: no {BUNDLE_FILE} in the downloaded model")
    return hits[0].parent


def resolve_models_uri(uri: str, tracking_uri: str, cache_dir: Path | None = None) -> Path:
    """The local copy of a registry model version, downloaded on first use.

    Args:
        uri: `models:/name@alias` or `models:/name/version`.
        tracking_uri: MLflow tracking (and registry) URI; local stores.
        cache_dir: cache root (default `model_cache_dir()`); copies live under `<store key>/<name>/v<version>`.

    A copy is taken only if it was downloaded from the version's own source and run: a store made again at the
    same path (its data cleaned, the demo run afresh) numbers its versions from 1 again.
    """
    name, alias, version = parse_models_uri(uri)
    mv = lookup(tracking_uri, name, alias, version)
    dst = (cache_dir or model_cache_dir()) / store_key(tracking_uri) / name / f"v{mv.version}"
    with contextlib.suppress(OSError):
        if (dst / BUNDLE_FILE).is_file() and (dst / SOURCE_FILE).read_text() == _stamp(mv):
            return dst
    return _download(mv, tracking_uri, dst)
