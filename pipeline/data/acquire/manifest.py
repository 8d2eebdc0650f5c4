"""The acquire stage's index of what it stored: `manifest.jsonl` (read by transcribe) and yt-dlp's `archive.txt`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.files import write_text

MANIFEST_NAME = "manifest.jsonl"
ARCHIVE_NAME = "archive.txt"  # yt-dlp's download archive: lines `<extractor> <video id>`

Row = dict[str, Any]  # one manifest row (MANIFEST_FIELDS), or one with an `error` or `dropped` key


def good_rows(rows: list[Row]) -> list[Row]:
    """The rows of stored items (no failed or dropped ones)."""
    return [r for r in rows if "error" not in r and "dropped" not in r]


def read_manifest(out_dir: Path) -> dict[str, Row]:
    """Manifest rows by item id ({} when there is none yet)."""
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


def write_manifest(rows: list[Row], out_dir: Path) -> Path:
    """Write `manifest.jsonl` (sorted by id, one row per id, no error/dropped rows) and compact the archive.

    yt-dlp appends to `archive.txt` as it stores each video; here it is cut down to what the manifest holds, so a
    pruned or deleted item is fetched again when its source comes back.
    """
    good = {r["id"]: r for r in reversed(good_rows(rows))}
    ordered = [good[k] for k in sorted(good)]
    write_text(out_dir / MANIFEST_NAME, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered))
    archive = sorted({r["archive_id"] for r in ordered if r.get("archive_id")})
    write_text(out_dir / ARCHIVE_NAME, "".join(a + "\n" for a in archive))
    return out_dir / MANIFEST_NAME
