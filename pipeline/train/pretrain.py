"""Stage `pretrain`: the base decoder, trained on the base corpus windows or taken from a local folder.

Output `data/pretrain/`: a model bundle without adapters (bundle.json, tokenizer.json, base/), report.json and
config.json; checkpoints under `checkpoint.dir`. The MLflow run is tagged `jam.role=base`.
Run: `jam train --stage pretrain [--fresh]` or `python -m pipeline.train --stage pretrain [--fresh]`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core import constants as C
from pipeline.core.config import Config, section_json
from pipeline.core.files import sha256_file, sha256_text
from pipeline.core.items import StageReport
from pipeline.registry.client import mlflow_client
from pipeline.registry.tracking import RunTracker, finish_run, run_name, run_tags
from pipeline.train.common import bundle_meta, fit_exclusive, result_stats, tokenize_inputs, train_job, up_to_date
from pipeline.train.dataset import TrainInputError, check_windows
from pipeline.train.loop import loop_fingerprint
from pipeline.train.model import Vocab, build_base, check_tokenizer_files, check_vocab
from realtime.bundle_format import BUNDLE_FILE, TOKENIZER_FILE, BundleError, read_bundle, write_bundle

STAGE = "pretrain"
ROLE = "base"


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
    tracker = RunTracker(cfg, run_tags(ROLE, tokenizer), cfg.pretrain.system_metrics, run_name(STAGE, fingerprint))
    build = lambda device: build_base(cfg.model, vocab, cfg.tokenize.max_seq_len).to(device)  # noqa: E731
    job = train_job(cfg, STAGE, build, corpus, vocab, n_valid, fingerprint, fresh, tracker)
    result = fit_exclusive(job, cfg.checkpoint.lease_s)
    if result.accelerator.is_main_process:
        write_bundle(out_dir, result.model, tokenizer, {}, **bundle_meta(cfg, result, tokenizer))
        finish_run(mlflow_client(cfg, create=True), result.run_id, cfg, out_dir, out_dir)
        job.tracker.close()
    report.stats = result_stats(result, fingerprint, n_valid)
    return report.finish(out_dir, section_json(cfg.pretrain))


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
    write_bundle(out_dir, base_dir, tokenizer, {}, **bundle_meta(cfg, None, tokenizer, base_path=str(src.resolve())))
    report.stats = {"base_path": str(src.resolve()), "complete": True}
    return report.finish(out_dir, section_json(cfg.pretrain))
