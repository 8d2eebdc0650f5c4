"""MIDI sources: stored byte for byte as `midi/<id>.mid` once they parse and hold notes (transcribe merges tracks)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.files import write_bytes
from pipeline.data.acquire.manifest import Row
from pipeline.data.acquire.sources import AcquireError, Source, make_row, one_line


def fetch_midi_file(source: Source, cfg: Config, out_dir: Path) -> list[Row]:
    """Check one MIDI file and copy it into the stage.

    Raises:
        AcquireError: empty, malformed, or without notes.
    """
    if source.path.stat().st_size == 0:
        raise AcquireError("empty file (0 bytes)")
    import pretty_midi

    try:
        pm = pretty_midi.PrettyMIDI(str(source.path))
    except Exception as err:  # mido/pretty_midi raise many types for malformed files
        raise AcquireError(f"malformed MIDI: {one_line(err)}") from None
    if not any(inst.notes for inst in pm.instruments):
        raise AcquireError("MIDI has no notes")
    dest = out_dir / "midi" / f"{source.item_id}.mid"
    write_bytes(dest, source.path.read_bytes())
    meta = {"title": source.path.stem, "duration_s": round(pm.get_end_time(), 3)}
    return [make_row(source.item_id, "midi", source.location, dest, **meta)]
