"""What the two training stages share: their inputs from the tokenize stage, the job, the report, bundle.json."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.core import constants as C
from pipeline.core.config import Config
from pipeline.core.files import read_json
from pipeline.core.items import StageReport
from pipeline.registry.tracking import RunTracker
from pipeline.train.checkpoint import store_for
from pipeline.train.dataset import TokenWindows, TrainInputError, dataset_info, with_replay
from pipeline.train.lease import exclusive
from pipeline.train.loop import TrainJob, TrainResult, fit
from pipeline.train.model import Vocab
from realtime.bundle_format import BUNDLE_FILE, TOKENIZER_FILE


def tokenize_inputs(tok_dir: Path) -> tuple[Vocab, Path]:
    """The tokenizer's vocabulary and tokenizer.json from the tokenize stage.

    Raises:
        TrainInputError: the tokenize stage has not run.
    """
    try:
        vocab = Vocab.from_info(dataset_info(tok_dir))
    except (FileNotFoundError, ValueError) as err:
        raise TrainInputError(f"{err} (`jam stage tokenize`)") from None
    tokenizer = tok_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise TrainInputError(f"missing {tokenizer}: run `jam stage tokenize` first")
    return vocab, tokenizer


def up_to_date(stage: str, out_dir: Path, fingerprint: str, bundle_dir: Path) -> StageReport | None:
    """The previous report when it finished training with this fingerprint and its bundle is still there."""
    report = read_json(out_dir / C.REPORT_NAME) or {}
    stats = report.get("stats", {})
    if stats.get("fingerprint") == fingerprint and stats.get("complete") and (bundle_dir / BUNDLE_FILE).is_file():
        done = StageReport.load(out_dir, processed=[], cached=[stage])
        return done.finish(out_dir)  # the report says what this run did: nothing
    return None


def bundle_meta(cfg: Config, result: TrainResult | None, tokenizer: Path, **extra: object) -> dict[str, object]:
    """bundle.json keys besides the layout: playback defaults, the run, its step and final metrics, the config.

    `max_note_beats` and `max_polyphony` (the note-ending and polyphony rules' limits) are the tokenize report's
    quantiles of the training corpus's note lengths and of the notes sounding at an onset, read beside `tokenizer`
    (each left out when that report predates it: the runner's default applies).
    """
    done = {"source_run_id": result.run_id, "step": result.step, "metrics": result.metrics} if result else {}
    stats = (read_json(tokenizer.parent / C.REPORT_NAME) or {}).get("stats") or {}
    limits = {"max_note_beats": (stats.get("note_lengths") or {}).get("max_note_beats"),
              "max_polyphony": (stats.get("polyphony") or {}).get("max_polyphony")}  # fmt: skip
    note = {k: v for k, v in limits.items() if v}
    return {"tempo_bpm": cfg.finetune.tempo_bpm, "max_seq_len": cfg.tokenize.max_seq_len, "source_run_id": "",
            **note, "config": cfg.model_dump(mode="json"), **done, **extra}  # fmt: skip


def train_job(
    cfg: Config,
    stage: str,
    build_model: Callable[[torch.device], torch.nn.Module],
    corpus: Path,
    vocab: Vocab,
    n_valid: int,
    fingerprint: str,
    fresh: bool,
    tracker: RunTracker,
    adapter_only: bool = False,
    replay: tuple[Path, float] | None = None,
) -> TrainJob:
    """The loop's job for `stage` on `corpus/{train,valid}.npy` (no validation when `n_valid` is 0).

    `replay` = (another corpus, share): that share of the training windows comes from its train.npy (`with_replay`).
    """
    train = TokenWindows(corpus / "train.npy", vocab.pad_id)
    if replay is not None:
        base = TokenWindows(replay[0] / "train.npy", vocab.pad_id)
        train = with_replay(train, base, replay[1], cfg.project.seed)
    return TrainJob(
        build_model=build_model,
        train_ds=train,
        valid_ds=TokenWindows(corpus / "valid.npy", vocab.pad_id) if n_valid else None,
        loop=getattr(cfg, stage),
        store=store_for(cfg, stage, fingerprint),
        seed=cfg.project.seed,
        fingerprint=fingerprint,
        every_steps=cfg.checkpoint.every_steps,
        every_s=cfg.checkpoint.every_s,
        fresh=fresh,
        tracker=tracker,
        adapter_only=adapter_only,
    )


def result_stats(result: TrainResult, fingerprint: str, n_valid: int) -> dict[str, Any]:
    """The training report's stats; `complete` + `fingerprint` let a re-run skip (`up_to_date`)."""
    return {"run_id": result.run_id, "steps": result.step, "resumed_from": result.resumed_from,
            "fingerprint": fingerprint, "complete": True, "valid_windows": n_valid, **result.metrics}  # fmt: skip


def fit_exclusive(job: TrainJob, lease_s: float) -> TrainResult:
    """`fit` while holding the lease of the job's checkpoint store (lease.py): one trainer per fingerprint.

    Of several processes (torchrun, accelerate) the main one holds it for all: it alone publishes checkpoints.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return fit(job)
    what = f"{job.store.url} (fingerprint {job.fingerprint[:16]})"
    with exclusive(job.store, what, lease_s=lease_s, renew_s=lease_s / 4):
        return fit(job)
