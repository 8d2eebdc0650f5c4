"""Load a promoted model bundle and prepare it for fast inference.

The folder format (bundle.json, tokenizer.json, base/, adapters/<name>/) and its reader are `realtime.bundle_format`.
`load_weights` reads the base's config and weights and folds the chosen adapters in (one adapter, or a weighted
blend) without transformers; `load_bundle` builds the runner's forward over them (`realtime.llama.LeanLlama`: the
inference dtype, optional int8 projections, the device). `load_model` is the same merge as a transformers model, for
what needs one (evaluation's likelihoods); the forward computes its logits (tests/realtime/test_llama.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from realtime import constants as C
from realtime.bundle_format import MODEL_CONFIG, BundleError, load_tokenizer, read_bundle
from realtime.llama import LeanLlama, UnsupportedModel
from realtime.lora import UnsupportedAdapter, fold_adapters, merge_adapters, peft_merge

BASE_WEIGHTS = "model.safetensors"  # transformers' single-file weights in a save_pretrained folder


@dataclass
class Bundle:
    """A model ready for streaming inference plus everything needed to talk to it."""

    model: LeanLlama
    tokenizer: Any  # miditok.MusicTokenizer
    meta: dict
    path: Path
    device: torch.device
    adapters: dict[str, float] = field(default_factory=dict)  # adapter name -> weight folded in
    max_seq_len: int = 256
    tempo_bpm: float = C.DEFAULT_TEMPO_BPM
    load_s: float = 0.0  # seconds from load_bundle call to ready

    def describe(self) -> str:
        """One line: where from, which adapters, size, device."""
        params = self.model.params / 1e6
        blend = ", ".join(f"{n}x{w:g}" for n, w in self.adapters.items()) or "base only"
        return f"{self.path} [{blend}] {params:.2f}M params on {self.device}, loaded in {self.load_s:.2f}s"


# ---------------------------------------------------------------- locate


def resolve_bundle(ref: str | Path, tracking_uri: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local folder holding bundle.json for a folder path or a `models:/<name>@<alias>` registry URI.

    Args:
        ref: bundle folder, or `models:/name@alias` / `models:/name/version` resolved in the MLflow registry.
        tracking_uri: MLflow tracking (and registry) URI, e.g. `sqlite:///mlruns/mlflow.db`. Local stores only.
        cache_dir: where registry copies are kept, one per model version (default: `resolve.model_cache_dir()`).

    Raises:
        BundleError: no such folder, registry entry or bundle.json.
    """
    text = str(ref)
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        read_bundle(path)
        return path
    if tracking_uri is None:
        raise BundleError(f"{text}: a tracking URI is needed to resolve registry models")
    from realtime.resolve import resolve_models_uri

    return resolve_models_uri(text, tracking_uri, cache_dir)


def check_streaming(tokenizer, path: Path) -> None:
    """Streaming needs a tokenizer whose events come in wire order (MIDILike).

    Raises:
        BundleError: another kind (TSD, REMI...): a note's duration would be needed at its onset.
    """
    kind = type(tokenizer).__name__
    if kind not in C.STREAMING_TOKENIZERS:
        raise BundleError(f"{path}: tokenizer kind {kind!r} cannot stream; use one of {C.STREAMING_TOKENIZERS}")


def adapter_plan(meta: dict, adapters: dict[str, float] | None, normalize: bool) -> dict[str, float]:
    """Which adapters to fold in and with what weight.

    Args:
        meta: bundle.json.
        adapters: None = the bundle's default adapter at weight 1; {} = base model only; {name: weight} = blend.
        normalize: divide weights by their sum, so a blend keeps one fine-tune's strength.
    """
    available = meta.get("adapters") or {}
    if adapters is None:
        default = meta.get("default_adapter")
        return {default: 1.0} if default else {}
    missing = sorted(set(adapters) - set(available))
    if missing:
        raise BundleError(f"adapters {missing} not in the bundle (has: {sorted(available) or 'none'})")
    if adapters and not any(w > 0 for w in adapters.values()):
        raise BundleError(f"adapter weights {adapters} are all zero or negative: give one a weight > 0, or 'none'")
    plan = {name: float(w) for name, w in adapters.items() if w != 0}
    total = sum(plan.values())
    if normalize and plan:
        if total <= 0:
            raise BundleError(f"adapter weights {plan} must sum to > 0 to be normalized")
        plan = {name: w / total for name, w in plan.items()}
    return plan


def note_limits(
    meta: dict[str, Any], max_note_beats: float | None = None, max_polyphony: int | None = None
) -> tuple[float, int | None]:
    """The note rules' limits for a bundle: (beats a model note may sound, model notes sounding at once or None).

    Each is the override where given (`realtime.max_note_beats` / `max_polyphony`), else bundle.json's (the training
    corpus's quantiles), else DEFAULT_MAX_NOTE_BEATS / no limit. The runner and evaluation both ask here.
    """
    beats = max_note_beats or meta.get("max_note_beats") or C.DEFAULT_MAX_NOTE_BEATS
    poly = max_polyphony or meta.get("max_polyphony")
    return float(beats), (int(poly) if poly else None)


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise BundleError("device 'cuda' requested but CUDA is not available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _hf_base(base_dir: Path) -> torch.nn.Module:
    """The base as a transformers model in float32 on CPU (evaluation, and weights in other layouts)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32).eval()


def _read_base(base_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and float32 weights of a save_pretrained folder (one safetensors file; else via transformers)."""
    config = json.loads((base_dir / MODEL_CONFIG).read_text())
    if not (base_dir / BASE_WEIGHTS).is_file():
        return config, dict(_hf_base(base_dir).state_dict())
    from safetensors.torch import load_file

    weights = load_file(str(base_dir / BASE_WEIGHTS))
    return config, {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def load_weights(path: Path, plan: dict[str, float]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A bundle's base config and float32 state dict with the `plan`'s adapters folded in (see `adapter_plan`).

    The direct fold needs no transformers; adapters it cannot fold (DoRA...) go through peft on a transformers model.
    """
    meta = read_bundle(path)
    config, weights = _read_base(path / meta["base"])
    adapters = [(w, path / meta["adapters"][name]) for name, w in plan.items()]
    if adapters:
        try:
            fold_adapters(weights, adapters)
        except UnsupportedAdapter:
            weights = dict(peft_merge(_hf_base(path / meta["base"]), adapters).state_dict())
    return config, weights


def cached_weights(path: Path, plan: dict[str, float], cache: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`load_weights`, kept in `cache` as one safetensors file per adapter plan (registry copies: they never change).

    Saves the fold at later starts; a tied output head is not stored (it is the embedding).
    """
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps(sorted(plan.items())).encode()).hexdigest()[:16]
    file = cache / f"{key}.safetensors"
    if file.is_file():
        config = json.loads((path / read_bundle(path)["base"] / MODEL_CONFIG).read_text())
        return config, load_file(str(file))
    config, weights = load_weights(path, plan)
    tied = config.get("tie_word_embeddings", True)
    keep = {k: v.contiguous() for k, v in weights.items() if not (tied and k == "lm_head.weight")}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}")
    save_file(keep, str(tmp))
    os.replace(tmp, file)  # a reader never sees half a file
    return config, weights


def load_model(path: Path, adapters: dict[str, float] | None = None, normalize: bool = True) -> torch.nn.Module:
    """A bundle folder's base as a transformers model in float32 on CPU with the planned adapters folded in, in
    eval mode: a plain causal LM, no adapter wrappers (evaluation's likelihoods; `load_bundle` plays the same).

    Args:
        path: local bundle folder.
        adapters: see `adapter_plan` (None: the bundle's default adapter).
        normalize: normalize blend weights to sum 1.
    """
    meta = read_bundle(path)
    plan = adapter_plan(meta, adapters, normalize)
    model = _hf_base(path / meta["base"])
    if plan:
        model = merge_adapters(model, [(w, path / meta["adapters"][name]) for name, w in plan.items()])
    return model.eval()


def load_bundle(
    ref: str | Path,
    adapters: dict[str, float] | None = None,
    normalize: bool = True,
    dtype: str = "float32",
    quantization: str = "none",
    device: str = "auto",
    tracking_uri: str | None = None,
    cache_dir: Path | None = None,
) -> Bundle:
    """Resolve, load and prepare a bundle for streaming inference.

    Args:
        ref: bundle folder or `models:/<name>@<alias>`.
        adapters: see `adapter_plan`.
        normalize: normalize blend weights to sum 1.
        dtype: float32, bfloat16 or float16 weights.
        quantization: "none" or "dynamic_int8" (CPU: int8 projections, not exact).
        device: auto, cpu or cuda.
        tracking_uri: MLflow store for registry URIs.
        cache_dir: where registry copies (and their merged weights) are kept; see `resolve_bundle`.
    """
    started = time.perf_counter()
    path = resolve_bundle(ref, tracking_uri, cache_dir)
    meta = read_bundle(path)
    plan = adapter_plan(meta, adapters, normalize)
    tokenizer = load_tokenizer(path / meta["tokenizer"])
    check_streaming(tokenizer, path / meta["tokenizer"])
    target = pick_device(device)
    if quantization == "dynamic_int8" and target.type != "cpu":
        raise BundleError("quantization 'dynamic_int8' runs on CPU only")
    registry_copy = str(ref).startswith("models:/")  # ours to write into; a user's folder is not
    config, weights = cached_weights(path, plan, path / C.MERGED_DIR) if registry_copy else load_weights(path, plan)
    try:
        model = LeanLlama.from_state_dict(config, weights, getattr(torch, dtype), target, quantization)
    except UnsupportedModel as err:
        raise BundleError(f"{path / meta['base']}: the runner's forward does not compute this model ({err})") from None
    max_len = min(int(meta.get("max_seq_len") or 10**9), model.shape.max_positions)
    return Bundle(
        model=model,
        tokenizer=tokenizer,
        meta=meta,
        path=path,
        device=target,
        adapters=plan,
        max_seq_len=max_len,
        tempo_bpm=float(meta.get("tempo_bpm") or C.DEFAULT_TEMPO_BPM),
        load_s=time.perf_counter() - started,
    )
