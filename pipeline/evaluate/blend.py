"""Blends between two styles: does the weight move what a listener hears? (`jam evaluate --blend A,B`)

For each weight w the bundle plays `{A: w, B: 1 - w}` (the runner's `realtime.adapters` blend, normalized) on the
shared prompts, and the style classifier says which share of its continuations sounds like A. A blend that works
moves that share from B's end to A's as w goes from 0 to 1.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.files import write_json
from pipeline.evaluate.attribution import attribution
from pipeline.evaluate.samples import ContinuationPool
from pipeline.evaluate.stage import generate
from pipeline.evaluate.testset import EvalData, EvaluateError
from realtime.bundle_format import load_tokenizer, read_bundle

DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_SPAN = 0.5  # share attributed to A at weight 1 minus at weight 0, at least, for a blend that works


def blend_problem(rows: list[dict[str, float]]) -> str | None:
    """Why a blend curve does not move with its weight (None: it does): the share attributed to A must not fall as
    the weight on A rises, and must rise by at least MIN_SPAN from one end to the other.

    A fall counts when it leaves the 95 % bootstrap interval of the later share (`ci_high` below the earlier
    share): the shares are estimated from a few dozen samples each, so a dip within that interval is sampling
    noise, not a blend moving the wrong way. Rows without CIs are taken as exact.
    """
    ordered = sorted(rows, key=lambda r: r["weight"])
    shares = [r["share"] for r in ordered]
    falls = [
        f"{a['share']:.2f} -> {b['share']:.2f}"
        for a, b in itertools.pairwise(ordered)
        if b.get("ci_high", b["share"]) < a["share"]
    ]
    if falls:
        return f"attribution falls as the weight rises ({', '.join(falls)})"
    if shares[-1] - shares[0] < MIN_SPAN:
        return f"attribution moves {shares[-1] - shares[0]:.2f} from one end to the other (< {MIN_SPAN})"
    return None


def blend_plan(a: str, b: str, weight: float) -> dict[str, float]:
    """The runner's adapter plan for weight `weight` on `a` (the rest on `b`); the ends play one adapter alone."""
    if weight >= 1.0:
        return {a: 1.0}
    if weight <= 0.0:
        return {b: 1.0}
    return {a: weight, b: 1.0 - weight}


def blend_curve(
    bundle: Path, a: str, b: str, data: EvalData, cfg: Config, out_dir: Path, weights=DEFAULT_WEIGHTS
) -> list[dict[str, float]]:
    """Attribution to `a` of the bundle's continuations at each blend weight, with 95 % bootstrap CIs.

    Returns:
        One row per weight: {"weight", "share", "ci_low", "ci_high"}; also written to `out_dir/blend.json`.

    Raises:
        EvaluateError: no classifier (fewer than two styles), or a style the bundle has no adapter for.
    """
    from realtime.bundle import load_model

    if data.classifier is None:
        raise EvaluateError(f"no style classifier: {data.classifier_note}")
    info = read_bundle(bundle)
    missing = [s for s in (a, b) if s not in info["adapters"] or s not in data.styles]
    if missing:
        raise EvaluateError(f"blend: {missing} not both an adapter of {bundle} ({sorted(info['adapters'])}) "
                            f"and a style in params ({sorted(data.styles)})")  # fmt: skip
    tokenizer = load_tokenizer(bundle / info["tokenizer"])
    rows = []
    with ContinuationPool(cfg) as pool:
        for w in weights:
            model = load_model(bundle, adapters=blend_plan(a, b, w), normalize=cfg.realtime.normalize_weights)
            gens = generate(model, tokenizer, data, cfg, out_dir / f"w{w:.2f}", info, pool)
            notes = [n or [] for n in gens.notes]
            share = attribution(data.classifier, notes, a, cfg.evaluate.bootstrap, cfg.project.seed)
            rows.append({"weight": float(w), **share})
    write_json(out_dir / "blend.json", {"a": a, "b": b, "rows": rows})
    return rows
