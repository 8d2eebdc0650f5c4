"""Augment the style TRAIN pieces: miditok pitch/velocity/duration offsets, plus our own time stretch.

Only the train items of every style in split.json are read (from `data/clean/style/`), so no copy of a held-out
piece reaches training. Every copy is `data/augment/midi/<id>__a<tag>.mid`; the tag names what changed, e.g.
`p+2`, `v-8`, `d+0.25`, `p+2_t1.10`, `t0.90`; the original is `<id>__a0`.
"""

from __future__ import annotations

from pathlib import Path

from miditok.data_augmentation import augment_score_multiple_offsets
from symusic import Score

from pipeline.core import constants as C
from pipeline.core.config import AugmentConfig, Config, section_json
from pipeline.core.files import atomic_path, sha256_file, sha256_text
from pipeline.core.items import (
    ItemResult,
    Job,
    StageReport,
    finish_stage,
    run_item_stage,
    summed_stats,
)
from pipeline.core.midi import MidiError
from pipeline.data.split import load_split, style_items

STAGE_VERSION = "augment-1"  # bump when augmentation changes, so every item is rebuilt
ORIGINAL_TAG = "0"
VELOCITY_RANGE = (1, C.MIDI_MAX_VELOCITY)  # velocities are clipped into this after an offset
MIN_DURATION_BEATS = 0.03125  # a negative duration offset never shortens a note below 1/32 beat


def copy_tag(pitch: int = 0, velocity: int = 0, duration_beats: float = 0.0, tempo_factor: float = 1.0) -> str:
    """Readable, stable tag of one copy: `p+2_v-8_d+0.25_t1.10`, only the parts that changed; "0" for none."""
    parts = []
    if pitch:
        parts.append(f"p{pitch:+d}")
    if velocity:
        parts.append(f"v{velocity:+d}")
    if duration_beats:
        parts.append(f"d{duration_beats:+.2f}")
    if tempo_factor != 1.0:
        parts.append(f"t{tempo_factor:.2f}")
    return "_".join(parts) or ORIGINAL_TAG


def time_stretch(score: Score, factor: float) -> Score:
    """A copy with every event time (onsets, durations, tempo and pedal events) in ticks multiplied by `factor`.

    The tokenizer's grid is in beats, so changing only the tempo would leave the tokens unchanged; scaling the
    ticks makes the copy genuinely slower (factor > 1) or faster.
    """
    end = max(score.end(), 1)
    return score.adjust_time([0, end], [0, round(end * factor)], inplace=False)


def augment_copies(score: Score, cfg: AugmentConfig) -> list[tuple[str, Score]]:
    """The original and all augmented copies of one piece, each with its tag.

    Pitch offsets that would take any note outside the piano's range are skipped (miditok restricts them to the
    program's tessitura; program 0 = piano, MIDI 21..108). Every offset copy, and the original, is also
    time-stretched by each tempo factor.

    Args:
        score: one clean piece (one piano track), ticks.
        cfg: the augment section.

    Returns:
        [(tag, score)], the original first as ("0", score).
    """
    if score.note_num() == 0:
        raise MidiError("no notes to augment")
    tpq = score.ticks_per_quarter
    beats_of = {round(b * tpq): b for b in cfg.duration_offsets if b}  # miditok reports ticks; tags say beats
    offsets = augment_score_multiple_offsets(
        score,
        pitch_offsets=[p for p in cfg.pitch_offsets if p],
        velocity_offsets=[v for v in cfg.velocity_offsets if v],
        duration_offsets=[b for b in cfg.duration_offsets if b],
        all_offset_combinations=cfg.all_offset_combinations,
        restrict_on_program_tessitura=True,
        velocity_range=VELOCITY_RANGE,
        min_duration=MIN_DURATION_BEATS,
    )
    base = [((0, 0, 0), score)] + [(o, s) for o, s in offsets if any(o)]
    factors = [1.0, *sorted({f for f in cfg.tempo_factors if f != 1.0})]
    copies = []
    for (pitch, velocity, duration_ticks), copy in base:
        duration_beats = beats_of.get(duration_ticks, duration_ticks / tpq)
        for factor in factors:
            tag = copy_tag(pitch, velocity, duration_beats, factor)
            copies.append((tag, copy if factor == 1.0 else time_stretch(copy, factor)))
    return copies


def augment_file(src: Path, item_id: str, cfg: AugmentConfig, out_dir: Path) -> ItemResult:
    """Write every copy of one clean piece to `out_dir/midi/<id>__a<tag>.mid`."""
    try:
        score = Score(str(src))
    except Exception as err:  # symusic raises RuntimeError/ValueError on bad bytes
        raise MidiError(f"unreadable MIDI ({type(err).__name__}: {err})") from None
    rels = []
    for tag, copy in augment_copies(score, cfg):
        rel = f"midi/{item_id}{C.AUG_SEP}{tag}.mid"
        with atomic_path(out_dir / rel) as tmp:
            copy.dump_midi(str(tmp))
        rels.append(rel)
    return ItemResult(outputs=rels, stats={"copies": len(rels)})


def train_ids(split_dir: Path) -> list[str]:
    """Train item ids of every style from split.json (raises FileNotFoundError when the split stage has not run)."""
    return style_items(load_split(split_dir, "augment"), "train")


def run_augment(cfg: Config, inputs: dict[str, Path], out_dir: Path) -> StageReport:
    """Augment the style train pieces into `data/augment/midi/` (incremental per piece)."""
    clean_dir = inputs["clean"] / C.STYLE
    report = StageReport(stage="augment")
    params = section_json(cfg.augment)
    jobs = []
    for item_id in train_ids(inputs["split"]):
        src = clean_dir / f"{item_id}.mid"
        if not src.is_file():
            report.items_in += 1
            report.failed[item_id] = f"listed in split.json but {src} is missing; re-run clean and split"
            continue
        key = sha256_text(sha256_file(src), params, STAGE_VERSION)
        jobs.append(Job(item_id, key, augment_file, (src, item_id, cfg.augment, out_dir)))
    ids = [j.item_id for j in jobs]
    index = run_item_stage(jobs, out_dir, report, cfg.project)
    done = len(ids) - sum(1 for i in ids if i in report.failed)
    copies = summed_stats(index, ids).get("copies", 0)
    report.stats.update(pieces_in=done, copies_out=copies, factor=round(copies / done, 2) if done else 0.0)
    return finish_stage(report, out_dir, params)
