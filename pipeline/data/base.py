"""Base corpus for pretraining: music21 corpus scores exported as piano MIDI, or a folder of MIDI files.

Also home of the music21 reading that the demo stage shares: choosing corpus pieces and turning a score into
piano notes with tempo-aware timing and dynamics-driven velocities.
"""

from __future__ import annotations

import bisect
import re
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import pretty_midi
from music21 import chord, common, corpus, dynamics, note, stream, tempo

from pipeline.core import constants as C
from pipeline.core.config import BaseCorpusConfig, Config, section_json
from pipeline.core.files import atomic_path, sha256_file, sha256_text, slug
from pipeline.core.items import (
    ItemResult,
    Job,
    StageReport,
    finish_stage,
    run_item_stage,
    summed_stats,
)
from pipeline.core.midi import (
    DEFAULT_TEMPO_BPM,
    MidiError,
    fix_overlaps,
    fold_pitch,
    load_midi,
    note_totals,
    notes_to_midi,
    piano_notes,
    save_midi,
    with_notes,
)
from pipeline.data.perform import perform_notes
from pipeline.data.tempo import notes_tempo

STAGE_VERSION = (
    "base-2"  # 2: performed scores at the beat heard  # bump when the export changes, so every item is rebuilt
)
ID_MAX_LEN = 64  # characters of an item id (slug of the corpus path)
# Score formats we read, best first: when a work exists as .mxl and .krn, the .mxl wins. .rntxt files are harmonic
# analyses, not playable pieces.
# .abc last: a fiddle-tune file holds one tune; an .abc collection (an Opus: O'Neill's, Essen) is one work per tune,
# parsed alone by its reference number (music21 `number=`: 0.04-0.3 s a tune, against 4-14 s for a whole book).
SCORE_SUFFIXES = (".mxl", ".musicxml", ".xml", ".krn", ".mid", ".midi", ".abc")
TUNE_SEP = "#"  # "oneills1850/0001-0050.abc#7": tune X:7 of that file
ABC_TUNE_RE = re.compile(r"^X:\s*(\d+)", re.MULTILINE)
# Velocity from a written dynamic: VELOCITY_FLOOR + music21 volumeScalar (0..1) * VELOCITY_SPAN; mf -> 75.
VELOCITY_FLOOR = 20
VELOCITY_SPAN = 100
DEFAULT_DYNAMIC = "mf"  # scores without dynamics are played mezzo-forte
LEAD_PART_BOOST = 6  # the first part (melody: soprano, violin I, right hand) sounds a little above the rest
VELOCITY_JITTER = 5  # +- MIDI velocity of seeded per-note variation, so the "pianist" is not a sequencer
VELOCITY_MIN, VELOCITY_MAX = 16, 120  # clamp after boost and jitter
TempoMap = tuple[list[float], list[float], list[float]]  # (start quarter, start second, seconds per quarter)
LEVEL_DYNAMICS = {"pppp", "ppp", "pp", "p", "mp", "mf", "f", "ff", "fff", "ffff"}  # sf/fp are accents, not levels


def corpus_root() -> Path:
    """The folder of music21's bundled corpus."""
    return Path(common.getCorpusFilePath())


def corpus_file(rel_path: str) -> Path:
    """The file of a corpus work ("oneills1850/0001-0050.abc#7" -> .../oneills1850/0001-0050.abc)."""
    return corpus_root() / rel_path.split(TUNE_SEP)[0]


def _tune_numbers(path: Path) -> list[int]:
    """Reference numbers (X:) of the tunes in an .abc file, in file order; one or none for a single tune."""
    return [int(m) for m in ABC_TUNE_RE.findall(path.read_text(errors="ignore"))]


def _works_of(path: Path, root: Path) -> list[tuple[str, float]]:
    """(corpus-relative work, size proxy): a collection of tunes gives one work per tune."""
    rel, size = str(path.relative_to(root)), float(path.stat().st_size)
    numbers = _tune_numbers(path) if path.suffix.lower() == ".abc" else []
    if len(numbers) < 2:
        return [(rel, size)]
    return [(f"{rel}{TUNE_SEP}{n}", size / len(numbers)) for n in dict.fromkeys(numbers)]


def _composer_works(composer: str, smallest_first: bool) -> list[str]:
    """Corpus-relative paths of one composer's playable scores, one per work (per tune of an .abc collection)."""
    root = corpus_root()
    best: dict[Path, Path] = {}
    for path in map(Path, corpus.getComposer(composer)):
        if path.suffix.lower() not in SCORE_SUFFIXES:
            continue
        stem = path.with_suffix("")
        rank = SCORE_SUFFIXES.index(path.suffix.lower())
        if stem not in best or rank < SCORE_SUFFIXES.index(best[stem].suffix.lower()):
            best[stem] = path
    works = [w for p in sorted(best.values()) for w in _works_of(p, root)]
    if smallest_first:  # file size is a cheap proxy for parse time
        works.sort(key=lambda w: (w[1], w[0]))
    return [w for w, _ in works]


def list_corpus_pieces(composers: list[str], max_pieces: int, smallest_first: bool = False) -> list[str]:
    """Deterministic choice of music21 corpus works: composers in turn (sorted), each in its own order.

    Taking one work per composer per round keeps a small selection varied.

    Args:
        composers: music21 composer names (`corpus.getComposer`).
        max_pieces: how many works at most.
        smallest_first: order each composer's works by file size (fast to parse) instead of by path.

    Returns:
        Corpus-relative paths, e.g. "bach/bwv1.6.mxl".
    """
    queues = [_composer_works(c, smallest_first) for c in sorted(set(composers))]
    picked: list[str] = []
    for rnd in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if rnd < len(queue) and len(picked) < max_pieces:
                picked.append(queue[rnd])
    return picked


def corpus_item_id(rel_path: str) -> str:
    """Stable item id of a corpus work: slug of its path without suffix ("bach-bwv1-6", "oneills1850-0001-0050-7")."""
    rel, _, number = rel_path.partition(TUNE_SEP)
    return slug(str(Path(rel).with_suffix("")) + (f"-{number}" if number else ""), max_len=ID_MAX_LEN)


def _seconds_map(score: stream.Score, follow_tempo: bool) -> TempoMap:
    """Piecewise-constant tempo as (start quarter, start second, seconds per quarter) lists."""
    marks: list[tuple[float, float]] = []
    for mark in score.recurse().getElementsByClass(tempo.MetronomeMark):
        try:
            marks.append((float(mark.getOffsetInHierarchy(score)), float(mark.secondsPerQuarter())))
        except Exception:  # a text-only mark without a number: keep the tempo already in force
            continue
    marks.sort()
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0.0, marks[0][1] if marks else 60.0 / DEFAULT_TEMPO_BPM))
    if not follow_tempo:
        marks = marks[:1]
    q0, s0, spq = [marks[0][0]], [0.0], [marks[0][1]]
    for q, rate in marks[1:]:
        if q == q0[-1]:
            spq[-1] = rate
            continue
        s0.append(s0[-1] + (q - q0[-1]) * spq[-1])
        q0.append(q)
        spq.append(rate)
    return q0, s0, spq


def _to_seconds(q: float, tmap: TempoMap) -> float:
    q0, s0, spq = tmap
    i = max(bisect.bisect_right(q0, q) - 1, 0)
    return s0[i] + (q - q0[i]) * spq[i]


def _velocity(dyn: str, boost: int, rng: np.random.Generator) -> int:
    scalar = dynamics.Dynamic(dyn).volumeScalar
    vel = VELOCITY_FLOOR + scalar * VELOCITY_SPAN + boost + rng.integers(-VELOCITY_JITTER, VELOCITY_JITTER + 1)
    return int(np.clip(round(vel), VELOCITY_MIN, VELOCITY_MAX))


def _part_notes(
    part: stream.Part, tmap: TempoMap, max_s: float, boost: int, rng: np.random.Generator
) -> list[pretty_midi.Note]:
    """Notes of one part in seconds: ties merged, grace notes skipped, dynamics followed."""
    if part.atSoundingPitch is False:  # transposing instrument written at concert-irrelevant pitch
        part = part.toSoundingPitch()
    out: list[pretty_midi.Note] = []
    tied: dict[int, pretty_midi.Note] = {}
    level = DEFAULT_DYNAMIC
    for el in part.flatten().getElementsByClass([note.Note, chord.Chord, dynamics.Dynamic]):
        if isinstance(el, dynamics.Dynamic):
            level = el.value if el.value in LEVEL_DYNAMICS else level
            continue
        start_q, length_q = float(el.offset), float(el.quarterLength)
        start = _to_seconds(start_q, tmap)
        if start >= max_s:
            break
        if length_q <= 0:
            continue
        end = min(_to_seconds(start_q + length_q, tmap), max_s)
        for n in el.notes if isinstance(el, chord.Chord) else [el]:
            pitch = fold_pitch(n.pitch.midi)
            tie = n.tie.type if n.tie is not None else None
            if tie in ("stop", "continue") and pitch in tied:
                tied[pitch].end = end
                if tie == "stop":
                    del tied[pitch]
                continue
            new = pretty_midi.Note(_velocity(level, boost, rng), pitch, start, end)
            out.append(new)
            if tie == "start":
                tied[pitch] = new
    return out


def score_notes(
    score: stream.Score, max_s: float = float("inf"), follow_tempo: bool = True, seed_text: str = ""
) -> tuple[list[pretty_midi.Note], float]:
    """All parts of a music21 score as piano notes in seconds.

    Args:
        score: parsed score (an Opus gives its first score).
        max_s: keep notes starting before this many seconds; ends are clipped to it.
        follow_tempo: obey every metronome mark; False keeps the first tempo throughout, so the MIDI beat grid
            matches the score's beats exactly (what a beat-based tokenizer wants).
        seed_text: seeds the velocity jitter, so the same piece always gets the same velocities.

    Returns:
        (notes sorted with same-pitch overlaps removed, initial tempo in BPM).
    """
    if isinstance(score, stream.Opus):
        score = score.scores[0]
    tmap = _seconds_map(score, follow_tempo)
    rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
    parts = list(score.parts) or [score]
    notes: list[pretty_midi.Note] = []
    for i, part in enumerate(parts):
        notes.extend(_part_notes(part, tmap, max_s, LEAD_PART_BOOST if i == 0 else 0, rng))
    return fix_overlaps(notes), 60.0 / tmap[2][0]


def load_corpus_score(rel_path: str) -> stream.Score:
    """A corpus work parsed by music21: one tune of a collection ("...abc#7"); an Opus otherwise gives its first."""
    rel, _, number = rel_path.partition(TUNE_SEP)
    with warnings.catch_warnings():  # music21 warns about every overfull measure; the notes are still right
        warnings.simplefilter("ignore")
        score = corpus.parse(rel, number=int(number) if number else None, forceSource=True)
    return score.scores[0] if isinstance(score, stream.Opus) else score


def parse_corpus_piece(
    rel_path: str, max_s: float = float("inf"), follow_tempo: bool = True
) -> tuple[list[pretty_midi.Note], float]:
    """Parse a corpus work and return `score_notes` of it (seeded by its path)."""
    return score_notes(load_corpus_score(rel_path), max_s=max_s, follow_tempo=follow_tempo, seed_text=rel_path)


def export_corpus_piece(rel_path: str, dest: Path, perform: bool = False) -> ItemResult:
    """music21 work -> one-track piano MIDI at its first tempo, performed if asked. Raises MidiError if empty."""
    notes, bpm = parse_corpus_piece(rel_path, follow_tempo=False)
    if perform:  # seeded by the path, like the velocities: the same score is always the same performance
        notes = fix_overlaps(perform_notes(notes, np.random.default_rng(zlib.crc32(f"perform:{rel_path}".encode()))))
        bpm = notes_tempo([n.start for n in notes], [n.velocity for n in notes], default=bpm)  # the beat heard
    pm = notes_to_midi(notes, tempo_bpm=bpm)
    if not pm.instruments[0].notes:
        raise MidiError(f"{rel_path}: no notes")
    save_midi(pm, dest)
    return ItemResult(outputs=[f"midi/{dest.name}"], stats=note_totals(pm.instruments[0].notes))


def import_midi_file(src: Path, dest: Path) -> ItemResult:
    """Validate a MIDI file and store it: copied byte for byte when already one track, else merged to piano."""
    pm = load_midi(src)
    notes = piano_notes(pm)
    if not notes:
        raise MidiError(f"{src.name}: no notes")
    melodic = [inst for inst in pm.instruments if not inst.is_drum]
    if len(melodic) == 1 and len(pm.instruments) == 1:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    else:
        save_midi(with_notes(pm, notes), dest)
    return ItemResult(outputs=[f"midi/{dest.name}"], stats=note_totals(notes))


def _music21_jobs(section: BaseCorpusConfig, out_dir: Path) -> list[Job]:
    # The export code and `perform` decide an item's content; composers/max_pieces choose items, so not in the key.
    jobs = []
    for rel in list_corpus_pieces(section.composers, section.max_pieces):
        item_id = corpus_item_id(rel)
        key = sha256_text(sha256_file(corpus_file(rel)), rel, STAGE_VERSION, f"perform={section.perform}")
        jobs.append(Job(item_id, key, export_corpus_piece, (rel, out_dir / "midi" / f"{item_id}.mid", section.perform)))
    return jobs


def _folder_jobs(section: BaseCorpusConfig, out_dir: Path, report: StageReport) -> list[Job]:
    root = Path(section.path)  # type: ignore[arg-type]  # validated: required for source "folder"
    if not root.is_dir():
        raise FileNotFoundError(f"base.path: folder not found: {root}")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in C.MIDI_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    jobs: dict[str, Job] = {}
    for src in files[: section.max_pieces]:
        item_id = slug(str(src.relative_to(root).with_suffix("")), max_len=ID_MAX_LEN)
        if item_id in jobs:
            report.dropped[str(src)] = f"same id {item_id!r} as an earlier file"
            continue
        key = sha256_text(sha256_file(src), STAGE_VERSION)
        jobs[item_id] = Job(item_id, key, import_midi_file, (src, out_dir / "midi" / f"{item_id}.mid"))
    return list(jobs.values())


def run_base(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Build `data/base/midi/<id>.mid` from the music21 corpus or a MIDI folder (incremental per piece)."""
    section = cfg.base
    report = StageReport(stage="base")
    if section.source == "music21":
        jobs = _music21_jobs(section, out_dir)
        empty = [c for c in section.composers if not corpus.getComposer(c)]
        if empty:
            report.stats["composers_without_pieces"] = empty
    else:
        jobs = _folder_jobs(section, out_dir, report)
    ids = [j.item_id for j in jobs]
    index = run_item_stage(jobs, out_dir, report, cfg.project.workers)
    report.stats.update(summed_stats(index, ids))
    return finish_stage(report, out_dir, section_json(section))
