"""The training loop shared by pretraining and fine-tuning: accelerate, spot-safe checkpoints, exact resume.

One optimizer step = `grad_accum` micro-batches of `batch_size` windows per process. The data order is a seeded
permutation per epoch (`numpy.random.default_rng([seed, epoch])`), so the position (epoch, batch index) is all a
checkpoint needs to continue it. A checkpoint (`state.save_training`: safetensors and JSON, no pickles) holds the
weights (only the adapter when fine-tuning), optimizer, scheduler, grad scaler, python/numpy/torch/cuda RNG states
and `TrainState` (position, step, MLflow run id, metrics not yet logged). Resuming from it replays the same
arithmetic: on CPU the weights match an uninterrupted run exactly.

SIGTERM (and a first Ctrl-C): finish the current step, checkpoint, raise `Preempted` (the CLI exits 75).
SIGKILL: the next run resumes from the last periodic checkpoint and replays the steps after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.core.device import native_bf16
from pipeline.core.training import LoopConfig
from pipeline.registry.tracking import MetricBuffer, RunTracker, peak_mem_mb
from pipeline.train.checkpoint import CheckpointError, CheckpointStore, Preempted, UploadFailed, stop_on_signals
from pipeline.train.compute import configure, kept_heap
from pipeline.train.dataset import IGNORE_INDEX, Batches, TrainInputError, collate, model_inputs
from pipeline.train.state import load_training, save_training

log = logging.getLogger(__name__)

_RESUME_NEUTRAL = {"eval_every", "eval_windows", "log_every", "system_metrics"}  # may change across a resume


# ---- state ------------------------------------------------------------------------------------------------------


def _torch_rng_sha() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


@dataclass
class TrainState:
    """What the loop itself must carry across a restart (registered with accelerate for checkpointing)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch's permutation consumed
    tokens: int = 0  # non-pad tokens trained on (this process)
    run_id: str = ""  # MLflow run
    fingerprint: str = ""  # params + data this training was started with
    pending: list[list[Any]] = field(default_factory=list)  # metrics not yet in MLflow (see MetricBuffer)
    rng_sha: str = ""  # main process's torch RNG at save: proves the restore was complete
    verify_rng: bool = field(default=True, repr=False)  # not saved; False on other processes (other RNG streams)

    def advance(self, per_epoch: int) -> None:
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        self.rng_sha = _torch_rng_sha()  # accelerate saves custom objects right after the RNG states
        return {k: v for k, v in asdict(self).items() if k != "verify_rng"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        if self.verify_rng and self.rng_sha and self.rng_sha != _torch_rng_sha():
            raise CheckpointError("the checkpoint's random state was not restored; resuming would not be exact")

    def meta(self) -> dict[str, Any]:
        """Small JSON copy for the checkpoint manifest (readable without torch)."""
        return {k: v for k, v in asdict(self).items() if k not in ("pending", "verify_rng")}


def loop_fingerprint(loop: LoopConfig) -> str:
    """The loop params whose change makes resuming a different training (eval/logging cadence may change)."""
    return loop.model_dump_json(exclude=_RESUME_NEUTRAL)


# ---- the loop ---------------------------------------------------------------------------------------------------


@dataclass
class TrainJob:
    """Everything `fit` needs; stages build one (see pretrain.py, finetune.py)."""

    build_model: Callable[[torch.device], torch.nn.Module]  # called after seeding, on every (re)start
    train_ds: torch.utils.data.Dataset
    valid_ds: torch.utils.data.Dataset | None
    loop: LoopConfig
    store: CheckpointStore
    seed: int
    fingerprint: str  # see TrainState.fingerprint
    every_steps: int  # checkpoint cadence: optimizer steps ...
    every_s: float  # ... or seconds, whichever comes first
    tracker: RunTracker | None = None  # None: no MLflow (unit tests, benchmarks)
    adapter_only: bool = False  # checkpoint only the peft adapter, not the frozen base
    fresh: bool = False  # delete the store's checkpoints first (one process does it)
    on_step: Callable[[int, dict[str, float]], None] | None = None  # progress hook (tests, notebooks)


@dataclass
class TrainResult:
    model: torch.nn.Module  # unwrapped
    accelerator: Any
    step: int
    run_id: str
    resumed_from: int | None
    metrics: dict[str, float]  # the last step's


@dataclass
class _Run:
    job: TrainJob
    acc: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    data: Batches
    state: TrainState
    buffer: MetricBuffer
    trainable: list[torch.nn.Parameter]


def resolve_precision(mixed_precision: str) -> str:
    """`mixed_precision` resolved: auto = bf16 where the training device computes bfloat16 natively, else no."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "no"


def make_accelerator(mixed_precision: str):
    """An `Accelerator` for this loop (scheduler stepped by us, once per optimizer step).

    Raises:
        TrainInputError: fp16 without CUDA.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed_precision = resolve_precision(mixed_precision)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainInputError("mixed_precision fp16 needs CUDA; use bf16 or no on CPU")
    AcceleratorState._reset_state()  # several trainings in one process (tests, bench) may differ in precision
    # cpu=True without CUDA: only then does accelerate join the gloo group that torchrun's variables describe
    # (`torchrun --nproc_per_node N -m pipeline.train`); alone it changes nothing
    cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False, cpu=cpu)


def make_optimizer(params: list[torch.nn.Parameter], loop: LoopConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95); weight decay on matrices only, not on norms and biases."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": loop.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if loop.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=loop.lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=loop.lr, betas=(0.9, 0.95))


def _setup(job: TrainJob) -> _Run:
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    acc = make_accelerator(job.loop.mixed_precision)
    data = Batches(job.train_ds, job.loop.batch_size, job.seed, acc.process_index, acc.num_processes)
    set_seed(job.seed)
    model = job.build_model(acc.device)
    configure(model, job.loop, acc.mixed_precision, acc.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, job.loop)
    scheduler = get_cosine_schedule_with_warmup(optimizer, job.loop.warmup_steps, job.loop.max_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    state = TrainState(fingerprint=job.fingerprint, verify_rng=acc.is_main_process)
    return _Run(job, acc, model, optimizer, scheduler, data, state, MetricBuffer(), trainable)


def _restore(run: _Run) -> int | None:
    """Load the newest valid checkpoint into the run; None when there is none (a fresh start)."""
    from accelerate.utils import broadcast_object_list

    found: list[Any] = [None]  # the checkpoint's local path, or the error every process raises
    if run.acc.is_main_process:
        try:
            if run.job.fresh:
                run.job.store.clear()
            ckpt = run.job.store.latest(run.job.fingerprint)  # skips corrupt ones and other trainings' ones
            found = [None if ckpt is None else str(ckpt.path)]
        except CheckpointError as err:
            found = [err]
    if run.acc.num_processes > 1:
        broadcast_object_list(found)
    if isinstance(found[0], Exception):
        raise found[0]
    if found[0] is None:
        return None
    load_training(Path(found[0]), run.acc, run.model, run.optimizer, run.scheduler, run.state, run.job.adapter_only)
    run.buffer = MetricBuffer(run.state.pending)
    log.info("resumed from step %d (epoch %d, batch %d)", run.state.step, run.state.epoch, run.state.batch_in_epoch)
    return run.state.step


def _checkpoint(run: _Run, tolerate: bool = True, final: bool = False) -> str | None:
    """Write a checkpoint, then hand its metrics to MLflow (never before: see MetricBuffer).

    Returns its location, or None when a remote store stayed unreachable through every retry (`tolerate`):
    training goes on, the metrics stay pending (in the next checkpoint) unless this was the `final` one.
    """
    acc, store, state = run.acc, run.job.store, run.state
    state.pending = run.buffer.items if acc.is_main_process else []

    def write(folder: Path) -> None:
        save_training(folder, acc, run.model, run.optimizer, run.scheduler, state, run.job.adapter_only)

    if acc.num_processes == 1:
        where = _tolerant(lambda: store.save(state.step, write, state.meta()), tolerate)
    else:  # every process writes its RNG state into the same staging folder; the main one publishes
        folder = [str(store.staging(state.step)) if acc.is_main_process else None]
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(folder)
        write(Path(folder[0]))
        acc.wait_for_everyone()
        commit = lambda: store.commit(state.step, Path(folder[0]), state.meta())  # noqa: E731
        where = _tolerant(commit, tolerate) if acc.is_main_process else ""
        acc.wait_for_everyone()
    if acc.is_main_process and (where is not None or final):
        if run.job.tracker is not None:
            run.buffer.flush(run.job.tracker.client, state.run_id)
        if where is not None:
            log.info("checkpoint step %d -> %s", state.step, where)
    return where


def _tolerant(publish: Callable[[], str], tolerate: bool) -> str | None:
    """`publish()`; with `tolerate`, an upload that failed every retry is a warning (None), not the end."""
    try:
        return publish()
    except UploadFailed as err:
        if not tolerate:
            raise
        log.warning("%s; training goes on, the next checkpoint tries again", err)
        return None


def _train_step(run: _Run) -> tuple[float, int]:
    """One optimizer step over `grad_accum` micro-batches on every process. Returns (loss in nats/token, tokens).

    The loss is weighted by predicted tokens over the whole step (all micro-batches, all processes), so N processes
    with batch_size B follow the same curve as one process with N x B: DDP averages gradients over processes, hence
    the `num_processes` factor. With one process and one micro-batch the weight is exactly 1.
    """
    acc, k = run.acc, run.job.loop.grad_accum
    run.model.train()
    batches = []
    for _ in range(k):
        batch = run.data.get(run.state.epoch, run.state.batch_in_epoch)
        batches.append({n: t.to(acc.device) for n, t in batch.items()})
        run.state.advance(run.data.per_epoch)
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]  # positions the loss averages over
    step_counts = _summed(acc, [float(sum(counts)), float(sum(int(b["attention_mask"].sum()) for b in batches))])
    predicted, tokens = max(step_counts[0], 1.0), int(step_counts[1])
    nll = 0.0
    for i, batch in enumerate(batches):
        with acc.no_sync(run.model) if i < k - 1 else contextlib.nullcontext():
            loss = run.model(**model_inputs(batch)).loss
            acc.backward(loss * (counts[i] * acc.num_processes / predicted))
        nll += float(loss.detach()) * counts[i]
    if run.job.loop.grad_clip > 0:
        acc.clip_grad_norm_(run.trainable, run.job.loop.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return _summed(acc, [nll])[0] / predicted, tokens


def _summed(acc, values: list[float]) -> list[float]:
    """`values` summed over processes (float64; as given with one process)."""
    if acc.num_processes == 1:
        return values
    return acc.reduce(torch.tensor(values, device=acc.device, dtype=torch.float64), "sum").tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: torch.utils.data.Dataset, acc, batch_size: int, limit: int = 0) -> float:
    """Mean cross-entropy (nats/token) over the first `limit` windows of `ds` (0: all), sharded over processes."""
    model.eval()
    n = min(limit, len(ds)) if limit else len(ds)
    idx = list(range(acc.process_index, n, acc.num_processes))
    sums = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (nll sum, predicted tokens)
    for start in range(0, len(idx), batch_size):
        batch = {k: v.to(acc.device) for k, v in collate([ds[i] for i in idx[start : start + batch_size]]).items()}
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # positions the causal loss averages over
        sums += torch.stack([model(**model_inputs(batch)).loss.double() * count, count.double()])
    if acc.num_processes > 1:
        sums = acc.reduce(sums, "sum")
    model.train()
    return float(sums[0] / sums[1].clamp(min=1))


def _agree(acc, *flags: bool) -> list[bool]:
    """Flags any process raised (all processes must checkpoint and stop together)."""
    if acc.num_processes == 1:
        return list(flags)
    t = acc.reduce(torch.tensor([float(f) for f in flags], device=acc.device), "sum")
    return [bool(v > 0) for v in t.tolist()]


def _step_metrics(run: _Run, loss: float, tokens: int, seconds: float) -> dict[str, float]:
    loop, step = run.job.loop, run.state.step
    metrics: dict[str, float] = {}
    if step % loop.log_every == 0 or step == loop.max_steps:
        lr = run.scheduler.get_last_lr()[0]
        metrics |= {"train_loss": loss, "lr": lr, "tokens_per_s": tokens / max(seconds, 1e-9)}
        metrics["peak_mem_mb"] = peak_mem_mb(run.acc.device)
    if run.job.valid_ds is not None and (step % loop.eval_every == 0 or step == loop.max_steps):
        metrics["valid_loss"] = evaluate(run.model, run.job.valid_ds, run.acc, loop.batch_size, loop.eval_windows)
    return metrics


def _loop(run: _Run, stop: threading.Event) -> dict[str, float]:
    job, state = run.job, run.state
    last_save, metrics = time.monotonic(), {}
    while state.step < job.loop.max_steps:
        t0 = time.perf_counter()
        loss, tokens = _train_step(run)
        state.step, state.tokens = state.step + 1, state.tokens + tokens
        metrics = _step_metrics(run, loss, tokens, time.perf_counter() - t0)
        if run.acc.is_main_process:
            run.buffer.add(state.step, **metrics)
            log.info("step %d/%d %s", state.step, job.loop.max_steps, _fmt(metrics))
        if job.on_step is not None:
            job.on_step(state.step, metrics)
        timed = time.monotonic() - last_save >= job.every_s
        stopping, timed = _agree(run.acc, stop.is_set(), timed)
        if stopping or timed or state.step % job.every_steps == 0 or state.step == job.loop.max_steps:
            where = _checkpoint(run, final=state.step == job.loop.max_steps)
            last_save = time.monotonic()
            if stopping:
                raise Preempted(state.step, where or "not uploaded (the store was unreachable); the last uploaded one")
    return metrics


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def fit(job: TrainJob) -> TrainResult:
    """Train `job` to `loop.max_steps`, resuming from its newest valid checkpoint when there is one.

    A fresh start evaluates once (step 0) and writes checkpoint 0 before the first step: it holds the MLflow run id
    and proves the checkpoint location writable. The MLflow run is left open (RUNNING) for the stage to finish.

    Raises:
        Preempted: a signal stopped training after a checkpoint.
        TrainInputError: fp16 on CPU, batch larger than the data.
        CheckpointError: only checkpoints of other params/data; an unsafe (pickle-bearing) checkpoint; the store
            unreadable; the first checkpoint (or a local one) could not be written (earlier ones intact).
    """
    run = _setup(job)
    with stop_on_signals() as stop, kept_heap(run.acc.device):
        resumed = _restore(run)
        tracker = job.tracker if run.acc.is_main_process else None
        try:
            if tracker is not None:
                run.state.run_id = tracker.open(run.state.run_id or None)
                run.buffer.drop_logged(tracker.client, run.state.run_id)
            if resumed is None:
                if job.valid_ds is not None:
                    loss0 = evaluate(run.model, job.valid_ds, run.acc, job.loop.batch_size, job.loop.eval_windows)
                    run.buffer.add(0, valid_loss=loss0)
                _checkpoint(run, tolerate=False)  # the location must work before any training is done
            metrics = _loop(run, stop)
        except Preempted:
            if tracker is not None:
                tracker.close("KILLED")
            raise
        except BaseException:
            if tracker is not None:
                tracker.close("FAILED")
            raise
    model = run.acc.unwrap_model(run.model, keep_fp32_wrapper=False)  # plain forward: no autocast of mixed precision
    return TrainResult(model, run.acc, run.state.step, run.state.run_id, resumed, metrics)
