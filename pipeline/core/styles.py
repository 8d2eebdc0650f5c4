"""Who to learn from: params.yaml's `styles` (each player's sources) and the offline demo's players.

Kept apart from `config.py` (which composes every section) because these two describe the data, not a stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.core.section import Section


class DemoPlayer(Section):
    """One demo "player": music21 corpus works in one style, rendered as piano."""

    composers: list[str] = Field(min_length=1)  # music21 corpus names (`corpus.getComposer`), one work each in turn
    max_pieces: int = Field(30, ge=1)
    # add a simple left hand (bass on the first beat, chord on the others; I/IV/V chosen per bar from the melody):
    # for single-line tunes, which a pianist would not play bare
    accompany: bool = False


# Two demo players whose styles differ clearly: Classical keyboard and quartet movements (several voices, wide
# range, varied rhythm) against fiddle tunes (one running melody of even notes) over an oom-pah left hand.
DEFAULT_PLAYERS = {
    "classical": DemoPlayer(
        composers=["beethoven", "chopin", "cpebach", "haydn", "joplin", "mozart", "schumann_clara", "schumann_robert"]
    ),
    "folk": DemoPlayer(composers=["ryansMammoth"], accompany=True),
}


class DemoConfig(Section):
    """Offline demo sources: public-domain scores rendered to piano audio, held out of the base corpus."""

    enabled: bool = True
    # player name -> its works; audio lands in data/demo/audio/<player>/ (list it under `styles` to learn from it)
    players: dict[str, DemoPlayer] = Field(DEFAULT_PLAYERS, min_length=1)
    excerpt_s: float = Field(30.0, gt=0)  # seconds rendered per piece; transcription time grows with it
    soundfont: Path = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
    sample_rate: int = Field(22050, ge=8000)  # Hz; Basic Pitch resamples to 22050 anyway
    program: int = Field(0, ge=0, le=127)  # GM Acoustic Grand Piano

    @property
    def composers(self) -> list[str]:
        return sorted({c for p in self.players.values() for c in p.composers})


STYLE_NAME_RE = r"^[a-z0-9][a-z0-9_-]*$"  # a style names folders, MLflow runs and the bundle's adapter


TranscriberName = Literal["basic_pitch", "transkun"]  # `transcribe.backend`, or one style's own


class StyleConfig(Section):
    """One player (or style) to learn: its own sources, its own adapter on the shared base."""

    # YouTube video/playlist URLs (anything yt-dlp supports), audio/MIDI files or folders
    sources: list[str] = Field(min_length=1)
    # this style's audio transcribed by another backend than `transcribe.backend` (None: that one), e.g. a player
    # recorded on another instrument (basic_pitch), or the demo's rendered scores (no pedal, exact timing)
    transcriber: TranscriberName | None = None


# The demo's audio is rendered from scores: Basic Pitch transcribes its 25 minutes in 39 s, where Transkun took
# 5 min 53 s on 2 CPU cores (README "Transcription"); a real player's recordings get `transcribe.backend`.
DEFAULT_STYLES = {
    name: StyleConfig(sources=[f"data/demo/audio/{name}"], transcriber="basic_pitch") for name in DEFAULT_PLAYERS
}
