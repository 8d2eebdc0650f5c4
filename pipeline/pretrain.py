"""Stage `pretrain`: the base decoder, trained on the base corpus windows or taken from a local folder.

Output `data/pretrain/`: a model bundle without adapters (bundle.json, tokenizer.json, base/), report.json and
config.json; checkpoints under `checkpoint.dir`. The MLflow run is tagged `jam.role=base`.
Run: `jam train --stage pretrain [--fresh]` or `python -m pipeline.pretrain [--fresh]`.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import constants as C
from pipeline.checkpoint import CheckpointError, Preempted, store_for
from pipeline.config import Config, ConfigError, section_json
from pipeline.dataset import TokenWindows, dataset_info
from pipeline.files import StageReport, read_json, sha256_file, sha256_text
from pipeline.model import (
    BUNDLE_FILE,
    TOKENIZER_FILE,
    Vocab,
    VocabMismatch,
    build_base,
    check_tokenizer_files,
    check_vocab,
    read_bundle,
    write_bundle,
)
from pipeline.tracking import RunTracker, client_for, finish_run, run_tags
from pipeline.train import TrainInputError, TrainJob, check_windows, fit, loop_fingerprint

STAGE = "pretrain"
ROLE = "base"


def tokenize_inputs(cfg: Config) -> tuple[Vocab, Path]:
    """The tokenizer's vocabulary and tokenizer.json from the tokenize stage.

    Raises:
        TrainInputError: the tokenize stage has not run.
    """
    tok_dir = cfg.stage_dir("tokenize")
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


def run_pretrain(cfg: Config, fresh: bool = False) -> StageReport:
    """Train (or resume training) the base model and write its bundle to `data/pretrain/`.

    Args:
        cfg: resolved config (`model`, `pretrain`, `checkpoint`, `tokenize.max_seq_len`).
        fresh: discard checkpoints and start a new MLflow run.

    Raises:
        TrainInputError: missing/empty data, tokenizer mismatch, impossible params.
        Preempted: stopped by SIGTERM after a checkpoint (re-run to resume).
        CheckpointError: checkpoints could not be written or read.
    """
    out_dir, report = cfg.stage_dir(STAGE), StageReport(stage=STAGE, processed=[ROLE], outputs=1)
    vocab, tokenizer = tokenize_inputs(cfg)
    if cfg.pretrain.source == "path":
        return _from_path(cfg, vocab, tokenizer, report)
    corpus = cfg.stage_dir("tokenize") / C.BASE
    n_train = check_windows(corpus / "train.npy", vocab.size, cfg.tokenize.max_seq_len)
    n_valid = check_windows(corpus / "valid.npy", vocab.size, cfg.tokenize.max_seq_len, required=False)
    fingerprint = sha256_text(
        section_json(cfg.model), loop_fingerprint(cfg.pretrain), str(cfg.project.seed),
        str(cfg.tokenize.max_seq_len), sha256_file(corpus / "train.npy"), sha256_file(tokenizer),
    )  # fmt: skip
    if not fresh and (done := up_to_date(STAGE, out_dir, fingerprint, out_dir)) is not None:
        return done
    report.items_in = n_train
    job = TrainJob(
        build_model=lambda device: build_base(cfg.model, vocab, cfg.tokenize.max_seq_len).to(device),
        train_ds=TokenWindows(corpus / "train.npy", vocab.pad_id),
        valid_ds=TokenWindows(corpus / "valid.npy", vocab.pad_id) if n_valid else None,
        loop=cfg.pretrain,
        store=store_for(cfg, STAGE, fingerprint),
        seed=cfg.project.seed,
        fingerprint=fingerprint,
        every_steps=cfg.checkpoint.every_steps,
        every_s=cfg.checkpoint.every_s,
        fresh=fresh,
        tracker=RunTracker(cfg, run_tags(ROLE, tokenizer), cfg.pretrain.system_metrics),
    )
    result = fit(job)
    if result.accelerator.is_main_process:
        base_tmp = out_dir / ".base.new"
        shutil.rmtree(base_tmp, ignore_errors=True)
        result.model.save_pretrained(base_tmp)
        write_bundle(out_dir, base_tmp, tokenizer, {}, **bundle_meta(cfg, result.run_id))
        shutil.rmtree(base_tmp, ignore_errors=True)
        finish_run(client_for(cfg), result.run_id, cfg, out_dir, out_dir)
        job.tracker.close()
    report.stats = {"run_id": result.run_id, "steps": result.step, "resumed_from": result.resumed_from,
                    "fingerprint": fingerprint, "complete": True, "valid_windows": n_valid,
                    **result.metrics}  # fmt: skip
    return report.finish(out_dir, section_json(cfg.pretrain))


def bundle_meta(cfg: Config, run_id: str, **extra: object) -> dict[str, object]:
    return {"tempo_bpm": cfg.finetune.tempo_bpm, "max_seq_len": cfg.tokenize.max_seq_len, "source_run_id": run_id,
            **extra}  # fmt: skip


def _from_path(cfg: Config, vocab: Vocab, tokenizer: Path, report: StageReport) -> StageReport:
    """`pretrain.source: path`: check an existing base against the tokenizer and make it this stage's bundle."""
    src = Path(cfg.pretrain.path).expanduser()
    if (src / BUNDLE_FILE).is_file():
        info = read_bundle(src)
        base_dir, src_tok = src / info["base"], src / info["tokenizer"]
    else:
        base_dir, src_tok = src, src / TOKENIZER_FILE
    if not (base_dir / "config.json").is_file() or not src_tok.is_file():
        raise TrainInputError(f"pretrain.path {src}: expected a bundle or a save_pretrained folder + tokenizer.json")
    from transformers import AutoConfig

    check_tokenizer_files(src_tok, tokenizer)
    check_vocab(AutoConfig.from_pretrained(base_dir), vocab, f"pretrain.path {src}")
    out_dir, report.items_in = cfg.stage_dir(STAGE), 1
    write_bundle(out_dir, base_dir, tokenizer, {}, **bundle_meta(cfg, "", base_path=str(src.resolve())))
    report.stats = {"base_path": str(src.resolve()), "complete": True}
    return report.finish(out_dir, section_json(cfg.pretrain))


def configure_logging() -> None:
    """Progress lines (`step 12/120 ...`, `checkpoint step 40 -> ...`) from `pipeline.*` loggers to stderr."""
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def train_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "fix the input", shown as one line (no traceback) by the command lines."""
    return (ConfigError, TrainInputError, CheckpointError, VocabMismatch)


def cli_main(run: Callable[..., StageReport], argv: list[str]) -> int:
    """`python -m pipeline.<stage> [--params P] [--set k=v ...] [--fresh]` (also under `accelerate launch -m`).

    Returns:
        0, 1 (bad input), or `EXIT_PREEMPTED` (checkpointed on SIGTERM; re-run to resume).
    """
    import argparse
    import os

    from pipeline.config import load_config

    parser = argparse.ArgumentParser(prog=f"python -m {run.__module__}", description=run.__doc__.split("\n")[0])
    parser.add_argument("--params", "-p", default="params.yaml", help="params file (YAML)")
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--fresh", action="store_true", help="discard checkpoints and start a new MLflow run")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # mlflow is imported later; nothing asks a hub
    configure_logging()
    try:
        report = run(load_config(args.params, args.overrides), fresh=args.fresh)
    except Preempted as err:
        print(err, file=sys.stderr)
        return C.EXIT_PREEMPTED
    except train_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    sys.exit(cli_main(run_pretrain, sys.argv[1:]))
