"""Fixtures for the symbolic-stage tests: tiny real MIDI files and a Config rooted in tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pretty_midi
import pytest

from pipeline.core.config import Config, config_from_dict

NoteSpec = tuple[int, float, float, int]  # (pitch, start s, end s, velocity)


def write_midi(path: Path, notes: list[NoteSpec], tracks: int = 1, tempo: float = 120.0) -> Path:
    """Write `notes` to a MIDI file, dealt round-robin over `tracks` instruments."""
    pm = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    insts = [pretty_midi.Instrument(program=0 if i == 0 else 40) for i in range(tracks)]
    for k, (pitch, start, end, vel) in enumerate(notes):
        insts[k % tracks].notes.append(pretty_midi.Note(vel, pitch, start, end))
    pm.instruments.extend(insts)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))
    return path


def melody(n: int, start: float = 0.0, step: float = 0.25, dur: float = 0.2, low: int = 60) -> list[NoteSpec]:
    """`n` notes going up and down a scale from `low`, one every `step` seconds."""
    shape = [0, 2, 4, 5, 7, 5, 4, 2]
    return [(low + shape[i % len(shape)], start + i * step, start + i * step + dur, 80) for i in range(n)]


@pytest.fixture
def midi_file() -> Callable[..., Path]:
    return write_midi


@pytest.fixture
def tune() -> Callable[..., list[NoteSpec]]:
    return melody


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """Config whose data_dir is tmp_path/data, one worker; keyword args are sections (dicts), and `sources` is a
    shorthand for one style named "solo" with those sources."""

    def make(sources: list[str] | None = None, **sections: Any) -> Config:
        project = {"data_dir": str(tmp_path / "data"), "workers": 1, **sections.pop("project", {})}
        if sources is not None:
            sections["styles"] = {"solo": {"sources": sources}}
        return config_from_dict({"project": project, **sections})

    return make
