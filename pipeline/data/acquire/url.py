"""URL sources: anything yt-dlp supports (a video, a playlist, a podcast feed, a plain media URL).

yt-dlp does the bookkeeping it already knows how to do:
- its download archive (`archive.txt`, lines `<extractor> <video id>`) records a video only once our post-processor
  has stored its WAV, so a playlist re-listed after a partial failure downloads only what is missing;
- its retries (`retries`, `fragment_retries`, `extractor_retries`, waiting `acquire.backoff_s` doubling): yt-dlp
  knows which errors are transient and retries the request that failed, not the whole source. What it gives up on
  (404, unsupported URL, connection refused) fails the source at once with yt-dlp's own message.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.files import sha256_text, slug
from pipeline.data.acquire.audio import convert_to_wav
from pipeline.data.acquire.manifest import ARCHIVE_NAME, Row, read_manifest
from pipeline.data.acquire.sources import AcquireError, Source, dropped_row, make_row, one_line

log = logging.getLogger(__name__)


class _TooLong(AcquireError):
    """The stored audio is longer than `acquire.max_duration_s` (yt-dlp did not know the duration)."""

    def __init__(self, seconds: float):
        super().__init__(f"{seconds:.1f} s")
        self.seconds = seconds


class _QuietLogger:
    """yt-dlp prints errors to stderr even when quiet; they come back as exceptions and go into the report."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    info = warning = error = debug


def _ydl_options(cfg: Config, tmp_dir: Path) -> dict[str, Any]:
    from yt_dlp.utils import match_filter_func

    acq = cfg.acquire

    def backoff(attempt: int) -> float:  # seconds before retry `attempt + 1`
        return acq.backoff_s * 2**attempt

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
        "extractor_retries": acq.retries,
        "retry_sleep_functions": {"http": backoff, "fragment": backoff, "extractor": backoff},
        "match_filter": match_filter_func(f"duration <=? {acq.max_duration_s}"),  # unknown duration passes
    }


def _store_wav_pp(sample_rate: int, max_duration_s: float):
    """A yt-dlp post-processor that decodes each download into `pp.dest` (set before each entry)."""
    from yt_dlp.postprocessor import PostProcessor

    class StoreWav(PostProcessor):
        dest: Path
        seconds: float = 0.0

        def run(self, info: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
            src = Path(info["filepath"])
            try:
                self.seconds = convert_to_wav(src, self.dest, sample_rate)
            finally:
                src.unlink(missing_ok=True)  # a playlist's downloads would otherwise pile up
            if self.seconds > max_duration_s:
                self.dest.unlink()
                raise _TooLong(self.seconds)  # raised before yt-dlp archives it: not recorded as stored
            return [], info

    return StoreWav()


def _entry_url(entry: dict[str, Any], url: str) -> str:
    return str(entry.get("webpage_url") or entry.get("url") or url).split("#__youtubedl_smuggle")[0]


def _entry_ids(entry: dict[str, Any], url: str) -> tuple[str, dict[str, str]]:
    """(item id, what yt-dlp's archive knows the video by), from a flat entry, before anything is downloaded."""
    from yt_dlp.utils import unsmuggle_url

    extractor = entry.get("extractor_key") or entry.get("ie_key") or "Generic"
    entry_url = _entry_url(entry, url)
    video_id = str(entry.get("id") or sha256_text(entry_url)[:12])  # flat feed entries may carry no id
    forced = unsmuggle_url(str(entry.get("url") or ""))[1] or {}
    archive_key = {"extractor_key": extractor, "id": str(entry.get("id") or forced.get("force_videoid") or video_id)}
    if extractor.lower() != "generic":
        prefix = "yt" if extractor.lower() == "youtube" else slug(extractor, 20)
        return f"{prefix}-{slug(video_id, 60)}", archive_key
    name = slug(str(entry.get("id") or entry.get("title") or "media"))  # a file stem: two hosts may share one
    return f"generic-{name}-{sha256_text(entry_url)[:8]}", archive_key


def _archive_id(info: dict[str, Any]) -> str:
    from yt_dlp.utils import make_archive_id

    return make_archive_id(info["extractor_key"], info["id"])


def _stored_row(item_id: str, entry_url: str, wav: Path, archive_id: str, cfg: Config, out_dir: Path) -> Row:
    """The row of a video stored by an earlier run (its manifest row if still there)."""
    row = read_manifest(out_dir).get(item_id) or make_row(item_id, "audio", entry_url, wav, archive_id=archive_id)
    if (row.get("duration_s") or 0) <= cfg.acquire.max_duration_s:
        return row
    wav.unlink()  # max_duration_s was lowered since it was fetched
    return dropped_row(item_id, entry_url, row["duration_s"])


def _download(ydl, pp, entry: dict[str, Any], wav: Path) -> dict[str, Any] | None:
    pp.dest = wav
    try:
        return ydl.process_ie_result(dict(entry), download=True)
    except AcquireError:  # from the post-processor: ours, already one clear line
        raise
    except Exception as err:  # yt-dlp's DownloadError and the like
        raise AcquireError(one_line(err)) from None


def _fetch_entry(ydl, pp, entry: dict[str, Any], url: str, cfg: Config, out_dir: Path) -> Row:
    """One video: reused when yt-dlp's archive has it and its WAV is on disk, else downloaded and converted."""
    item_id, archive_key = _entry_ids(entry, url)
    wav, entry_url = out_dir / "audio" / f"{item_id}.wav", _entry_url(entry, url)
    if ydl.in_download_archive(archive_key):
        if wav.exists():
            return _stored_row(item_id, entry_url, wav, _archive_id(archive_key), cfg, out_dir)
        ydl.archive.discard(_archive_id(archive_key))  # its WAV was deleted: let yt-dlp fetch it again
    try:
        info = _download(ydl, pp, entry, wav)
    except _TooLong as err:
        return dropped_row(item_id, entry_url, round(err.seconds, 1))
    if info and not info.get("requested_downloads") and wav.exists() and ydl.in_download_archive(info):
        return _stored_row(item_id, entry_url, wav, _archive_id(info), cfg, out_dir)  # known only once resolved
    if not info or not info.get("requested_downloads"):  # rejected by match_filter
        return dropped_row(item_id, entry_url, info and info.get("duration"))
    uploader = info.get("uploader") or info.get("channel")
    meta = {"title": info.get("title"), "uploader": uploader, "license": info.get("license")}
    return make_row(
        item_id, "audio", entry_url, wav, archive_id=_archive_id(info), duration_s=round(pp.seconds, 3), **meta
    )


def fetch_url(source: Source, cfg: Config, out_dir: Path) -> list[Row]:
    """List a URL with yt-dlp and store each of its videos as `audio/<id>.wav`.

    Raises:
        AcquireError: the URL as a whole cannot be listed (unreachable, unsupported, gone).
    """
    import yt_dlp

    url = source.location
    with tempfile.TemporaryDirectory(prefix="jam-acquire-") as tmp:
        options = _ydl_options(cfg, Path(tmp))
        # Listing without the archive: yt-dlp would skip an archived single video without saying what it is.
        with yt_dlp.YoutubeDL(options) as lister:
            try:
                info = lister.extract_info(url, download=False)
            except Exception as err:  # DownloadError carries yt-dlp's message
                raise AcquireError(one_line(err)) from None
        archive = {"download_archive": str(out_dir / ARCHIVE_NAME)}
        with yt_dlp.YoutubeDL(options | archive) as ydl:
            pp = _store_wav_pp(cfg.acquire.sample_rate, cfg.acquire.max_duration_s)
            ydl.add_post_processor(pp, when="post_process")
            if info.get("_type") != "playlist":
                return [_fetch_entry(ydl, pp, info, url, cfg, out_dir)]
            rows = []
            for entry in info.get("entries") or []:
                try:
                    rows.append(_fetch_entry(ydl, pp, entry, url, cfg, out_dir))
                except AcquireError as err:  # one bad video must not lose the rest of the playlist
                    rows.append({"id": _entry_ids(entry, url)[0], "source": _entry_url(entry, url), "error": str(err)})
            return rows
