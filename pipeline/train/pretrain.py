"""Stage `pretrain`: the base decoder, trained on the base corpus windows or taken from a local folder.

Output `data/pretrain/`: a model bundle without adapters (bundle.json, tokenizer.json, base/), report.json and
config.json; checkpoints under `checkpoint.dir`. The MLflow run is tagged `jam.role=base`.
Run: `jam train --stage pretrain [--fresh]` or `python -m pipeline.train --stage pretrain [--fresh]`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core import constants as C
from pipeline.core.config import Config, section_json
from pipeline.core.files import read_json, sha256_file, sha256_text
from pipeline.core.items import StageReport
from pipeline.registry.client import mlflow_client
from pipeline.registry.tracking import RunTracker, finish_run, run_name, run_tags
from pipeline.train.checkpoint import store_for
from pipeline.train.dataset import TokenWindows, TrainInputError, check_windows, dataset_info
from pipeline.train.loop import TrainJob, TrainResult, fit, loop_fingerprint
from pipeline.train.model import Vocab, build_base, check_tokenizer_files, check_vocab
from realtime.bundle_format import BUNDLE_FILE, TOKENIZER_FILE, BundleError, read_bundle, write_bundle

STAGE = "pretrain"
ROLE = "base"


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


def run_pretrain(cfg: Config, inputs: dict[str, Path], out_dir: Path, fresh: bool = False) -> StageReport:
    """Train (or resume training) the base model and write its bundle to `data/pretrain/`.

    Args:
        cfg: resolved config (`model`, `pretrain`, `checkpoint`, `tokenize.max_seq_len`).
        fresh: discard checkpoints and start a new MLflow run.

    Raises:
        TrainInputError: missing/empty data, tokenizer mismatch, impossible params.
        Preempted: stopped by SIGTERM after a checkpoint (re-run to resume).
        CheckpointError: checkpoints could not be written or read.
    """
    report = StageReport(stage=STAGE, processed=[ROLE], outputs=1)
    vocab, tokenizer = tokenize_inputs(inputs["tokenize"])
    if cfg.pretrain.source == "path":
        return _from_path(cfg, vocab, tokenizer, report, out_dir)
    corpus = inputs["tokenize"] / C.BASE
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
        tracker=RunTracker(cfg, run_tags(ROLE, tokenizer), cfg.pretrain.system_metrics, run_name(STAGE, fingerprint)),
    )
    result = fit(job)
    if result.accelerator.is_main_process:
        write_bundle(out_dir, result.model, tokenizer, {}, **bundle_meta(cfg, result))
        finish_run(mlflow_client(cfg, create=True), result.run_id, cfg, out_dir, out_dir)
        job.tracker.close()
    report.stats = {"run_id": result.run_id, "steps": result.step, "resumed_from": result.resumed_from,
                    "fingerprint": fingerprint, "complete": True, "valid_windows": n_valid,
                    **result.metrics}  # fmt: skip
    return report.finish(out_dir, section_json(cfg.pretrain))


def bundle_meta(cfg: Config, result: TrainResult | None, **extra: object) -> dict[str, object]:
    """bundle.json keys besides the layout: playback defaults, the run, its step and final metrics, the config."""
    done = {"source_run_id": result.run_id, "step": result.step, "metrics": result.metrics} if result else {}
    return {"tempo_bpm": cfg.finetune.tempo_bpm, "max_seq_len": cfg.tokenize.max_seq_len, "source_run_id": "",
            "config": cfg.model_dump(mode="json"), **done, **extra}  # fmt: skip


def _from_path(cfg: Config, vocab: Vocab, tokenizer: Path, report: StageReport, out_dir: Path) -> StageReport:
    """`pretrain.source: path`: check an existing base against the tokenizer and make it this stage's bundle."""
    src = Path(cfg.pretrain.path).expanduser()
    if (src / BUNDLE_FILE).is_file():
        try:
            info = read_bundle(src)
        except BundleError as err:
            raise TrainInputError(f"pretrain.path: {err}") from None
        base_dir, src_tok = src / info["base"], src / info["tokenizer"]
    else:
        base_dir, src_tok = src, src / TOKENIZER_FILE
    if not (base_dir / "config.json").is_file() or not src_tok.is_file():
        raise TrainInputError(f"pretrain.path {src}: expected a bundle or a save_pretrained folder + tokenizer.json")
    from transformers import AutoConfig

    check_tokenizer_files(src_tok, tokenizer)
    check_vocab(AutoConfig.from_pretrained(base_dir), vocab, f"pretrain.path {src}")
    report.items_in = 1
    write_bundle(out_dir, base_dir, tokenizer, {}, **bundle_meta(cfg, None, base_path=str(src.resolve())))
    report.stats = {"base_path": str(src.resolve()), "complete": True}
    return report.finish(out_dir, section_json(cfg.pretrain))
