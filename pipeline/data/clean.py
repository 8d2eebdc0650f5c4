"""Clean both corpora: drop implausible notes and unusable pieces, optionally cut long performances into segments.

Inputs: style = `data/transcribe/midi/*.mid`, base = `data/base/midi/*.mid`. Outputs one-track piano MIDI at
`data/clean/<corpus>/<id>.mid`, or `<id>__s00.mid`, `<id>__s01.mid`... when `segment_s > 0` cuts a piece.
"""

from __future__ import annotations

import bisect
from collections import Counter
from pathlib import Path

import pretty_midi

from pipeline.core import constants as C
from pipeline.core.config import CleanConfig, Config, section_json
from pipeline.core.files import sha256_file, sha256_text
from pipeline.core.items import (
    ItemResult,
    Job,
    StageReport,
    count_outputs,
    finish_stage,
    run_item_stage,
    summed_stats,
)
from pipeline.core.midi import load_midi, notes_to_midi, piano_notes, save_midi, tempo_at, with_notes

STAGE_VERSION = "clean-1"  # bump when cleaning changes, so every item is rebuilt
SOURCES = {C.STYLE: ("transcribe", "midi"), C.BASE: ("base", "midi")}  # corpus -> (input stage, its subfolder)
SEARCH_FRACTION = 0.25  # look for a note-free cut within +- this share of segment_s around each boundary
TAIL_FRACTION = 0.5  # a last piece shorter than this share of segment_s joins the segment before it
DROP_REASONS = ("short", "quiet", "out_of_range")  # per-note filters, counted in report.stats


def filter_notes(notes: list[pretty_midi.Note], cfg: CleanConfig) -> tuple[list[pretty_midi.Note], Counter]:
    """Drop implausible notes: too short, too quiet, or outside [min_pitch, max_pitch].

    Args:
        notes: one piano track's notes (seconds).
        cfg: the clean section.

    Returns:
        (kept notes, count of dropped notes per reason in DROP_REASONS; a note counts once, first reason wins).
    """
    kept, dropped = [], Counter({r: 0 for r in DROP_REASONS})
    for n in notes:
        if n.end - n.start < cfg.min_note_s:
            dropped["short"] += 1
        elif n.velocity < cfg.min_velocity:
            dropped["quiet"] += 1
        elif not cfg.min_pitch <= n.pitch <= cfg.max_pitch:
            dropped["out_of_range"] += 1
        else:
            kept.append(n)
    return kept, dropped


def piece_problem(notes: list[pretty_midi.Note], cfg: CleanConfig) -> str | None:
    """Why a piece (or segment) is unusable, or None: empty, too few notes, or too short."""
    if not notes:
        return "empty: no notes left"
    if len(notes) < cfg.min_notes:
        return f"near-silent: {len(notes)} notes < min_notes {cfg.min_notes}"
    span = max(n.end for n in notes) - min(n.start for n in notes)
    if span < cfg.min_duration_s:
        return f"too short: {span:.1f} s < min_duration_s {cfg.min_duration_s}"
    return None


def note_free_gaps(notes: list[pretty_midi.Note]) -> list[tuple[float, float]]:
    """Intervals (seconds) between the first onset and the last release where no note sounds."""
    gaps, reach = [], None
    for n in sorted(notes, key=lambda x: x.start):
        if reach is not None and n.start > reach:
            gaps.append((reach, n.start))
        reach = n.end if reach is None else max(reach, n.end)
    return gaps


def _best_cut(target: float, window: float, gaps: list[tuple[float, float]], starts: list[float]) -> float:
    """The note-free time nearest `target` within +- window; else the onset nearest `target` (no note is split
    either way: a note crossing the cut stays whole in the segment where it starts)."""
    best, best_dist = None, window
    for lo, hi in gaps:
        point = min(max(target, lo), hi)
        if abs(point - target) <= best_dist:
            best, best_dist = point, abs(point - target)
    if best is not None:
        return best
    i = bisect.bisect_left(starts, target)
    near = [s for s in starts[max(i - 1, 0) : i + 1] if abs(s - target) <= window]
    return min(near, key=lambda s: abs(s - target)) if near else target


def segment_bounds(notes: list[pretty_midi.Note], segment_s: float) -> list[tuple[float, float]]:
    """Cut times for a performance: [(start, end), ...] covering all onsets, each about `segment_s` long.

    Args:
        notes: the piece's notes (seconds), non-empty.
        segment_s: target segment length in seconds; <= 0 means one segment.

    Returns:
        Half-open onset intervals; a note belongs to the interval holding its start.
    """
    end = max(n.end for n in notes)
    if segment_s <= 0:
        return [(0.0, float("inf"))]
    gaps, starts = note_free_gaps(notes), sorted(n.start for n in notes)
    bounds, cur = [], 0.0
    while end - cur > segment_s * (1 + TAIL_FRACTION):
        cut = _best_cut(cur + segment_s, segment_s * SEARCH_FRACTION, gaps, starts)
        if cut <= cur:
            cut = cur + segment_s
        bounds.append((cur, cut))
        cur = cut
    bounds.append((cur, float("inf")))
    return bounds


def _segment_midi(pm: pretty_midi.PrettyMIDI, notes: list[pretty_midi.Note], lo: float) -> pretty_midi.PrettyMIDI:
    """A segment as its own file starting at 0 s, at the tempo in force at its start."""
    shifted = [pretty_midi.Note(n.velocity, n.pitch, n.start - lo, n.end - lo) for n in notes]
    return notes_to_midi(shifted, tempo_bpm=tempo_at(pm, lo))


def clean_midi(
    pm: pretty_midi.PrettyMIDI, cfg: CleanConfig
) -> tuple[list[tuple[str, pretty_midi.PrettyMIDI]], dict[str, str], dict[str, int]]:
    """Clean one piece.

    Args:
        pm: the parsed input (any number of tracks; merged to one piano track).
        cfg: the clean section.

    Returns:
        (outputs as (id suffix, MIDI): `("", pm)` for a whole piece or `("__s00", pm)`... for segments;
        dropped parts as {suffix: reason} (suffix "" = the whole piece); stats: notes in/out and per-reason
        dropped-note counts).
    """
    notes = piano_notes(pm)
    kept, dropped_notes = filter_notes(notes, cfg)
    stats = {"notes_in": len(notes), "notes_out": 0, **{f"dropped_{r}": c for r, c in dropped_notes.items()}}
    problem = piece_problem(kept, cfg)
    if problem:
        return [], {"": problem}, stats
    bounds = segment_bounds(kept, cfg.segment_s)
    if len(bounds) == 1:
        stats["notes_out"] = len(kept)
        return [("", with_notes(pm, kept))], {}, stats
    outputs, dropped = [], {}
    for i, (lo, hi) in enumerate(bounds):
        suffix = f"{C.SEGMENT_SEP}{i:02d}"
        part = [n for n in kept if lo <= n.start < hi]
        problem = piece_problem(part, cfg)
        if problem:
            dropped[suffix] = problem
            continue
        outputs.append((suffix, _segment_midi(pm, part, lo)))
        stats["notes_out"] += len(part)
    stats["segments"] = len(outputs)
    return outputs, dropped, stats


def clean_file(src: Path, corpus: str, cfg: CleanConfig, out_dir: Path) -> ItemResult:
    """Clean one MIDI file into `out_dir/<corpus>/`; raises MidiError when unreadable."""
    outputs, dropped, stats = clean_midi(load_midi(src), cfg)
    rels = []
    for suffix, pm in outputs:
        rel = f"{corpus}/{src.stem}{suffix}.mid"
        save_midi(pm, out_dir / rel)
        rels.append(rel)
    reasons = {f"{corpus}/{src.stem}{suffix}": why for suffix, why in dropped.items()}
    stats["pieces_dropped"] = int("" in dropped)
    stats["segments_dropped"] = len(dropped) - int("" in dropped)
    return ItemResult(outputs=rels, dropped=reasons, stats=stats)


def _inputs(inputs: dict[str, Path]) -> dict[str, list[Path]]:
    """Input files per corpus, sorted; a missing input folder is an empty corpus."""
    found = {}
    for corpus, (stage, sub) in SOURCES.items():
        folder = inputs[stage] / sub
        files = folder.glob("*") if folder.is_dir() else []
        # dot files are atomic writes still in progress (or left by a killed writer)
        found[corpus] = sorted(
            p for p in files if p.suffix.lower() in C.MIDI_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
    return found


def run_clean(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Clean the style and base corpora into `data/clean/{style,base}/` (incremental per input file)."""
    report = StageReport(stage="clean")
    params = section_json(cfg.clean)
    jobs = []
    for corpus, files in _inputs(inputs).items():
        for src in files:
            key = sha256_text(sha256_file(src), params, STAGE_VERSION)
            jobs.append(Job(f"{corpus}/{src.stem}", key, clean_file, (src, corpus, cfg.clean, out_dir)))
    ids = [j.item_id for j in jobs]
    index = run_item_stage(jobs, out_dir, report, cfg.project)
    for corpus in SOURCES:
        corpus_ids = [i for i in ids if i.startswith(f"{corpus}/")]
        report.stats[corpus] = {
            "inputs": len(corpus_ids),
            "outputs": count_outputs(index, corpus_ids),
            **summed_stats(index, corpus_ids),
        }
    return finish_stage(report, out_dir, params)
