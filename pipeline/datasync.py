"""Stage outputs that survive the machine: DVC push after each data stage, pull on a fresh machine.

Off unless `services.dvc_remote` is set. The remote is configured in `.dvc/config.local` (not committed) as
`jam`; the S3 endpoint and credentials come from the environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID...).
DVC's remote is content-addressed: what names a stage's files is its entry in dvc.lock, which lives on the machine
that ran it. So each push also uploads dvc.lock beside DVC's objects (`<remote>/jam/dvc.lock`), and a fresh machine
takes that lock before `dvc pull` of the stages it lacks. The stages' own per-item indexes travel inside their
folders, so after a pull each driver finds its items fresh and does no work (no re-transcription).
The stages' `report.json` files are in .dvcignore (their timings would make a no-op run change every output), yet
later stages read them (the tokenizer's vocabulary; a training's fingerprint that lets a re-run skip it), so each push
also uploads the stage's reports under `<remote>/jam/reports/`, and a pull fetches them back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fsspec

from pipeline.core.config import Config
from pipeline.core.constants import REPORT_NAME

REMOTE = "jam"  # the DVC remote's name in .dvc/config.local
LOCK_KEY = "jam/dvc.lock"  # beside DVC's files/md5/... under the remote URL
REPORTS_KEY = "jam/reports"  # + the report's path in the repository: data/<stage>/[<sub>/]report.json
DVC_TIMEOUT_S = 900  # seconds for one dvc command (a big push on a slow link)


class DataSyncError(RuntimeError):
    """A dvc command or the lock transfer failed; the message has DVC's own last lines."""


def enabled(cfg: Config) -> bool:
    return cfg.services.dvc_remote is not None


def _dvc(repo: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=DVC_TIMEOUT_S)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise DataSyncError(f"dvc {' '.join(args)} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _lock_url(cfg: Config) -> str:
    return f"{cfg.services.dvc_remote.rstrip('/')}/{LOCK_KEY}"


def _reports_url(cfg: Config, stage: str) -> str:
    return f"{cfg.services.dvc_remote.rstrip('/')}/{REPORTS_KEY}/{cfg.stage_dir(stage).as_posix()}"


def configure(cfg: Config, repo: Path = Path(".")) -> None:
    """Point the local DVC remote `jam` at `services.dvc_remote`.

    Raises:
        DataSyncError: not a DVC repository, or data_dir is not the `data` folder dvc.yaml tracks.
    """
    if not (repo / ".dvc").is_dir() or not (repo / "dvc.yaml").is_file():
        raise DataSyncError(f"services.dvc_remote is set but {repo.resolve()} is not a DVC repository with dvc.yaml")
    if cfg.project.data_dir != Path("data"):
        raise DataSyncError(f"services.dvc_remote needs project.data_dir: data (what dvc.yaml tracks), got "
                            f"{cfg.project.data_dir}")  # fmt: skip
    _dvc(repo, "remote", "add", "--local", "--force", REMOTE, cfg.services.dvc_remote)


def pull(cfg: Config, stages: list[str], repo: Path = Path(".")) -> list[str]:
    """Fetch from the remote the stages of `stages` whose folders this machine lacks. Returns those pulled."""
    missing = [s for s in stages if not (repo / cfg.stage_dir(s)).exists()]
    fs, path = fsspec.core.url_to_fs(_lock_url(cfg))
    if not missing or not fs.exists(path):
        return []
    fs.get_file(path, str(repo / "dvc.lock"))
    _dvc(repo, "pull", "--remote", REMOTE, "--allow-missing", *missing)
    pulled = [s for s in missing if (repo / cfg.stage_dir(s)).exists()]
    for stage in pulled:
        _, root = fsspec.core.url_to_fs(_reports_url(cfg, stage))
        fs.invalidate_cache(root)  # another machine pushed since this process last looked
        for key in fs.find(root):
            dest = repo / cfg.stage_dir(stage) / key[len(root) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(dest))
    return pulled


def push(cfg: Config, stage: str, repo: Path = Path(".")) -> None:
    """Record `stage`'s outputs in dvc.lock, push them and the stage's reports, then upload dvc.lock (last: it names
    what was pushed)."""
    _dvc(repo, "commit", "--force", "--quiet", stage)
    _dvc(repo, "push", "--remote", REMOTE, "--quiet", stage)
    fs, root = fsspec.core.url_to_fs(_reports_url(cfg, stage))
    folder = repo / cfg.stage_dir(stage)
    for report in sorted(folder.rglob(REPORT_NAME)):
        fs.put_file(str(report), f"{root}/{report.relative_to(folder).as_posix()}")
    fs, path = fsspec.core.url_to_fs(_lock_url(cfg))
    fs.put_file(str(repo / "dvc.lock"), path)
