"""Continuous mode's density cap: the partner starts no more notes than the human, over a recent window.

An accompanist who plays twice as many notes as the soloist drowns them; the demo's partner did (182 notes against
the human's 115 in 15 s). The session counts the human's note-ons and the model's planned ones; each plan may start
at most `density_ratio` x (human onsets in the last `density_window_beats`) minus the model's onsets in that window
and already planned ahead. The engine then bans ids that strike a key (`ChunkContext.max_onsets`): the model can
still hold, end and rest, so the music stays well-formed. Planned onsets that are taken back are uncounted.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class DensityBudget:
    """Note-on times of both players (session seconds); the model's tagged by serial so a crop can take them back."""

    ratio: float
    window_beats: float
    human: deque[float] = field(default_factory=deque)
    model: deque[tuple[float, int]] = field(default_factory=deque)

    def fold_in(self, notes: list, cut: int | None) -> None:
        """The human's events of one fold-in, after the session took back the model's plan from serial `cut`."""
        if cut is not None:
            self.cancel_from(cut)
        self.human.extend(n.time for n in notes if n.kind == "on")

    def model_on(self, at: float, serial: int) -> None:
        self.model.append((at, serial))

    def cancel_from(self, serial: int) -> None:
        """Forget the model's onsets planned from `serial` on (the session took them back)."""
        self.model = deque((t, s) for t, s in self.model if s < serial)

    def onsets_left(self, now: float, tempo_bpm: float) -> int:
        """Note-ons the next plan may start."""
        start = now - self.window_beats * 60.0 / tempo_bpm
        while self.human and self.human[0] < start:
            self.human.popleft()
        while self.model and self.model[0][0] < start:
            self.model.popleft()
        return max(0, math.floor(self.ratio * len(self.human) + 1e-9) - len(self.model))
