"""LoRA adapters folded into the base weights, with no adapter layers left at inference time.

A LoRA adapter adds `scale * B @ A` to a Linear weight (`scale = alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
A weighted blend of adapters is the weighted sum of those deltas: `W' = W + sum_i w_i * scale_i * B_i @ A_i`.
That is exactly what peft computes with `add_weighted_adapter(..., combination_type="cat")` followed by
`merge_and_unload()`, but done here from the adapter files directly, with no wrapper modules.

peft trainable tokens (`finetune.train_embeddings`: `trainable_token_indices`) store the new embedding rows, which
peft's merge writes over the base's (`index_copy`); here they become the delta `new_rows - base_rows`, so one
adapter at weight 1 gives peft's rows exactly and a blend mixes them like the LoRA deltas. A tied output layer shares
the embedding's weight, so it follows.

Why this path rather than always peft's merge: start-up. The fold works on a state dict read from disk
(`fold_adapters`, what `realtime.bundle.load_weights` does for the runner: no transformers, no peft import) or on a
transformers model (`merge_adapters`, for evaluation); peft's route imports bitsandbytes, then wraps and unwraps
every targeted layer (4.5-4.7 s of a 2-core start at demo size). The fold is ~40 lines, checked against peft's merge
on a bundle exported by the real training stages (tests/pipeline/train/test_export.py).
Adapters it does not understand (DoRA, modules_to_save, bias training, embedding or conv LoRA) go through peft
itself (`peft_merge`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # peft's key of the trained embedding rows


class UnsupportedAdapter(ValueError):
    """An adapter the direct merge cannot fold exactly; the caller falls back to peft."""


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module name suffix (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_supported(cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        problems.append("DoRA")
    if cfg.get("modules_to_save"):
        problems.append("modules_to_save")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append("trained biases")
    if cfg.get("layer_replication"):
        problems.append("layer replication")
    odd = [k for k in tensors if not k.endswith((A_SUFFIX, B_SUFFIX, TOKENS_SUFFIX))]
    if odd:
        problems.append(f"non-Linear LoRA tensors ({odd[0]})")
    if problems:
        raise UnsupportedAdapter(", ".join(problems))


def _load_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        path = adapter_dir / name
        if path.exists():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{adapter_dir}: no {' or '.join(ADAPTER_WEIGHTS)}")


def _weights_of(base: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A model's weights by state-dict name; a module's state dict shares its parameters' storage."""
    return base.state_dict() if isinstance(base, torch.nn.Module) else base


def adapter_deltas(
    adapter_dir: Path | str, base: torch.nn.Module | Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Weight deltas of one saved LoRA adapter, keyed by the base model's module path.

    Args:
        adapter_dir: folder with adapter_config.json and adapter_model.safetensors (peft's save_pretrained).
        base: the model (or its state dict) the adapter will be folded into; needed only for trainable-token rows
            (their delta is relative to the base's rows).

    Returns:
        `{"model.layers.0.self_attn.q_proj": delta}`, each delta of the weight's shape: (out, in) float32 for a
        Linear, (vocab, hidden) float64 for trainable-token rows.

    Raises:
        UnsupportedAdapter: the adapter needs peft to merge (see module docstring).
    """
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = _load_tensors(adapter_dir)
    _check_supported(cfg, tensors)
    deltas: dict[str, torch.Tensor] = {}
    for key, a in tensors.items():
        if key.endswith(TOKENS_SUFFIX):
            module = key.removesuffix(TOKENS_SUFFIX).removeprefix(PEFT_PREFIX)
            deltas[module] = _token_delta(cfg, module, a, None if base is None else _weights_of(base))
        if not key.endswith(A_SUFFIX):
            continue
        stem = key.removesuffix(A_SUFFIX)
        b = tensors[stem + B_SUFFIX]  # (out, r) @ (r, in)
        module = stem.removeprefix(PEFT_PREFIX)
        rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", a.shape[0]))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        delta = (b.float() @ a.float()) * scale
        deltas[module] = delta.T if cfg.get("fan_in_fan_out") else delta
    return deltas


def _token_delta(
    cfg: dict, module: str, rows: torch.Tensor, weights: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    """Dense (vocab, hidden) delta that turns the base's rows at the trained indices into `rows`."""
    spec = cfg.get("trainable_token_indices")
    indices = spec if isinstance(spec, list) else _pattern_value(spec or {}, module, None)
    if indices is None or len(indices) != rows.shape[0]:
        raise UnsupportedAdapter(f"trainable tokens of {module}: indices do not match the stored rows")
    if weights is None:
        raise ValueError(f"{module}: trainable-token rows need the base model to form their delta")
    weight = weights[f"{module}.weight"].detach()
    index = torch.as_tensor(indices, dtype=torch.long)
    delta = torch.zeros(weight.shape, dtype=torch.float64)  # float64: base + (rows - base) rounds back to rows
    delta[index] = rows.double() - weight[index].double()
    return delta


def blend_deltas(weighted: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Weighted sum of adapters' deltas: `sum_i w_i * delta_i` per module (modules missing in one count as 0)."""
    out: dict[str, torch.Tensor] = {}
    for weight, deltas in weighted:
        for module, delta in deltas.items():
            out[module] = out[module] + weight * delta if module in out else weight * delta
    return out


def apply_deltas(base: torch.nn.Module | Mapping[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> int:
    """Add deltas to the named weights in place (a tied output layer follows its embedding: it is the same tensor,
    or, in a state dict read from disk, absent).

    The sum is taken in float64 and rounded once: for float32 deltas that is float32 addition, for token deltas
    it gives the adapter's rows bit for bit.

    Returns:
        The number of weights changed.
    """
    weights = _weights_of(base)
    with torch.no_grad():
        for module, delta in deltas.items():
            weight = weights[f"{module}.weight"]
            if weight.shape != delta.shape:
                raise ValueError(f"{module}: adapter delta {tuple(delta.shape)} != weight {tuple(weight.shape)}")
            weight.copy_(weight.double() + delta.double())
    return len(deltas)


def fold_adapters(base: torch.nn.Module | Mapping[str, torch.Tensor], adapters: list[tuple[float, Path]]) -> None:
    """Fold `[(weight, adapter_dir), ...]` into `base`'s weights in place (direct path only).

    Raises:
        UnsupportedAdapter: one of the adapters needs peft (`peft_merge`, on a transformers model).
    """
    apply_deltas(base, blend_deltas([(w, adapter_deltas(d, base)) for w, d in adapters]))


def merge_adapters(model: torch.nn.Module, adapters: list[tuple[float, Path]]) -> torch.nn.Module:
    """Fold `[(weight, adapter_dir), ...]` into a transformers `model` (direct path; peft for what it cannot fold).

    Returns:
        The merged model: `model` itself on the direct path, a fresh module from peft otherwise.
    """
    try:
        fold_adapters(model, adapters)
    except UnsupportedAdapter:
        return peft_merge(model, adapters)
    return model


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: not ours to
    fix, and not worth a warning at every start."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def peft_merge(model: torch.nn.Module, adapters: list[tuple[float, Path]]) -> torch.nn.Module:
    """The same fold through peft: load each adapter, `add_weighted_adapter(cat)`, `merge_and_unload()`."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(adapters[0][1]), adapter_name=names[0], is_trainable=False)
    for name, (_, path) in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    weights = [w for w, _ in adapters]
    if len(adapters) > 1 or weights[0] != 1.0:
        peft_model.add_weighted_adapter(names, weights, "blend", combination_type="cat")
        peft_model.set_adapter("blend")
    return peft_model.merge_and_unload()
