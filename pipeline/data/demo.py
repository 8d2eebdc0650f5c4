"""Offline demo style corpus: music21 scores by a few composers, rendered to piano audio.

Stands in for "recordings of one pianist" when there is no internet: each piece's first `excerpt_s` seconds become
`data/demo/scores/<id>.mid` (the exact notes played: ground truth for transcription onset F1) and
`data/demo/audio/<id>.wav` (mono, rendered by fluidsynth, or by a small additive synth when fluidsynth or the
soundfont is missing).
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
from pipeline.core.config import Config, DemoConfig, section_json
from pipeline.core.files import atomic_path, sha256_file, sha256_text
from pipeline.core.items import ItemResult, Job, StageReport, finish_stage, run_item_stage
from pipeline.core.midi import MidiError, load_midi, note_totals, notes_to_midi
from pipeline.core.midi import save_midi as save_midi_file
from pipeline.data.base import corpus_item_id, corpus_root, list_corpus_pieces, parse_corpus_piece

STAGE_VERSION = "demo-1"  # bump when rendering changes, so every item is rebuilt
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


def excerpt_midi(rel_path: str, section: DemoConfig) -> pretty_midi.PrettyMIDI:
    """The first `excerpt_s` seconds of a corpus work as one piano track (program `section.program`).

    Raises:
        MidiError: when the excerpt holds fewer than MIN_DEMO_NOTES notes.
    """
    notes, bpm = parse_corpus_piece(rel_path, max_s=section.excerpt_s, follow_tempo=True)
    pm = notes_to_midi(notes, tempo_bpm=bpm, program=section.program)
    if len(pm.instruments[0].notes) < MIN_DEMO_NOTES:
        raise MidiError(f"{rel_path}: only {len(pm.instruments[0].notes)} notes in the first {section.excerpt_s} s")
    return pm


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


def make_demo_item(rel_path: str, item_id: str, section: DemoConfig, renderer: str, out_dir: Path) -> ItemResult:
    """Build one demo item: scores/<id>.mid then audio/<id>.wav rendered from exactly those notes."""
    pm = excerpt_midi(rel_path, section)
    midi_rel, wav_rel = f"scores/{item_id}.mid", f"audio/{item_id}.wav"
    save_midi_file(pm, out_dir / midi_rel)
    audio = render_audio(pm, out_dir / midi_rel, section, renderer)
    with atomic_path(out_dir / wav_rel) as tmp:
        sf.write(str(tmp), audio, section.sample_rate, subtype="PCM_16", format="WAV")
    stats = note_totals(pm.instruments[0].notes)
    stats["audio_s"] = round(len(audio) / section.sample_rate, 3)
    return ItemResult(outputs=[midi_rel, wav_rel], stats=stats)


def _item_params(section: DemoConfig, renderer: str) -> str:
    """What an item's files depend on: not the composer list or max_pieces (they only choose items)."""
    keep = section.model_dump(mode="json", exclude={"enabled", "composers", "max_pieces"})
    return json.dumps({**keep, "renderer": renderer}, sort_keys=True)


def run_demo(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Render the demo corpus into `data/demo/` (incremental: unchanged pieces are not re-rendered)."""
    section = cfg.demo
    report = StageReport(stage="demo")
    if not section.enabled:
        report.stats["enabled"] = False
        return report.finish(out_dir, section_json(section))
    renderer = renderer_for(section.soundfont)
    params = _item_params(section, renderer)
    jobs = []
    for rel in list_corpus_pieces(section.composers, section.max_pieces, smallest_first=True):
        item_id = corpus_item_id(rel)
        key = sha256_text(sha256_file(corpus_root() / rel), params, STAGE_VERSION)
        jobs.append(Job(item_id, key, make_demo_item, (rel, item_id, section, renderer, out_dir)))
    ids = [j.item_id for j in jobs]
    index = run_item_stage(jobs, out_dir, report, cfg.project.workers)
    audio_s = sum(index.entries.get(i, {}).get("stats", {}).get("audio_s", 0.0) for i in ids)
    report.stats.update(renderer=renderer, pieces=len(ids) - len(report.failed), audio_s=round(audio_s, 1))
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
