"""The base decoder, its 4-bit loading and the LoRA adapter.

The base is a small `LlamaForCausalLM` built from `ModelConfig`, so transformers, peft, bitsandbytes and accelerate
all apply unchanged. Training leaves it in a model bundle (`realtime.bundle_format`: the one writer and reader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from pipeline.core.files import sha256_file
from pipeline.core.training import FinetuneConfig, ModelConfig
from realtime.bundle_format import base_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VocabMismatch(ValueError):
    """The base model and the tokenizer (or the token data) disagree about the vocabulary."""


@dataclass(frozen=True)
class Vocab:
    """What the model needs to know about the tokenizer: size and special ids."""

    size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Vocab:
        """From `pipeline.train.dataset.dataset_info(tokenize_dir)`."""
        return cls(int(info["vocab_size"]), int(info["pad_id"]), int(info["bos_id"]), int(info["eos_id"]))


def llama_config(mc: ModelConfig, vocab: Vocab, max_seq_len: int) -> LlamaConfig:
    """The transformers config of the base; `max_seq_len` (tokens) bounds the positions it is trained on."""
    ids = {"pad_id": vocab.pad_id, "bos_id": vocab.bos_id, "eos_id": vocab.eos_id}
    arch = {"hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size,
            "num_hidden_layers": mc.num_layers, "num_attention_heads": mc.num_heads,
            "num_key_value_heads": mc.num_kv_heads or mc.num_heads, "rope_theta": mc.rope_theta,
            "attention_dropout": mc.attention_dropout, "tie_word_embeddings": mc.tie_embeddings}  # fmt: skip
    return base_config(vocab.size, ids, max_seq_len, **arch)


def build_base(mc: ModelConfig, vocab: Vocab, max_seq_len: int) -> LlamaForCausalLM:
    """A freshly initialised base (weights drawn from torch's RNG: seed before calling)."""
    return LlamaForCausalLM(llama_config(mc, vocab, max_seq_len))


def check_vocab(model_config: Any, vocab: Vocab, where: str) -> None:
    """Fail before training when the base's embedding table does not match the tokenizer.

    Raises:
        VocabMismatch: sizes or special ids differ.
    """
    if model_config.vocab_size != vocab.size:
        raise VocabMismatch(
            f"{where}: base model vocab_size {model_config.vocab_size} != tokenizer vocab_size {vocab.size}; "
            "retrain the base on this tokenizer (pretrain.source: pretrain) or re-tokenize with the base's tokenizer"
        )
    if model_config.pad_token_id not in (None, vocab.pad_id):
        raise VocabMismatch(f"{where}: base pad id {model_config.pad_token_id} != tokenizer pad id {vocab.pad_id}")


def check_tokenizer_files(a: Path, b: Path) -> None:
    """Two tokenizer.json files must describe the same tokenizer (same ids for the same tokens).

    Raises:
        VocabMismatch: the files differ in content.
    """
    if sha256_file(a) == sha256_file(b):
        return
    if json.loads(a.read_text()) != json.loads(b.read_text()):
        raise VocabMismatch(f"tokenizer {a} differs from {b}: token ids would mean different things")


def load_base(
    path: Path,
    quantization: str = "none",
    double_quant: bool = True,
    compute_dtype: str = "float32",
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    """Load a saved base, optionally with its Linear layers in 4 bit (bitsandbytes NF4/FP4).

    transformers 5 + bitsandbytes 0.50 quantize on CPU as on CUDA; `device_map` pins every layer to the training
    device, which accelerate requires of a quantized model it is asked to train.

    Args:
        path: folder written by `save_pretrained`.
        quantization: "nf4", "fp4" or "none" (full precision).
        double_quant: also quantize the per-block scales.
        compute_dtype: dtype the 4-bit weights are dequantized to for the matmuls.
        device: where the weights live.
    """
    if quantization == "none":
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map={"": str(device)})
    for module in model.modules():
        # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a 4-bit weight in place, for a bf16 inference kernel, the
        # first time the layer runs in eval mode: validation would then use other numerics than training (and the
        # repack fails for in_features < 64). Training keeps the one dequantize + matmul path.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def add_lora(model: LlamaForCausalLM, fc: FinetuneConfig):
    """Freeze the base and wrap it with a fresh LoRA adapter (A drawn from torch's RNG, B zero).

    Raises:
        ValueError: a target module name matches nothing in the model.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = sorted(set(fc.target_modules) - names)
    if missing:
        raise ValueError(f"finetune.target_modules {missing} are not modules of the base (have e.g. q_proj, v_proj)")
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    extra = {}
    if fc.train_embeddings:
        # The token embedding (tied to the output layer) learns too, as a delta beside the frozen weights: tokens
        # the base rarely saw (a player's own rhythms and dynamics, BPE merges from the style corpus) keep the
        # near-random vectors pretraining left them otherwise, which LoRA on the projections cannot fix.
        extra["trainable_token_indices"] = {"embed_tokens": list(range(model.config.vocab_size))}
    lcfg = LoraConfig(
        r=fc.lora_r,
        lora_alpha=fc.lora_alpha,
        lora_dropout=fc.lora_dropout,
        target_modules=list(fc.target_modules),
        task_type="CAUSAL_LM",
        **extra,
    )
    return get_peft_model(model, lcfg)
