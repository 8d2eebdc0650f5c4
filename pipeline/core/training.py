"""params.yaml's training sections: the base model's shape, its two loops (pretrain, finetune) and checkpoints.

Kept apart from `config.py` (which composes every section and parses params.yaml), as `styles.py` is: these four
describe training, not the data stages. `Config` nests them as `model`, `pretrain`, `finetune` and `checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.core.section import Section


class ModelConfig(Section):
    """The base decoder (a small LlamaForCausalLM); vocabulary and context length come from `tokenize`."""

    hidden_size: int = Field(192, ge=8)  # demo: ~2M parameters, pretrains in ~2-3 min on 2 CPU cores
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(6, ge=1)  # head_dim = hidden_size / num_heads = 32
    num_kv_heads: int | None = Field(None, ge=1)  # grouped-query attention; None = num_heads
    intermediate_size: int = Field(512, ge=8)  # SwiGLU MLP width
    rope_theta: float = Field(10000.0, gt=0)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True  # the output projection reuses the token embedding: fewer parameters

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class LoopConfig(Section):
    """Optimisation shared by pretraining and fine-tuning. One step = batch_size x grad_accum x processes windows."""

    batch_size: int = Field(16, ge=1)  # windows per micro-batch per process
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(1e-3, gt=0)  # peak learning rate, reached after warmup, then cosine decay to 0
    warmup_steps: int = Field(20, ge=0)  # optimizer steps of linear warmup
    max_steps: int = Field(240, ge=1)  # optimizer steps in total
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables clipping
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw_8bit: bitsandbytes 8-bit states (CPU and CUDA)
    # accelerate autocast; auto = bf16 where the device computes it natively (AVX-512 BF16/AMX CPU, Ampere+ GPU),
    # else no (emulated bf16 is slower than fp32); fp16 needs CUDA. Master weights, optimizer, loss stay fp32. The
    # demo's pretrain on an AMD Zen 5, 6 seeds: valid loss in bf16 -1.0 % +- 0.8 % against fp32 (paired by seed),
    # 2.1-2.4x the tokens/s of the fp32 loop (README "Training throughput")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # float32 CPU products (all of them without autocast; the head below with it): auto = oneDNN on CPUs not Intel's
    # (MKL's AVX-512 kernels are Intel-only: ~2x the forward and input-gradient products on an AMD Zen 5), MKL on
    # Intel's (train/compute.py)
    cpu_gemm: Literal["auto", "mkl", "onednn"] = "auto"
    # attention under autocast on a CPU (a GPU keeps torch's kernel in the autocast dtype): "matmul" = batched products
    # in bf16 with the softmax summed in float32 (train/compute.py's matmul_attention: ~2x torch's CPU kernels at the
    # demo's head_dim 32), "float32" = torch's SDPA kernel in float32, "sdpa" = torch's kernel in bf16 (the slowest)
    cpu_attention: Literal["matmul", "float32", "sdpa"] = "matmul"
    # the output head in float32 under autocast on a CPU: the logits, which the loss reads. It kept the demo's
    # pretrain within 1.8 % of fp32 on every seed (without: -8.7 to +1.8 %, the mean no worse) for 5-10 % of its
    # speed; peft's head wrapper (fine-tune) multiplies on MKL: 9-20 % of a step
    fp32_head: bool = False
    eval_every: int = Field(40, ge=1)  # optimizer steps between validation passes (and at the last step)
    eval_windows: int = Field(0, ge=0)  # valid windows scored per pass; 0 = all
    log_every: int = Field(1, ge=1)  # optimizer steps between train_loss/lr/tokens_per_s points
    system_metrics: bool = True  # MLflow system/ metrics (CPU, RAM, GPU) sampled every 10 s

    @model_validator(mode="after")
    def _warmup(self) -> LoopConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError("warmup_steps must be smaller than max_steps")
        return self


class PretrainConfig(LoopConfig):
    """The base model: trained here on the base corpus (`source: pretrain`) or taken from a local folder."""

    source: Literal["pretrain", "path"] = "pretrain"
    path: Path | None = None  # `source: path`: a bundle (bundle.json) or HF folder with config.json + tokenizer.json

    @model_validator(mode="after")
    def _path_for_path(self) -> PretrainConfig:
        if self.source == "path" and self.path is None:
            raise ValueError("path is required when source is 'path'")
        return self


class FinetuneConfig(LoopConfig):
    """QLoRA on the style corpus: the base frozen (4-bit NF4 by default), a LoRA adapter trained."""

    lr: float = Field(2e-3, gt=0)  # LoRA tolerates a higher rate than full training
    warmup_steps: int = Field(10, ge=0)
    # per style; demo (two styles): ~80 s each on 2 CPU cores. At 240 steps the folk adapter forgot +46 % of the
    # base corpus (NLL), at 160 +35 % (classical +23 %), with held-out NLL ratios 0.63 and 0.71
    max_steps: int = Field(160, ge=1)
    eval_every: int = Field(60, ge=1)
    # auto: bf16 where the CPU/GPU computes it natively. Demo with replay, bf16 against fp32 on one base: fine-tune
    # 163 s against 192-266 s (fresh demos), equal test NLL (4.923 / 4.445), forgetting and attribution alike
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    quantization: Literal["nf4", "fp4", "none"] = "nf4"  # base weights in 4 bit (bitsandbytes); none = LoRA on fp32
    double_quant: bool = True  # quantize the 4-bit block scales too (~0.4 bit/weight saved)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype 4-bit weights dequantize to
    lora_r: int = Field(4, ge=1)  # adapter rank
    lora_alpha: float = Field(8.0, gt=0)  # scale = alpha / r
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    # Llama attention projections
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    train_embeddings: bool = True  # token embedding (tied output layer) trained too, stored in the adapter
    tempo_bpm: float = Field(120.0, gt=0)  # written to bundle.json: the runner's default tempo
    # rehearsal against forgetting: this share of the training windows are base corpus windows (a seeded sample,
    # fixed per run), so the adapter keeps the base's general music while it learns the player; 0 = style only.
    # 0.05 in the demo: forgetting +5-9 % (0.1: +1-3 % but less of each style; without: folk +51 %, over the gate)
    replay: float = Field(0.05, ge=0, lt=1)


class CheckpointConfig(Section):
    """Spot-safe training: periodic, atomic, checksummed checkpoints; the same command resumes."""

    dir: str | None = None  # local folder or fsspec URL (s3://bucket/prefix); None = <data_dir>/checkpoints/<stage>
    every_steps: int = Field(40, ge=1)  # optimizer steps between checkpoints
    every_s: float = Field(300.0, gt=0)  # seconds: also checkpoint when this long has passed since the last one
    keep: int = Field(3, ge=1)  # newest checkpoints kept; older ones are deleted after a successful write
    storage_options: dict[str, Any] = {}  # passed to fsspec, e.g. {client_kwargs: {endpoint_url: ...}}
    scratch_dir: Path | None = None  # local staging for remote checkpoints; None = a temp dir
    preemption_retries: int = Field(3, ge=0)  # `jam run` restarts training this often after a SIGTERM exit (75)
    # a remote store that stops answering: each checkpoint's upload is tried this often, waiting upload_backoff_s
    # (doubled each time: 2+4+8+16 s by default) while training waits; then training goes on and the next
    # checkpoint tries again
    upload_attempts: int = Field(5, ge=1)
    upload_backoff_s: float = Field(2.0, ge=0)  # seconds
    # seconds a trainer may go without renewing its S3 lease (pipeline/train/lease.py) before the next trainer of the
    # same fingerprint takes over: how long a dead machine's lease delays its replacement; renewed every lease_s / 4
    lease_s: float = Field(60.0, gt=0)
