"""An expressive benchmark set built offline: the demo's scores played like a pianist, rendered with fluidsynth.

Each score (music21 corpus, `pipeline.data.demo` helpers) is performed by `pipeline.data.perform`: rubato (a smooth
tempo curve), dynamics (phrase swells plus touch noise), chord spreads (bottom-up, up to 40 ms) and a sustain pedal
changed every ~2 s (CC64).
Ground truth: `scores/<id>.mid` holds the notes as played (key releases) and the pedal.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from pipeline.core.styles import DemoConfig
from pipeline.data.base import list_corpus_pieces
from pipeline.data.demo import excerpt_midi
from pipeline.data.perform import BENCH_SWELL, perform

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")


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
            pm = perform(excerpt_midi(rel, demo, player), rng, swell=BENCH_SWELL)
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
