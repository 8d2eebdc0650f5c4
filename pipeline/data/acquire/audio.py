"""Audio sources: any file ffmpeg decodes -> mono 16-bit WAV at `acquire.sample_rate`, checked for damage."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.files import atomic_path
from pipeline.data.acquire.manifest import Row
from pipeline.data.acquire.sources import AcquireError, Source, dropped_row, make_row

FFMPEG_TIMEOUT_S = 3600.0  # a decode that takes longer than this is hung, not slow
TRUNCATION_TOLERANCE_S = 0.5  # decoded audio may be this much shorter than the container says
# ffmpeg log lines (they start with "[component @ ...]") that mean the stream is damaged.
CORRUPT_RE = re.compile(r"^\[.*(corrupt|decoding error|invalid data|error while decoding|decode_frame)", re.I)


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _declared_seconds(stderr: str) -> float | None:
    match = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", stderr)
    if not match:
        return None
    h, m, s = match.groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


def _decode_problem(stderr: str, declared: float | None, decoded: float) -> str | None:
    bad = [line.strip() for line in stderr.splitlines() if CORRUPT_RE.match(line.strip())]
    if bad:
        return f"corrupt or truncated audio ({bad[0].split('] ')[-1]})"
    if decoded <= 0:
        return "audio decodes to nothing (0 samples)"
    if declared and decoded < declared - max(TRUNCATION_TOLERANCE_S, 0.05 * declared):
        return f"truncated audio: container says {declared:.1f} s, decodes to {decoded:.1f} s"
    return None


def convert_to_wav(src: Path, dest: Path, sample_rate: int) -> float:
    """Decode any audio/video file into a mono 16-bit WAV at `sample_rate`, atomically.

    Args:
        src: input file (anything ffmpeg reads).
        dest: the WAV to write; untouched if decoding fails.
        sample_rate: Hz.

    Returns:
        Duration of the stored audio in seconds.

    Raises:
        AcquireError: empty, undecodable, corrupt or truncated input.
    """
    import soundfile as sf

    if src.stat().st_size == 0:
        raise AcquireError("empty file (0 bytes)")
    with atomic_path(dest) as tmp:
        cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-nostats", "-y", "-i", str(src), "-vn", "-ac", "1", "-ar"]
        cmd += [str(sample_rate), "-c:a", "pcm_s16le", "-f", "wav", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=FFMPEG_TIMEOUT_S)
        if proc.returncode != 0:
            last = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
            raise AcquireError(f"cannot decode audio: {last[0]}")
        decoded = sf.info(str(tmp)).frames / sample_rate
        problem = _decode_problem(proc.stderr, _declared_seconds(proc.stderr), decoded)
        if problem:
            raise AcquireError(problem)
    return decoded


def fetch_audio_file(source: Source, cfg: Config, out_dir: Path) -> list[Row]:
    """Store one audio file as `audio/<id>.wav` (dropped if longer than `acquire.max_duration_s`)."""
    dest = out_dir / "audio" / f"{source.item_id}.wav"
    seconds = convert_to_wav(source.path, dest, cfg.acquire.sample_rate)
    if seconds > cfg.acquire.max_duration_s:
        dest.unlink()
        return [dropped_row(source.item_id, source.location, round(seconds, 1))]
    meta = {"title": source.path.stem, "duration_s": round(seconds, 3)}
    return [make_row(source.item_id, "audio", source.location, dest, **meta)]
