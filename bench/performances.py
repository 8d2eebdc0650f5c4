"""An expressive benchmark set built offline: the demo's scores played like a pianist, rendered with fluidsynth.

Each score (music21 corpus, `pipeline.data.demo` helpers) gets rubato (a smooth tempo curve), dynamics (phrase
swells plus touch noise), chord spreads (bottom-up, up to 40 ms) and a sustain pedal changed every ~2 s (CC64).
Ground truth: `scores/<id>.mid` holds the notes as played (key releases) and the pedal.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pretty_midi

from pipeline.core.styles import DemoConfig
from pipeline.data.base import list_corpus_pieces
from pipeline.data.demo import excerpt_midi

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
RUBATO = 0.2  # peak tempo deviation (fraction) of the tempo curve
RUBATO_PERIOD_S = 7.0  # seconds per accelerando/ritardando cycle
PEDAL_EVERY_S = 2.0  # seconds between pedal changes
SPREAD_S = 0.04  # seconds: widest chord spread


def _warp(t: np.ndarray | float, phase: float) -> np.ndarray | float:
    """Score time -> performed time: d(warp)/dt = 1 + RUBATO sin(...) > 0 (monotone, so order is kept)."""
    w = 2 * np.pi / RUBATO_PERIOD_S
    return t + RUBATO / w * (np.cos(phase) - np.cos(w * t + phase))


def perform(score: pretty_midi.PrettyMIDI, rng: np.random.Generator) -> pretty_midi.PrettyMIDI:
    """`score` played expressively (see the module docstring); one piano track with notes and CC64."""
    phase = float(rng.uniform(0, 2 * np.pi))
    notes = sorted((n for i in score.instruments for n in i.notes), key=lambda n: (n.start, n.pitch))
    played, chord_t, rank = [], None, 0
    for n in notes:
        rank = rank + 1 if chord_t is not None and abs(n.start - chord_t) < 0.01 else 0
        chord_t = n.start
        start = float(_warp(n.start, phase)) + rank * SPREAD_S / 4 * float(rng.uniform(0.5, 1.0))
        end = max(float(_warp(n.end, phase)), start + 0.05)
        swell = 0.75 + 0.35 * np.sin(2 * np.pi * start / 5.0 + phase)
        velocity = int(np.clip(round(n.velocity * swell + rng.normal(0, 6)), 20, 120))
        played.append(pretty_midi.Note(velocity, n.pitch, start, end))
    piano = pretty_midi.Instrument(program=0, name="Piano")
    piano.notes = played
    last = max(n.end for n in played)
    for t in np.arange(0.3, last, PEDAL_EVERY_S):
        piano.control_changes += [pretty_midi.ControlChange(64, 127, t), pretty_midi.ControlChange(64, 0, t + 1.8)]
    pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    pm.instruments.append(piano)
    return pm


def build(folder: Path, pieces: int, seconds: float, seed: int = 0) -> Path:
    """Write `pieces` performances (`seconds` each) as `scores/<id>.mid` + fluidsynth `audio/<id>.wav` (22.05 kHz)."""
    rng = np.random.default_rng(seed)
    demo = DemoConfig(excerpt_s=seconds)
    (folder / "scores").mkdir(parents=True, exist_ok=True)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    made = 0
    player = demo.players["classical"]  # keyboard and chamber works: the demo player a pianist would perform
    for rel in list_corpus_pieces(player.composers, 3 * pieces, smallest_first=True):
        if made == pieces:
            break
        try:
            pm = perform(excerpt_midi(rel, demo, player), rng)
        except Exception:  # a corpus work too sparse for an excerpt: take the next
            continue
        item = f"perf{made:02d}"
        pm.write(str(folder / "scores" / f"{item}.mid"))
        wav = folder / "audio" / f"{item}.wav"
        cmd = [
            "fluidsynth",
            "-ni",
            "-q",
            "-F",
            str(wav),
            "-r",
            "22050",
            str(SOUNDFONT),
            str(folder / "scores" / f"{item}.mid"),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        made += 1
    return folder
