"""Acquire: URLs (anything yt-dlp supports), audio files and MIDI files -> `data/acquire/`.

Audio is stored as mono 16-bit WAV at `acquire.sample_rate` (`audio/<id>.wav`), MIDI as given (`midi/<id>.mid`),
one manifest row per item (`manifest.jsonl`); `archive.txt` is yt-dlp's download archive. One adapter per source
kind (`url`, `audio`, `midi`) behind `sources.make_adapter`; `stage` drives them and writes the manifest.
"""

from __future__ import annotations

from pipeline.data.acquire.audio import convert_to_wav
from pipeline.data.acquire.manifest import ARCHIVE_NAME, MANIFEST_NAME, read_manifest, write_manifest
from pipeline.data.acquire.sources import AcquireError, Source, expand_sources, make_adapter, source_key
from pipeline.data.acquire.stage import acquire_source, run_acquire

__all__ = [
    "ARCHIVE_NAME",
    "MANIFEST_NAME",
    "AcquireError",
    "Source",
    "acquire_source",
    "convert_to_wav",
    "expand_sources",
    "make_adapter",
    "read_manifest",
    "run_acquire",
    "source_key",
    "write_manifest",
]
