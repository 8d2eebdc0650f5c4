"""A recorded jam session read back per track (`jam show`): notes in beats, a one-line summary each, a piano roll."""

from __future__ import annotations

from pathlib import Path

from pipeline.evaluate.features import Note, notes_from_score
from pipeline.evaluate.plots import session_roll_png


class SessionReadError(ValueError):
    """A session file that cannot be read as MIDI."""


def session_tracks(path: Path) -> dict[str, list[Note]]:
    """Track name (or `track <i>`) -> its notes, in beats, for the MIDI file at `path`."""
    from symusic import Score

    try:
        score = Score(str(path))
    except Exception as err:  # symusic raises bare RuntimeErrors for any unreadable file
        raise SessionReadError(f"cannot read {path}: {err}") from None
    tracks = {}
    for i, track in enumerate(score.tracks):
        single = Score(score.ticks_per_quarter)
        single.tempos, single.tracks = score.tempos, [track]
        tracks[track.name or f"track {i}"] = notes_from_score(single)
    return tracks


def summarise_session(path: Path, png: Path | None = None) -> tuple[list[str], Path]:
    """One line per track (notes, span in beats) and the piano roll written to `png` (default: beside `path`)."""
    tracks = session_tracks(path)
    lines = [f"{name}: {len(notes)} notes over {max((n.end for n in notes), default=0.0):.1f} beats"
             for name, notes in tracks.items()]  # fmt: skip
    return lines, session_roll_png(tracks, png or path.with_suffix(".png"), title=path.name)
