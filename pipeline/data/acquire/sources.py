"""What acquire reads: every style's `sources` expanded into `Source`s, one adapter per kind behind `make_adapter`.

An adapter is `fetch(source, cfg, out_dir) -> list[row]`: it stores the source's items under `out_dir` and returns
one manifest row per item (a playlist yields several). A row with an `error` key is a failed item, one with a
`dropped` key was filtered out (too long); neither goes into the manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.core import constants as C
from pipeline.core.config import Config
from pipeline.core.files import sha256_file, sha256_text, slug
from pipeline.core.items import ItemError
from pipeline.data.acquire.manifest import Row

STAGE_VERSION = "acquire-1"
MANIFEST_FIELDS = ("id", "kind", "source", "title", "uploader", "duration_s", "license", "sha256", "fetched_at")
URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)

Adapter = Callable[["Source", Config, Path], list[Row]]


class AcquireError(ItemError):
    """A source or item that cannot be acquired; the message is one clear line for the report."""


@dataclass
class Source:
    """One entry of a style's `sources` after folder expansion.

    Attributes:
        kind: "url", "audio", "midi", or "invalid" (a missing path or an unsupported file type).
        location: the URL, or the file path as given (relative to the CWD).
        style: the style (player) whose sources list it; its items carry it into the manifest.
        problem: why an "invalid" source is unusable, when that is not the file itself (listed by two styles).
    """

    kind: str
    location: str
    style: str = ""
    problem: str = ""

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


def _file_source(path: Path, style: str) -> Source:
    suffix = path.suffix.lower()
    kind = "audio" if suffix in C.AUDIO_EXTENSIONS else "midi" if suffix in C.MIDI_EXTENSIONS else "invalid"
    return Source(kind if path.is_file() else "invalid", str(path), style)


def _expand(text: str, style: str) -> list[Source]:
    if URL_RE.match(text):
        return [Source("url", text, style)]
    if Path(text).is_dir():
        exts = (*C.AUDIO_EXTENSIONS, *C.MIDI_EXTENSIONS)
        return [_file_source(p, style) for p in sorted(Path(text).rglob("*")) if p.suffix.lower() in exts]
    return [_file_source(Path(text), style)]


def expand_sources(cfg: Config) -> list[Source]:
    """Every style's sources as one flat, de-duplicated list; folders expand to their audio/MIDI files, sorted.

    A source listed by two styles belongs to neither: it comes back once as "invalid" with the reason (a piece is
    one player's), so the report names it and the other sources go on.

    Args:
        cfg: the project config; paths are relative to the CWD.

    Returns:
        Sources in the order given (styles in order, folder contents sorted).
    """
    out: dict[str, Source] = {}
    for style, section in cfg.styles.items():
        for text in section.sources:
            for source in _expand(text, style):
                key = source.location if source.kind == "url" else str(Path(source.location).resolve())
                if key not in out:
                    out[key] = source
                elif out[key].style != style and out[key].kind != "invalid":
                    first = out[key].style
                    out[key] = Source("invalid", source.location, first, f"listed by styles {first} and {style}")
    return list(out.values())


def source_key(source: Source, cfg: Config) -> str:
    """Cache key: source content (or URL), the params that shape the stored files, the code version."""
    params = {"sample_rate": cfg.acquire.sample_rate, "max_duration_s": cfg.acquire.max_duration_s}
    return sha256_text(source.sha256, json.dumps(params if source.kind != "midi" else {}), STAGE_VERSION)


def _invalid(source: Source, cfg: Config, out_dir: Path) -> list[Row]:
    path = source.path
    if source.problem:
        raise AcquireError(source.problem)
    raise AcquireError("no such file" if not path.exists() else f"unsupported file type '{path.suffix}'")


def make_adapter(kind: str) -> Adapter:
    """The fetch function for a source kind ("url", "audio", "midi"; anything else fails with a clear message)."""
    if kind == "url":
        from pipeline.data.acquire.url import fetch_url

        return fetch_url
    if kind == "audio":
        from pipeline.data.acquire.audio import fetch_audio_file

        return fetch_audio_file
    if kind == "midi":
        from pipeline.data.acquire.midi import fetch_midi_file

        return fetch_midi_file
    return _invalid


def make_row(item_id: str, kind: str, source: str, path: Path, **meta: Any) -> Row:
    """A manifest row for the stored file `path`; unknown fields stay None."""
    row = dict.fromkeys(MANIFEST_FIELDS) | {"id": item_id, "kind": kind, "source": source}
    row |= {"sha256": sha256_file(path), "fetched_at": datetime.now(UTC).isoformat(timespec="seconds")}
    return row | {k: v for k, v in meta.items() if v is not None}


def dropped_row(item_id: str, source: str, seconds: float | None) -> Row:
    return {"id": item_id, "source": source, "dropped": f"longer than acquire.max_duration_s ({seconds} s)"}


def one_line(err: BaseException) -> str:
    """An exception as one report line, without yt-dlp's `ERROR: ` prefix and `(caused by ...)` tail."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    text = re.sub(r"^ERROR: ", "", text)
    return re.sub(r" \(caused by .*$", "", text)
