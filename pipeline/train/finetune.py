"""Stage `finetune`: QLoRA per style (base frozen in 4-bit NF4, one LoRA adapter per style on the shared base).

Input: the base bundle in `data/pretrain/` and each style's windows `data/tokenize/style/<style>/{train,valid}.npy`.
Output per style: `data/finetune/<style>/bundle/` (base/, tokenizer.json, adapters/<style>/) and its report.json;
its own MLflow run (tags jam.role=finetune, jam.style, jam.base_run_id or jam.base_path) gets that bundle as artifact
`bundle`, so styles train, resume, compare and evaluate independently. Then `data/finetune/bundle/` holds the base
and every style's adapter (the first style is the default): what `jam play --model data/finetune/bundle -a NAME`
and blends play. Checkpoints hold only the adapter (plus optimizer, scheduler, RNG and data position).

Run: `jam train --stage finetune [--fresh]`, `python -m pipeline.train --stage finetune [--fresh]`, or on several
GPUs `accelerate launch -m pipeline.train --stage finetune`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from pipeline.core.config import Config, section_json
from pipeline.core.files import sha256_file, sha256_text, windows_dir
from pipeline.core.items import StageReport
from pipeline.core.training import FinetuneConfig
from pipeline.registry.client import mlflow_client
from pipeline.registry.tracking import (
    BASE_PATH_TAG,
    BASE_RUN_TAG,
    STYLE_TAG,
    RunTracker,
    finish_run,
    run_name,
    run_tags,
)
from pipeline.train.common import bundle_meta, fit_exclusive, result_stats, tokenize_inputs, train_job, up_to_date
from pipeline.train.dataset import TrainInputError, check_windows
from pipeline.train.loop import TrainResult, loop_fingerprint
from pipeline.train.model import Vocab, add_lora, check_tokenizer_files, check_vocab, load_base
from realtime.bundle_format import BundleError, combine_bundles, read_bundle, write_bundle

STAGE = "finetune"
ROLE = "finetune"
BUNDLE_DIR = "bundle"


def base_inputs(src: Path, vocab: Vocab, tokenizer: Path) -> tuple[Path, dict]:
    """The pretrain bundle's base folder and bundle.json, checked against the tokenizer the data was made with.

    Raises:
        TrainInputError: no base bundle yet.
        VocabMismatch: base and tokenizer disagree.
    """
    try:
        info = read_bundle(src)
    except BundleError as err:
        raise TrainInputError(f"no usable base model bundle ({err}): run `jam train --stage pretrain` first") from None
    from transformers import AutoConfig

    check_tokenizer_files(src / info["tokenizer"], tokenizer)
    check_vocab(AutoConfig.from_pretrained(src / info["base"]), vocab, f"base in {src}")
    return src / info["base"], info


def qlora_model(base_dir: Path, fc: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    """The base loaded as `finetune.quantization` on `device`, frozen, with a fresh LoRA adapter."""
    return add_lora(load_base(base_dir, fc.quantization, fc.double_quant, fc.compute_dtype, device), fc)


def _check_runtime(cfg: Config) -> None:
    fc = cfg.finetune
    if fc.compute_dtype == "float16" and fc.quantization != "none" and not torch.cuda.is_available():
        raise TrainInputError("finetune.compute_dtype float16 needs CUDA; use float32 or bfloat16 on CPU")


def _base_tags(info: dict) -> dict[str, str]:
    if info.get("base_path"):
        return {BASE_PATH_TAG: info["base_path"]}
    return {BASE_RUN_TAG: info.get("source_run_id", "")}


def run_finetune(cfg: Config, inputs: dict[str, Path], out_dir: Path, fresh: bool = False) -> StageReport:
    """Fine-tune (or resume fine-tuning) one LoRA adapter per style, then write the bundle holding them all.

    Args:
        cfg: resolved config (`styles`, `finetune`, `checkpoint`, `project`).
        fresh: discard checkpoints and start new MLflow runs.

    Raises:
        TrainInputError: missing/empty data or base, impossible params (batch larger than the data...).
        VocabMismatch: base and tokenizer disagree.
        Preempted: stopped by SIGTERM after a checkpoint (re-run to resume; finished styles are not redone).
        CheckpointError: checkpoints could not be written or read.
    """
    report = StageReport(stage=STAGE, items_in=len(cfg.styles))
    vocab, tokenizer = tokenize_inputs(inputs["tokenize"])
    base_dir, info = base_inputs(inputs["pretrain"], vocab, tokenizer)
    _check_runtime(cfg)
    for style in cfg.styles:
        done = finetune_style(cfg, style, inputs, out_dir / style, vocab, (base_dir, info, tokenizer), fresh)
        (report.processed if done.processed else report.cached).append(style)
        report.stats[style] = done.stats
    if _is_main():
        bundles = {style: out_dir / style / BUNDLE_DIR for style in cfg.styles}
        combine_bundles(out_dir / BUNDLE_DIR, bundles, tempo_bpm=cfg.finetune.tempo_bpm)
    report.outputs = len(cfg.styles) + 1
    return report.finish(out_dir, section_json(cfg.finetune))


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def finetune_style(
    cfg: Config, style: str, inputs: dict[str, Path], out_dir: Path, vocab: Vocab, base: tuple, fresh: bool
) -> StageReport:
    """One style's adapter: trained (or resumed, or found up to date) into `out_dir/bundle` and its MLflow run."""
    fc = cfg.finetune
    base_dir, info, tokenizer = base
    report = StageReport(stage=f"{STAGE}/{style}", processed=[style], outputs=1)
    corpus = windows_dir(inputs["tokenize"], style)
    n_train = check_windows(corpus / "train.npy", vocab.size, cfg.tokenize.max_seq_len)
    n_valid = check_windows(corpus / "valid.npy", vocab.size, cfg.tokenize.max_seq_len, required=False)
    weights = sorted(base_dir.glob("*.safetensors"))
    replay = (windows_dir(inputs["tokenize"]), fc.replay) if fc.replay > 0 else None
    replayed = [sha256_file(replay[0] / "train.npy")] if replay else []
    fingerprint = sha256_text(
        loop_fingerprint(fc), str(cfg.project.seed), sha256_file(corpus / "train.npy"), sha256_file(tokenizer),
        *(sha256_file(w) for w in weights), *replayed,
    )  # fmt: skip
    if not fresh and (done := up_to_date(STAGE, out_dir, fingerprint, out_dir / BUNDLE_DIR)) is not None:
        return done
    name = run_name(STAGE, fingerprint, style, f"r{fc.lora_r}")
    tags = run_tags(ROLE, tokenizer, **_base_tags(info), **{STYLE_TAG: style})
    tracker = RunTracker(cfg, tags, fc.system_metrics, name)
    build = functools.partial(qlora_model, base_dir, fc)
    job = train_job(cfg, STAGE, build, corpus, vocab, n_valid, fingerprint, fresh, tracker, True, replay)
    result = fit_exclusive(job, cfg.checkpoint.lease_s)
    report.items_in = n_train
    if result.accelerator.is_main_process:
        export_bundle(result, out_dir / BUNDLE_DIR, base_dir, tokenizer, cfg, info, style)
        finish_run(mlflow_client(cfg, create=True), result.run_id, cfg, out_dir / BUNDLE_DIR, out_dir)
        job.tracker.close()
    report.stats = result_stats(result, fingerprint, n_valid)
    return report.finish(out_dir, section_json(fc))


def export_bundle(
    result: TrainResult, dest: Path, base_dir: Path, tokenizer: Path, cfg: Config, info: dict, style: str
) -> Path:
    """Write one style's fine-tuned bundle: the full-precision base, the tokenizer, the adapter in peft format.

    The adapter was trained against the 4-bit base; the bundle ships the base unquantized so the runner can load it
    in whatever precision it likes (standard QLoRA practice; the quantization error is small next to the adapter).
    """
    base_ref = {"run_id": info.get("source_run_id", ""), "path": info.get("base_path", "")}
    meta = bundle_meta(cfg, result, tokenizer, base_ref=base_ref, style=style)
    write_bundle(dest, base_dir, tokenizer, {style: result.model}, **meta)
    return dest
