"""Acquire: URLs (anything yt-dlp supports), audio files and MIDI files -> `data/acquire/`.

Audio is stored as mono 16-bit WAV at `acquire.sample_rate` (`audio/<id>.wav`), MIDI as given (`midi/<id>.mid`),
one manifest row per item (`manifest.jsonl`). The driver caches per source: a file by its content hash, a URL by
the URL itself, so a re-run touches neither the decoder nor the network. Downloads also go through a yt-dlp style
archive (`archive.txt`, lines `<extractor> <video id>`), written only once the WAV is stored, so a playlist re-listed
after a partial failure downloads only what is missing.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core import constants as C
from pipeline.core.config import Config, section_json
from pipeline.core.files import atomic_path, sha256_file, sha256_text, slug, write_bytes, write_text
from pipeline.core.items import ItemIndex, StageReport, raise_if_all_failed

log = logging.getLogger(__name__)

STAGE_VERSION = "acquire-1"
MANIFEST_NAME = "manifest.jsonl"
ARCHIVE_NAME = "archive.txt"
MANIFEST_FIELDS = ("id", "kind", "source", "title", "uploader", "duration_s", "license", "sha256", "fetched_at")
FFMPEG_TIMEOUT_S = 3600.0  # a decode that takes longer than this is hung, not slow
TRUNCATION_TOLERANCE_S = 0.5  # decoded audio may be this much shorter than the container says
URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# yt-dlp messages that no retry will fix; anything else (timeouts, resets, 5xx) is retried with backoff.
PERMANENT_ERRORS = (
    "Unsupported URL",
    "valid URL",
    "HTTP Error 4",
    "Connection refused",
    "unavailable",
    "Private",
    "Sign in",
)
# ffmpeg log lines (they start with "[component @ ...]") that mean the stream is damaged.
CORRUPT_RE = re.compile(r"^\[.*(corrupt|decoding error|invalid data|error while decoding|decode_frame)", re.I)


class AcquireError(RuntimeError):
    """A source or item that cannot be acquired; the message is one clear line for the report."""


@dataclass
class Source:
    """One entry of `acquire.sources` after folder expansion.

    Attributes:
        kind: "url", "audio", "midi", or "invalid" (a missing path or an unsupported file type).
        location: the URL, or the file path as given (relative to the CWD).
    """

    kind: str
    location: str

    @property
    def path(self) -> Path:
        return Path(self.location)

    @cached_property
    def sha256(self) -> str:
        """Content hash of a file source (the URL's hash for a URL)."""
        return sha256_text(self.location) if self.kind == "url" else sha256_file(self.path)

    @property
    def item_id(self) -> str:
        """Id of the item a file source yields; URL sources use `url-<hash>` (their items are known later)."""
        if self.kind == "url":
            return f"url-{self.sha256[:12]}"
        if self.kind == "invalid":
            return self.location
        return f"{slug(self.path.stem)}-{self.sha256[:8]}"


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    kind = "audio" if suffix in C.AUDIO_EXTENSIONS else "midi" if suffix in C.MIDI_EXTENSIONS else "invalid"
    return Source(kind if path.is_file() else "invalid", str(path))


def expand_sources(cfg: Config) -> list[Source]:
    """`acquire.sources` as a flat, de-duplicated list; folders expand to their audio/MIDI files, sorted.

    Args:
        cfg: the project config; paths are relative to the CWD.

    Returns:
        Sources in the order given (folder contents sorted).
    """
    out: list[Source] = []
    seen: set[str] = set()
    for text in cfg.acquire.sources:
        if URL_RE.match(text):
            found = [Source("url", text)]
        elif Path(text).is_dir():
            exts = (*C.AUDIO_EXTENSIONS, *C.MIDI_EXTENSIONS)
            found = [_file_source(p) for p in sorted(Path(text).rglob("*")) if p.suffix.lower() in exts]
        else:
            found = [_file_source(Path(text))]
        for source in found:
            key = source.location if source.kind == "url" else str(Path(source.location).resolve())
            if key not in seen:
                seen.add(key)
                out.append(source)
    return out


def source_key(source: Source, cfg: Config) -> str:
    """Cache key: source content (or URL), the params that shape the stored files, the code version."""
    params = {"sample_rate": cfg.acquire.sample_rate, "max_duration_s": cfg.acquire.max_duration_s}
    return sha256_text(source.sha256, json.dumps(params if source.kind != "midi" else {}), STAGE_VERSION)


def _row(item_id: str, kind: str, source: str, path: Path, **meta: Any) -> dict[str, Any]:
    """A manifest row for the stored file `path`; unknown fields stay None."""
    row = dict.fromkeys(MANIFEST_FIELDS) | {"id": item_id, "kind": kind, "source": source}
    row |= {"sha256": sha256_file(path), "fetched_at": datetime.now(UTC).isoformat(timespec="seconds")}
    return row | {k: v for k, v in meta.items() if v is not None}


# --- audio decoding ---------------------------------------------------------------------------------------------


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


def _acquire_audio_file(source: Source, cfg: Config, out_dir: Path) -> dict[str, Any]:
    dest = out_dir / "audio" / f"{source.item_id}.wav"
    seconds = convert_to_wav(source.path, dest, cfg.acquire.sample_rate)
    if seconds > cfg.acquire.max_duration_s:
        dest.unlink()
        return _dropped(source.item_id, source.location, round(seconds, 1))
    meta = {"title": source.path.stem, "duration_s": round(seconds, 3)}
    return _row(source.item_id, "audio", source.location, dest, **meta)


def _acquire_midi_file(source: Source, out_dir: Path) -> dict[str, Any]:
    import pretty_midi

    if source.path.stat().st_size == 0:
        raise AcquireError("empty file (0 bytes)")
    try:
        pm = pretty_midi.PrettyMIDI(str(source.path))
    except Exception as err:  # mido/pretty_midi raise many types for malformed files
        raise AcquireError(f"malformed MIDI: {_one_line(err)}") from None
    if not any(inst.notes for inst in pm.instruments):
        raise AcquireError("MIDI has no notes")
    dest = out_dir / "midi" / f"{source.item_id}.mid"
    write_bytes(dest, source.path.read_bytes())
    return _row(
        source.item_id, "midi", source.location, dest, title=source.path.stem, duration_s=round(pm.get_end_time(), 3)
    )


# --- URLs (yt-dlp) -----------------------------------------------------------------------------------------------


class _QuietLogger:
    """yt-dlp prints errors to stderr even when quiet; they come back as exceptions and go into the report."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    info = warning = error = debug


def _ydl_options(cfg: Config, tmp_dir: Path) -> dict[str, Any]:
    from yt_dlp.utils import match_filter_func

    acq = cfg.acquire
    return {
        "format": "bestaudio/best",
        "outtmpl": str(tmp_dir / "%(id)s.%(ext)s"),
        "extract_flat": "in_playlist",
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _QuietLogger(),
        "cachedir": False,
        "socket_timeout": acq.socket_timeout_s,
        "retries": acq.retries,
        "fragment_retries": acq.retries,
        "extractor_retries": 0,  # _with_retries does the backoff
        "match_filter": match_filter_func(f"duration <=? {acq.max_duration_s}"),  # unknown duration passes
    }


def _one_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    text = re.sub(r"^ERROR: ", "", text)
    return re.sub(r" \(caused by .*$", "", text)


def _with_retries(fn, cfg: Config):
    """Call `fn()`; on a transient yt-dlp error retry `acquire.retries` times, doubling `backoff_s`."""
    from yt_dlp.utils import DownloadError

    for attempt in range(cfg.acquire.retries + 1):
        try:
            return fn()
        except DownloadError as err:
            message = _one_line(err)
            if attempt == cfg.acquire.retries or any(p in message for p in PERMANENT_ERRORS):
                raise AcquireError(message) from None
            delay = cfg.acquire.backoff_s * 2**attempt
            log.info("retrying in %.1f s after: %s", delay, message)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _entry_ids(entry: dict[str, Any], url: str) -> tuple[str, str]:
    """(item id, archive id) of a yt-dlp info dict or flat playlist entry, known before anything is downloaded."""
    from yt_dlp.utils import make_archive_id

    extractor = entry.get("extractor_key") or entry.get("ie_key") or "Generic"
    entry_url = _entry_url(entry, url)
    video_id = str(entry.get("id") or sha256_text(entry_url)[:12])  # flat feed entries may carry no id
    if extractor.lower() != "generic":
        prefix = "yt" if extractor.lower() == "youtube" else slug(extractor, 20)
        return f"{prefix}-{slug(video_id, 60)}", make_archive_id(extractor, video_id)
    name = slug(str(entry.get("id") or entry.get("title") or "media"))  # a file stem: two hosts may share one
    return f"generic-{name}-{sha256_text(entry_url)[:8]}", make_archive_id(extractor, video_id)


def _entry_url(entry: dict[str, Any], url: str) -> str:
    return str(entry.get("webpage_url") or entry.get("url") or url).split("#__youtubedl_smuggle")[0]


def read_archive(out_dir: Path) -> set[str]:
    path = out_dir / ARCHIVE_NAME
    return set(path.read_text().splitlines()) if path.exists() else set()


def read_manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Manifest rows by item id ({} when there is none yet)."""
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


def _dropped(item_id: str, source: str, seconds: float | None) -> dict[str, Any]:
    return {"id": item_id, "source": source, "dropped": f"longer than acquire.max_duration_s ({seconds} s)"}


def _download_entry(ydl, entry: dict[str, Any], url: str, cfg: Config, out_dir: Path, tmp: Path) -> dict[str, Any]:
    """One video: reused when archived with its WAV on disk, else downloaded into `tmp` and converted."""
    item_id, archive_id = _entry_ids(entry, url)
    wav, entry_url = out_dir / "audio" / f"{item_id}.wav", _entry_url(entry, url)
    if wav.exists() and archive_id in read_archive(out_dir):
        row = read_manifest(out_dir).get(item_id) or _row(item_id, "audio", entry_url, wav, archive_id=archive_id)
        if (row.get("duration_s") or 0) <= cfg.acquire.max_duration_s:
            return row
        wav.unlink()  # max_duration_s was lowered since it was fetched
        return _dropped(item_id, entry_url, row["duration_s"])
    info = _with_retries(lambda: ydl.process_ie_result(dict(entry), download=True), cfg)
    if not info or not info.get("requested_downloads"):  # rejected by match_filter
        return _dropped(item_id, entry_url, info and info.get("duration"))
    try:
        seconds = convert_to_wav(Path(info["requested_downloads"][0]["filepath"]), wav, cfg.acquire.sample_rate)
    finally:
        for f in tmp.iterdir():
            f.unlink()  # a playlist's downloads would otherwise pile up
    if seconds > cfg.acquire.max_duration_s:  # yt-dlp did not know the duration
        wav.unlink()
        return _dropped(item_id, entry_url, round(seconds, 1))
    with open(out_dir / ARCHIVE_NAME, "a") as archive:  # one short O_APPEND write: safe beside parallel tasks
        archive.write(archive_id + "\n")
    uploader = info.get("uploader") or info.get("channel")
    meta = {"title": info.get("title"), "uploader": uploader, "license": info.get("license")}
    return _row(item_id, "audio", entry_url, wav, archive_id=archive_id, duration_s=round(seconds, 3), **meta)


def _acquire_url(source: Source, cfg: Config, out_dir: Path) -> list[dict[str, Any]]:
    import yt_dlp

    url = source.location
    with (
        tempfile.TemporaryDirectory(prefix="jam-acquire-") as tmp,
        yt_dlp.YoutubeDL(_ydl_options(cfg, Path(tmp))) as ydl,
    ):
        info = _with_retries(lambda: ydl.extract_info(url, download=False), cfg)
        if info.get("_type") != "playlist":
            return [_download_entry(ydl, info, url, cfg, out_dir, Path(tmp))]
        rows = []
        for entry in info.get("entries") or []:
            try:
                rows.append(_download_entry(ydl, entry, url, cfg, out_dir, Path(tmp)))
            except AcquireError as err:  # one bad video must not lose the rest of the playlist
                rows.append({"id": _entry_ids(entry, url)[0], "source": _entry_url(entry, url), "error": str(err)})
        return rows


# --- per source, manifest, driver --------------------------------------------------------------------------------


def acquire_source(source: Source, cfg: Config, out_dir: Path) -> list[dict[str, Any]]:
    """Fetch or convert one source into `out_dir`; the unit a flow maps with retries.

    Args:
        source: from `expand_sources`.
        cfg: the project config (`cfg.acquire` is used).
        out_dir: the stage folder (`data/acquire`).

    Returns:
        Manifest rows, one per item (a playlist yields several). A row with an `error` key is a failed playlist
        entry, one with a `dropped` key was filtered out (too long); neither goes into the manifest.

    Raises:
        AcquireError: the source as a whole failed (bad file, unreachable or unsupported URL).
    """
    if source.kind == "invalid":
        path = source.path
        raise AcquireError("no such file" if not path.exists() else f"unsupported file type '{path.suffix}'")
    if source.kind == "url":
        return _acquire_url(source, cfg, out_dir)
    if source.kind == "midi":
        return [_acquire_midi_file(source, out_dir)]
    return [_acquire_audio_file(source, cfg, out_dir)]


def write_manifest(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """Write `manifest.jsonl` (sorted by id, one row per id, no error/dropped rows) and the matching archive."""
    good = {r["id"]: r for r in reversed(rows) if "error" not in r and "dropped" not in r}
    ordered = [good[k] for k in sorted(good)]
    write_text(out_dir / MANIFEST_NAME, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered))
    archive = sorted({r["archive_id"] for r in ordered if r.get("archive_id")})
    write_text(out_dir / ARCHIVE_NAME, "".join(a + "\n" for a in archive))
    return out_dir / MANIFEST_NAME


def _outputs(rows: list[dict[str, Any]]) -> list[str]:
    """Stored files of the good rows, relative to the stage folder."""
    layout = {"audio": "audio/{}.wav", "midi": "midi/{}.mid"}
    return [layout[r["kind"]].format(r["id"]) for r in rows if "error" not in r and "dropped" not in r]


def _file_rows(rows: list[dict[str, Any]], report: StageReport, done: list[str]) -> list[dict[str, Any]]:
    for r in rows:
        if "error" in r:
            report.failed[r["id"]] = r["error"]
        elif "dropped" in r:
            report.dropped[r["id"]] = r["dropped"]
        else:
            done.append(r["id"])
    return [r for r in rows if "error" not in r and "dropped" not in r]


def _acquire_one(source: Source, cfg: Config, out_dir: Path, index: ItemIndex, report: StageReport) -> list[dict]:
    """Cached or fresh rows for one source; failures go into the report (and, for files, the index)."""
    key = source_key(source, cfg) if source.kind != "invalid" else ""
    entry = index.fresh(source.item_id, key, out_dir) if key else None
    if entry is not None:
        if entry.get("error"):
            report.failed[source.item_id] = entry["error"]
        return _file_rows(entry.get("rows", []), report, report.cached)
    try:
        rows = acquire_source(source, cfg, out_dir)
    except (AcquireError, OSError, subprocess.SubprocessError) as err:
        report.failed[source.location if source.kind == "url" else source.item_id] = _one_line(err)
        if source.kind in ("audio", "midi"):  # deterministic: same bytes fail the same way, so cache the failure
            index.record(source.item_id, key, error=_one_line(err))
            return []
        return _previous_rows(index.entries.get(source.item_id), out_dir, report)
    complete = not any("error" in r for r in rows)  # else: not fresh, so the playlist is listed again next run
    index.record(source.item_id, key if complete else f"incomplete:{key}", outputs=_outputs(rows), rows=rows)
    return _file_rows(rows, report, report.processed)


def _previous_rows(entry: dict[str, Any] | None, out_dir: Path, report: StageReport) -> list[dict[str, Any]]:
    """A URL that failed this run (network down?) keeps last run's items, so downstream stages don't prune them."""
    if not entry or not all((out_dir / o).exists() for o in entry.get("outputs", [])):
        return []
    return _file_rows([r for r in entry.get("rows", []) if "error" not in r], report, report.cached)


def _prune(index: ItemIndex, keep: set[str], out_dir: Path) -> list[str]:
    """Prune vanished sources, sparing files another kept source also produced (a video in two playlists)."""
    kept = {o for i, e in index.entries.items() if i in keep for o in e.get("outputs", [])}
    for item_id, entry in index.entries.items():
        if item_id not in keep:
            entry["outputs"] = [o for o in entry.get("outputs", []) if o not in kept]
    return index.prune(keep, out_dir)


def run_acquire(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Acquire every source in `acquire.sources` into `data/acquire/`; incremental per source.

    Args:
        cfg: the project config.

    Returns:
        The stage report (also written to `data/acquire/report.json`).

    Raises:
        AllItemsFailed: no source yielded anything.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = StageReport(stage="acquire")
    index = ItemIndex(out_dir / C.INDEX_NAME)
    sources = expand_sources(cfg)
    rows: list[dict[str, Any]] = []
    for source in tqdm(sources, desc="acquire", unit="source", disable=None):
        rows.extend(_acquire_one(source, cfg, out_dir, index, report))
    pruned = _prune(index, {s.item_id for s in sources}, out_dir)
    write_manifest(rows, out_dir)
    report.items_in = len(report.processed) + len(report.cached) + len(report.failed) + len(report.dropped)
    report.outputs = len({r["id"] for r in rows})
    report.stats = {
        "sources": len(sources),
        "pruned_sources": pruned,
        "audio_s": round(sum(r.get("duration_s") or 0 for r in rows if r["kind"] == "audio"), 1),
    }
    report.finish(out_dir, section_json(cfg.acquire))
    raise_if_all_failed(report)
    return report
