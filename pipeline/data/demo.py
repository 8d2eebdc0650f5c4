"""Offline demo players: music21 scores in two clearly different styles, rendered to piano audio.

They stand in for "recordings of a pianist" when there is no internet: for each player (`demo.players`) each piece's
first `excerpt_s` seconds become `data/demo/scores/<player>/<id>.mid` (the exact notes played: ground truth for
transcription onset F1) and `data/demo/audio/<player>/<id>.wav` (mono, rendered by fluidsynth, or by a small
additive synth when fluidsynth or the soundfont is missing). A player with `accompany` gets a simple left hand
under its tunes (`pipeline.data.accompany`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile as sf

from pipeline.core import constants as C
from pipeline.core.audio import fluidsynth_missing, render_fluidsynth
from pipeline.core.config import Config, section_json
from pipeline.core.files import atomic_path, sha256_file, sha256_text
from pipeline.core.items import ItemResult, Job, StageReport, finish_stage, run_item_stage
from pipeline.core.midi import MidiError, load_midi, note_totals, notes_to_midi
from pipeline.core.midi import save_midi as save_midi_file
from pipeline.core.styles import DemoConfig, DemoPlayer
from pipeline.data.accompany import Meter, accompany
from pipeline.data.base import (
    corpus_file,
    corpus_item_id,
    list_corpus_pieces,
    load_corpus_score,
    score_notes,
)

STAGE_VERSION = "demo-2"  # bump when rendering changes, so every item is rebuilt
TAIL_S = 1.0  # seconds of release/reverb kept after the excerpt's last note
PEAK_DBFS = -1.0  # rendered audio is peak-normalised to this level
MIN_DEMO_NOTES = 8  # fewer notes in the excerpt: not worth rendering (e.g. a long rest at the start)
# Additive fallback synth: a piano-ish tone from decaying harmonics.
HARMONICS = 6  # partials per note
HARMONIC_ROLLOFF = 1.5  # partial k has amplitude 1 / k**rolloff
DECAY_S_AT_C4 = 1.2  # seconds for the fundamental to fall by 1/e at middle C; lower notes ring longer
RELEASE_S = 0.08  # seconds of fade after the key is released
MIDDLE_C = 60


def renderer_for(soundfont: Path) -> str:
    """'fluidsynth' when the binary and the soundfont are both there, else 'additive' (with a warning)."""
    missing = fluidsynth_missing(soundfont)
    if missing is None:
        return "fluidsynth"
    warnings.warn(
        f"demo: {missing} not found; rendering with the plain additive synth (audio will sound synthetic)",
        stacklevel=2,
    )
    return "additive"


def excerpt_midi(rel_path: str, section: DemoConfig, player: DemoPlayer) -> pretty_midi.PrettyMIDI:
    """The first `excerpt_s` seconds of a corpus work as one piano track (program `section.program`), with the
    player's left hand added when it accompanies.

    Raises:
        MidiError: when the excerpt holds fewer than MIN_DEMO_NOTES notes.
    """
    score = load_corpus_score(rel_path)
    notes, bpm = score_notes(score, max_s=section.excerpt_s, follow_tempo=True, seed_text=rel_path)
    if player.accompany:
        key = score.analyze("key")
        notes = notes + accompany(notes, key.tonic.pitchClass, key.mode == "minor", score_meter(score, bpm))
    pm = notes_to_midi(notes, tempo_bpm=bpm, program=section.program)
    if len(pm.instruments[0].notes) < MIN_DEMO_NOTES:
        raise MidiError(f"{rel_path}: only {len(pm.instruments[0].notes)} notes in the first {section.excerpt_s} s")
    return pm


def score_meter(score, bpm: float) -> Meter:
    """The score's first time signature as a Meter at `bpm`; a pickup bar moves bar 1 to its end."""
    from music21 import meter

    seconds_per_quarter = 60.0 / bpm
    found = score.recurse().getElementsByClass(meter.TimeSignature)
    ts = found[0] if found else meter.TimeSignature("4/4")
    measures = (score.parts[0] if score.parts else score).getElementsByClass("Measure")
    first = float(measures[0].duration.quarterLength) if measures else 0.0
    bar_q = float(ts.barDuration.quarterLength)
    start_q = first if 0 < first < bar_q else 0.0
    return Meter(int(ts.beatCount), float(ts.beatDuration.quarterLength) * seconds_per_quarter,
                 start_q * seconds_per_quarter)  # fmt: skip


def additive_synth(notes: list[pretty_midi.Note], sample_rate: int, duration_s: float) -> np.ndarray:
    """Mono float32 audio of `notes` as decaying harmonic tones (the no-soundfont fallback).

    Args:
        notes: notes in seconds.
        sample_rate: Hz.
        duration_s: length of the returned audio in seconds.

    Returns:
        Audio of shape (round(duration_s * sample_rate),), not normalised.
    """
    out = np.zeros(round(duration_s * sample_rate), dtype=np.float64)
    for n in notes:
        start = int(n.start * sample_rate)
        length = min(int((n.end - n.start + RELEASE_S) * sample_rate), len(out) - start)
        if length <= 0:
            continue
        t = np.arange(length) / sample_rate
        freq = pretty_midi.note_number_to_hz(n.pitch)
        decay = DECAY_S_AT_C4 * 2.0 ** ((MIDDLE_C - n.pitch) / 24)  # an octave down rings ~1.4x longer
        tone = sum(
            np.sin(2 * np.pi * freq * k * t) * np.exp(-t * k / decay) / k**HARMONIC_ROLLOFF
            for k in range(1, HARMONICS + 1)
            if freq * k < sample_rate / 2
        )
        held = n.end - n.start
        envelope = np.clip(1.0 - (t - held) / RELEASE_S, 0.0, 1.0)  # 1 while held, linear fade after
        out[start : start + length] += tone * envelope * (n.velocity / C.MIDI_MAX_VELOCITY)
    return out.astype(np.float32)


def _normalise(audio: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio if peak == 0 else audio * (10 ** (PEAK_DBFS / 20) / peak)


def render_audio(pm: pretty_midi.PrettyMIDI, midi_path: Path, section: DemoConfig, renderer: str) -> np.ndarray:
    """Peak-normalised mono audio of `pm` (already saved at `midi_path`), excerpt plus a short tail."""
    duration_s = pm.get_end_time() + TAIL_S
    if renderer == "fluidsynth":
        audio = render_fluidsynth(midi_path, section.soundfont, section.sample_rate, duration_s)
    else:
        audio = additive_synth(pm.instruments[0].notes, section.sample_rate, duration_s)
    return _normalise(audio)


def make_demo_item(
    rel_path: str, item_id: str, section: DemoConfig, player: DemoPlayer, renderer: str, out_dir: Path
) -> ItemResult:
    """Build one demo item: scores/<id>.mid then audio/<id>.wav rendered from exactly those notes (`item_id` holds
    the player's folder: "folk/acacia-reel")."""
    pm = excerpt_midi(rel_path, section, player)
    midi_rel, wav_rel = f"scores/{item_id}.mid", f"audio/{item_id}.wav"
    save_midi_file(pm, out_dir / midi_rel)
    audio = render_audio(pm, out_dir / midi_rel, section, renderer)
    with atomic_path(out_dir / wav_rel) as tmp:
        sf.write(str(tmp), audio, section.sample_rate, subtype="PCM_16", format="WAV")
    stats = note_totals(pm.instruments[0].notes)
    stats["audio_s"] = round(len(audio) / section.sample_rate, 3)
    return ItemResult(outputs=[midi_rel, wav_rel], stats=stats)


def _item_params(section: DemoConfig, player: DemoPlayer, renderer: str) -> str:
    """What an item's files depend on: not the composer lists or max_pieces (they only choose items)."""
    keep = section.model_dump(mode="json", exclude={"enabled", "players"})
    return json.dumps({**keep, "accompany": player.accompany, "renderer": renderer}, sort_keys=True)


def _jobs(section: DemoConfig, renderer: str, out_dir: Path) -> list[Job]:
    jobs = []
    for name, player in section.players.items():
        params = _item_params(section, player, renderer)
        for rel in list_corpus_pieces(player.composers, player.max_pieces, smallest_first=True):
            item_id = f"{name}/{corpus_item_id(rel)}"
            key = sha256_text(sha256_file(corpus_file(rel)), params, STAGE_VERSION)
            jobs.append(Job(item_id, key, make_demo_item, (rel, item_id, section, player, renderer, out_dir)))
    return jobs


def run_demo(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Render every demo player's pieces into `data/demo/` (incremental: unchanged pieces are not re-rendered)."""
    section = cfg.demo
    report = StageReport(stage="demo")
    if not section.enabled:
        report.stats["enabled"] = False
        return report.finish(out_dir, section_json(section))
    renderer = renderer_for(section.soundfont)
    jobs = _jobs(section, renderer, out_dir)
    index = run_item_stage(jobs, out_dir, report, cfg.project.workers)
    for name in section.players:
        ids = [j.item_id for j in jobs if j.item_id.startswith(f"{name}/")]
        audio_s = sum(index.entries.get(i, {}).get("stats", {}).get("audio_s", 0.0) for i in ids)
        failed = sum(1 for i in ids if i in report.failed)
        report.stats[name] = {"pieces": len(ids) - failed, "audio_s": round(audio_s, 1)}
    report.stats["renderer"] = renderer
    return finish_stage(report, out_dir, section_json(section))


def phrase_file(src: Path, dest: Path, bars: float = 2.0, rest_bars: float = 2.0, count: int = 4) -> int:
    """Cut a piece into `count` phrases of `bars` bars, each followed by `rest_bars` bars of silence.

    Played back as "the human" (`jam play --input`), it leaves the gaps in which a call-and-response partner answers;
    a recorded performance rarely pauses long enough on its own. Bars are 4/4 at the file's first tempo.

    Returns:
        Notes written.
    """
    pm = load_midi(src)
    bar_s = 4 * 60.0 / (pm.get_tempo_changes()[1][:1].tolist() or [120.0])[0]
    notes = sorted((n for inst in pm.instruments if not inst.is_drum for n in inst.notes), key=lambda n: n.start)
    if not notes:
        raise MidiError(f"{src}: no notes to cut phrases from")
    start, span, gap = notes[0].start, bars * bar_s, rest_bars * bar_s
    phrased = []
    for k in range(count):
        lo, hi, shift = start + k * span, start + (k + 1) * span, k * gap - start
        for n in notes:
            if lo <= n.start < hi:
                phrased.append(pretty_midi.Note(n.velocity, n.pitch, n.start + shift, min(n.end, hi) + shift))
    out = pretty_midi.PrettyMIDI(initial_tempo=240.0 / bar_s)
    piano = pretty_midi.Instrument(program=0, name="human")
    piano.notes = phrased
    out.instruments.append(piano)
    save_midi_file(out, dest)
    return len(phrased)
