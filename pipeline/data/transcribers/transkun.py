"""Transkun 2.0 (Yan & Duan, semi-CRF piano transcription; weights ship in the PyPI wheel): notes, velocity, pedal.

Used through its own model code and weights, not its CLI (which imports pkg_resources and decodes audio through
pydub/ffmpeg). The segment loop mirrors `TransKun.transcribe` (same padding, forced start positions carried from
one segment to the next, incomplete notes merged across segments) but streams the WAV acquire wrote: memory stays
bounded by one segment whatever the recording's length, and a note held across a segment boundary is one note.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi
from tqdm import tqdm

from pipeline.core.config import TranscribeConfig
from pipeline.core.device import native_bf16
from pipeline.data.transcribers.base import (
    TranscriberError,
    Transcription,
    check_duration,
    pick_device,
    to_midi_velocity,
)

WEIGHTS = "pretrained/2.0.pt"  # inside the transkun package
CONF = "pretrained/2.0.conf"
SUSTAIN, SOFT = -64, -67  # Transkun's pedal "pitches": -CC number
READ_BLOCK_S = 30.0  # seconds of audio read (and resampled) at a time


@dataclass
class TranskunModel:
    net: Any  # transkun.ModelTransformer.TransKun, in eval mode on `device`
    device: str


def _in_bfloat16(inner: Any, device: str) -> Any:
    """`inner` (a Transkun sub-module: backbone, interval scorer) run under bfloat16 autocast, handing float32
    back, so that the semi-CRF's Viterbi (sums of scores along ~700 frames) stays in float32."""
    import torch

    class Bfloat16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device, dtype=torch.bfloat16):
                out = self.inner(*args, **kwargs)
            return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    return Bfloat16()


def _attention_forward(self: Any, query: Any, key: Any = None, value: Any = None) -> Any:
    """`transkun.LayersTransformer.MultiHeadAttentionKernel.forward` (its exact-attention branch, the one the shipped
    conf uses) with the batch dimensions folded into one before `scaled_dot_product_attention`: torch's fused CPU
    kernel takes 4-D inputs only, and the shipped call passes 5-D (batch, rows, heads, length, dim), which falls
    back to the unfused math path (a materialised softmax, NaN masking over it)."""
    import torch.nn.functional as F

    key = query if key is None else key
    value = key if value is None else value
    q, k, v = query @ self.q_proj_weight, key @ self.k_proj_weight, value @ self.v_proj_weight
    lead = q.shape[:-2]

    def heads(t: Any) -> Any:  # (..., length, heads * dim) -> (batch * rows, heads, length, dim)
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-2, -3).flatten(0, -4)

    fetched = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return self.out_proj(fetched.unflatten(0, lead).transpose(-2, -3).flatten(-2, -1))


def _residual_forward(self: Any, x: Any, *args: Any) -> Any:
    """`transkun.LayersTransformer.ResBlock.forward` on a contiguous copy of `x`: the time-attention blocks get a
    transposed view, and a Linear on a non-contiguous 4-D input makes torch expand its weight once per row
    (a 78 MB copy per feed-forward layer) for a batched matmul."""
    x = x.contiguous()
    return x + self.dropout(self.module(self.norm(x), *args)) * self.scale


def _lean(net: Any) -> None:
    """Route `net`'s attention and residual blocks through the two forwards above: the same arithmetic through
    torch's fused kernels (README "Transcription": the backbone 2.6x faster in bfloat16, 1.4x in float32, its
    float32 outputs within 1.2e-4 of the shipped forward's; a whole file 1.6x faster in bfloat16)."""
    import types

    from transkun import LayersTransformer

    net.backbone.useGradientCheckpoint = False  # on by default, even in inference: a warning per layer, no use
    for module in net.modules():
        if isinstance(module, LayersTransformer.MultiHeadAttentionKernel):
            module.forward = types.MethodType(_attention_forward, module)
        elif isinstance(module, LayersTransformer.ResBlock):
            module.forward = types.MethodType(_residual_forward, module)


def _package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("transkun")
    if spec is None or not spec.submodule_search_locations:
        raise TranscriberError("transkun is not installed (make venv installs transkun==2.0.1 --no-deps)")
    return Path(spec.submodule_search_locations[0])


def precision(tcfg: TranscribeConfig) -> str:
    """`transcribe.precision` resolved: auto = bfloat16 where the device computes it natively (a CUDA GPU that
    supports it; a CPU with AVX-512 BF16 or AMX), else float32 (emulated bfloat16 is slower than float32)."""
    if tcfg.precision != "auto":
        return tcfg.precision
    return "bfloat16" if native_bf16(pick_device(tcfg.device)) else "float32"


def model_id(tcfg: TranscribeConfig) -> str:
    """Names the weights and decoding code: part of every cache key."""
    version = importlib.metadata.version("transkun")
    return (
        f"transkun=={version}/{WEIGHTS}/q={tcfg.quantize}"
        + ("/bf16" if precision(tcfg) == "bfloat16" else "")
        + ("/lean" if tcfg.lean_forward else "")
    )


def load_model(tcfg: TranscribeConfig, threads: int | None = None) -> TranskunModel:
    """Build Transkun from its shipped conf and weights on `transcribe.device`.

    Raises:
        TranscriberError: not installed, or the weights fail to load (missing, corrupt, wrong shapes).
    """
    import torch

    from pipeline.data.transcribers.melscale import torchaudio_stub

    device = pick_device(tcfg.device)
    if threads:
        torch.set_num_threads(threads)
    root = _package_dir()
    try:
        from transkun import ModelTransformer

        conf = ModelTransformer.Config()
        conf.__dict__.update(json.loads((root / CONF).read_text())["Model"]["config"])
        with torchaudio_stub():
            net = ModelTransformer.TransKun(conf=conf)
        checkpoint = torch.load(root / WEIGHTS, map_location="cpu", weights_only=True)
        state = checkpoint.get("best_state_dict", checkpoint.get("state_dict"))
        missing, unexpected = net.load_state_dict(state, strict=False)
    except Exception as err:  # corrupt or missing file, pickle/zip errors, shape mismatches
        raise TranscriberError(f"transkun weights failed to load from {root / WEIGHTS}: {err}") from err
    if missing or unexpected:
        raise TranscriberError(
            f"transkun weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    net = net.eval()
    if tcfg.lean_forward:
        _lean(net)
    if tcfg.quantize and device == "cpu":
        # the positional-embedding builder reads its Linear's .weight directly: left in float
        names = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and "posEmbed" not in n}
        net = torch.ao.quantization.quantize_dynamic(net, names, dtype=torch.qint8)
    if precision(tcfg) == "bfloat16":
        net.backbone, net.scorer = _in_bfloat16(net.backbone, device), _in_bfloat16(net.scorer, device)
    return TranskunModel(net.to(device), device)


def _blocks(path: Path, fs: int) -> Iterator[np.ndarray]:
    """The file as mono float32 at `fs` Hz, READ_BLOCK_S at a time (soxr's streaming resampler: no block seams)."""
    import soundfile as sf
    import soxr

    with sf.SoundFile(str(path)) as f:
        stream = soxr.ResampleStream(f.samplerate, fs, 1, dtype="float32") if f.samplerate != fs else None
        for block in f.blocks(blocksize=int(READ_BLOCK_S * f.samplerate), dtype="float32", always_2d=True):
            mono = block.mean(axis=1)
            yield stream.resample_chunk(mono) if stream else mono
        if stream:
            yield stream.resample_chunk(np.zeros(0, np.float32), last=True)


def _samples(path: Path, fs: int) -> int:
    """The file's length in samples at `fs` Hz."""
    import soundfile as sf

    info = sf.info(str(path))
    return math.ceil(info.frames * fs / info.samplerate)


def _segments(blocks: Iterator[np.ndarray], pad: int, size: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, samples) of each `size`-sample segment, every `step` samples, of the stream padded by `pad` zeros
    on both sides (`TransKun.transcribe`'s layout); the last segments are zero-filled to `size`."""
    buf, offset, done, start = np.zeros(pad, np.float32), 0, False, 0  # buf[0] is padded sample `offset`
    while True:
        while not done and offset + len(buf) < start + size:
            block = next(blocks, None)
            done = block is None
            buf = np.concatenate([buf, np.zeros(pad, np.float32) if done else block])
        if done and start >= offset + len(buf):
            return
        seg = buf[start - offset : start - offset + size]
        yield start, np.pad(seg, (0, size - len(seg)))
        start += step
        buf, offset = buf[start - offset :], start


def _merge(by_pitch: dict[int, list[Any]], events: list[Any]) -> None:
    """Fold one segment's events into the running per-pitch lists (`TransKun.transcribe`'s merge)."""
    for e in events:
        if by_pitch[e.pitch] and e.start < by_pitch[e.pitch][-1].end:
            last = by_pitch[e.pitch][-1]
            if e.hasOnset:
                by_pitch[e.pitch][-1] = e
            else:  # the continuation of a note begun in an earlier segment
                last.hasOffset = e.hasOffset
                last.end = max(e.end, last.end)
            continue
        if e.hasOnset:
            by_pitch[e.pitch].append(e)


def _batches(segments: Iterator[tuple[int, np.ndarray]], n: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    batch: list[tuple[int, np.ndarray]] = []
    for item in segments:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _forward(net: Any, frames: Any) -> list[tuple[Any, Any]]:
    """`processFramesBatch` on a batch of segments (the backbone and scorer: ~90 % of the time), split back into
    one (CRF, context) per segment: the Viterbi back-tracking must still run one segment at a time, since each
    segment's forced start positions come from the one before."""
    from transkun import CRF

    crf, ctx = net.processFramesBatch(frames)  # scores (T, T, batch * symbols); ctx (batch, symbols, T, D)
    n = len(net.targetMIDIPitch)
    return [
        (CRF.NeuralSemiCRFInterval(crf.score[..., k * n : (k + 1) * n], crf.noiseScore[..., k * n : (k + 1) * n]), c)
        for k, c in enumerate(ctx.split(1))
    ]


def _decode_segment(net: Any, frames: Any, forward: tuple[Any, Any], **kw: Any) -> tuple[list[Any], list[int]]:
    """Transkun's `transcribeFrames` (Viterbi, velocity, refined onsets/offsets) on an already computed forward:
    its `processFramesBatch` is shadowed on the instance for the call, so its own decoding code runs unchanged."""
    net.processFramesBatch = lambda _frames: forward
    try:
        events, last = net.transcribeFrames(frames, **kw)
    finally:
        del net.processFramesBatch
    return events[0], last


def decode(path: Path, model: TranskunModel, tcfg: TranscribeConfig, progress: bool = True) -> list[Any]:
    """Transkun's note and pedal events for one file (transkun.Data.Note, times in seconds).

    `transcribe.batch_segments` segments go through the network in one forward; segments that hold only the
    trailing padding (they start after the audio ends, so they see nothing) are skipped.
    """
    import torch
    from transkun.Data import resolveOverlapping
    from transkun.Util import makeFrame

    net = model.net
    fs, hop = net.fs, net.hopSize
    pad = math.ceil((tcfg.segment_s - tcfg.hop_s) * fs)  # samples of silence before (and after) the audio
    step = math.ceil(tcfg.hop_s * fs / hop) * hop
    size = math.ceil(tcfg.segment_s * fs)
    audio_end = pad + _samples(path, fs)  # in padded samples
    start_pos = [math.floor(pad / hop)] * len(net.targetMIDIPitch)
    by_pitch: dict[int, list[Any]] = defaultdict(list)
    segments = itertools.takewhile(lambda s: s[0] < audio_end, _segments(_blocks(path, fs), pad, size, step))
    total = math.ceil(audio_end / step)
    bar = tqdm(total=total, desc=path.stem, unit="seg", disable=None if progress else True, leave=False)
    with torch.inference_mode(), bar:
        for batch in _batches(segments, tcfg.batch_segments):
            frames = [makeFrame(torch.from_numpy(seg).to(model.device)[None], hop, net.windowSize) for _, seg in batch]
            for (start, _), one, forward in zip(batch, frames, _forward(net, torch.stack(frames)), strict=True):
                events, last = _decode_segment(
                    net,
                    one.unsqueeze(0),  # (1, 1, T, win)
                    forward,
                    forcedStartPos=start_pos,
                    velocityCriteron="hamming",
                    lastFrameIdx=round(size / hop),
                )
                start_pos = [max(k - step // hop, 0) for k in last]
                begin = start / fs - pad / fs  # seconds: this segment's place in the recording
                for e in events:
                    e.start = max(e.start + begin, 0.0)
                    e.end = max(e.end + begin, e.start)
                _merge(by_pitch, events)
            bar.update(len(batch))
    for notes in by_pitch.values():
        if notes:
            notes[-1].hasOffset = True
    return resolveOverlapping([e for notes in by_pitch.values() for e in notes if e.hasOffset])


def transcribe(path: Path, model: TranskunModel, tcfg: TranscribeConfig) -> Transcription:
    """One audio file -> piano notes (key-release offsets, velocity) and sustain-pedal changes (CC64).

    Raises:
        TranscriberError: the audio is shorter than `transcribe.min_audio_s`.
    """
    check_duration(path, tcfg.min_audio_s)
    notes, pedal = [], []
    for e in decode(Path(path), model, tcfg):
        if e.pitch == SUSTAIN:
            pedal += [pretty_midi.ControlChange(64, 127, e.start), pretty_midi.ControlChange(64, 0, e.end)]
        elif tcfg.min_pitch <= e.pitch <= tcfg.max_pitch and e.end > e.start:
            notes.append(pretty_midi.Note(to_midi_velocity(e.velocity), int(e.pitch), float(e.start), float(e.end)))
    return Transcription(notes, sorted(pedal, key=lambda c: c.time))
