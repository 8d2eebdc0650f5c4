"""Evaluate trained runs on their style's held-out test split and log the results to their MLflow runs.

Per fine-tune run (style from its `jam.style` tag; its base run once per style): mean token NLL and perplexity on
`data/tokenize/style/<style>/test.npy`; continuations of the shared prompts (`pipeline.evaluate.testset`) through the
runner's engine at fixed seeds, their validity rate, per-feature overlapping areas (`pipeline.evaluate.features`)
against the style's real test pieces, and `style_attribution`: the share of its continuations the style classifier
(`pipeline.evaluate.attribution`) attributes to its own style, beside the base's on the same prompts. Models load as
the jam runner loads them (`realtime.bundle.load_model`): the fine-tune with its adapter folded in, its base from the
same bundle without, so `base_*` metrics describe exactly the weights the adapter sits on. A tag `jam.eval_key` (hash
of the eval params and test data) makes a second `jam evaluate` skip runs already evaluated with the same settings.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import Config, section_json
from pipeline.core.files import sha256_text, write_json
from pipeline.core.items import StageReport, raise_if_all_failed
from pipeline.evaluate import confidence as CI
from pipeline.evaluate import features as F
from pipeline.evaluate import plots
from pipeline.evaluate import samples as S
from pipeline.evaluate.attribution import attribution, passage_attribution
from pipeline.evaluate.testset import EvalData, EvaluateError, load_eval_data
from pipeline.registry.client import RunsError, mlflow_client
from pipeline.registry.runs import (
    EVAL_KEY_TAG,
    RunSummary,
    download_bundle,
    get_run,
    list_runs,
    same_vocab,
)
from pipeline.registry.tracking import BASE_RUN_TAG, STYLE_TAG
from realtime.bundle_format import BundleError, load_tokenizer, read_bundle

STAGE = "evaluate"
EVAL_VERSION = "6"  # bump when a metric or the sampler changes, to re-evaluate every run (6: fixed-length samples)

__all__ = ["EvaluateError", "run_evaluate"]


@dataclass
class Generations:
    """One model's continuations of the shared prompts: a row per sample and its notes (None: undecodable)."""

    samples: list[dict[str, Any]]
    notes: list[list[F.Note] | None]
    out_dir: Path

    @property
    def pieces(self) -> list[list[F.Note]]:
        return [n for n in self.notes if n is not None]


@dataclass
class ModelEval:
    """One model's results on one style: metrics without prefix, its generations and their feature values."""

    metrics: dict[str, float]
    values: dict[str, np.ndarray]
    gens: Generations
    nll_sums: np.ndarray | None = None  # (n_windows,) nats per test window, for paired bootstrap CIs
    nll_counts: np.ndarray | None = None  # (n_windows,) tokens scored per test window
    extra: dict[str, Any] = field(default_factory=dict)


def eval_key(cfg: Config, data: EvalData) -> str:
    """Hash of everything an evaluation depends on besides the model: params (the runner's sampling controls and
    note limit included), test data, metric code version."""
    rt = cfg.realtime.model_dump(include={"temperature", "top_p", "top_k", "max_note_beats", "max_polyphony"})
    return sha256_text(section_json(cfg.evaluate), json.dumps(rt, sort_keys=True), data.key, EVAL_VERSION)[:16]


# ---------------------------------------------------------------- model


def window_nll(model, windows: np.ndarray, pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per window: summed next-token NLL (nats) over non-PAD targets, and their count. Two (n_windows,) arrays."""
    import torch
    import torch.nn.functional as TF

    sums, counts = [], []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = torch.as_tensor(windows[i : i + batch_size], dtype=torch.long)  # (batch, seq)
            mask = ids != pad_id
            logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
            target, keep = ids[:, 1:], mask[:, 1:]
            nll = TF.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (batch, seq - 1)
            sums.extend((nll * keep).sum(dim=1).tolist())
            counts.extend(keep.sum(dim=1).tolist())
    if not sum(counts):
        raise EvaluateError("test windows hold no tokens besides PAD")
    return np.asarray(sums), np.asarray(counts)


def mean_nll(model, windows: np.ndarray, pad_id: int, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats) over non-PAD targets of PAD-padded windows."""
    sums, counts = window_nll(model, windows, pad_id, batch_size)
    return float(sums.sum() / counts.sum())


# ---------------------------------------------------------------- one model


def generate(
    model, tokenizer, data: EvalData, cfg: Config, out_dir: Path, meta: dict, pool: S.ContinuationPool
) -> Generations:
    """Continue every shared prompt at every seed through the runner's engine (on `pool`'s processes); MIDI, piano
    rolls, WAVs to `out_dir`."""
    ec = cfg.evaluate
    try:
        items, prompts = S.make_prompts(tokenizer, data.prompt_paths, ec.prompt_tokens)
    except S.NoPrompts as err:
        raise EvaluateError(str(err)) from None
    max_len = int(meta.get("max_seq_len") or cfg.tokenize.max_seq_len)
    engine = S.make_engine(model, tokenizer, cfg, meta, max_len)
    tempo = float(meta.get("tempo_bpm") or cfg.finetune.tempo_bpm)
    continuations = pool.sample(engine, prompts, ec.seeds, tempo, ec.n_tokens, ec.sample_beats)
    gens = Generations([], [], out_dir)
    for i, ids in enumerate(continuations):
        item = items[i % len(items)]
        sample, notes = _one_sample(tokenizer, ids, ec.seeds[i // len(items)], item, i, data, cfg, out_dir, tempo)
        sample["prompt_style"] = data.prompt_style.get(item)
        if data.classifier is not None and notes is not None:
            sample["attributed"] = data.classifier.predict(notes)
        gens.samples.append(sample)
        gens.notes.append(notes)
    return gens


def score(model, gens: Generations, data: EvalData, style: str, cfg: Config) -> ModelEval:
    """Likelihood on `style`'s test windows, and its generations judged against `style`, with bootstrap CIs."""
    ec, test = cfg.evaluate, data.styles[style]
    sums, counts = window_nll(model, test.windows, data.pad_id, ec.batch_size)
    nll = float(sums.sum() / counts.sum())
    values = F.pooled_values(gens.pieces, ec.window_beats)
    oa = F.compare_sets(values, test.real_values, ec.oa_method)
    n_boot, seed = ec.bootstrap, cfg.project.seed
    lo, hi = CI.style_score_ci(gens.pieces, test.real_values, ec.window_beats, ec.oa_method, n_boot, seed)
    metrics = {
        "test_nll": nll,
        "test_ppl": math.exp(min(nll, 50.0)),  # capped: an untrained model must not log inf
        "validity_rate": sum(s["valid"] for s in gens.samples) / len(gens.samples),
        "style_score": F.style_score(oa),
        "style_score_ci_low": lo,
        "style_score_ci_high": hi,
        **{f"oa_{k}": v for k, v in oa.items()},
        # tonality, beside the style score rather than in it: mean share of a window's notes out of its key
        "out_of_key": F.mean_out_of_key(gens.pieces, ec.window_beats),
        "out_of_key_real": test.real_out_of_key,
    }
    if data.classifier is not None:  # every sample counts: an undecodable one is attributed to no style
        att = attribution(data.classifier, [n or [] for n in gens.notes], style, n_boot, seed)
        metrics.update(style_attribution=att["share"], style_attribution_ci_low=att["ci_low"],
                       style_attribution_ci_high=att["ci_high"])  # fmt: skip
        spans = [max(n.end for n in p) - min(n.start for n in p) for p in gens.pieces if p]
        if spans:  # what real passages of the samples' length score: a perfect imitation's attribution
            ref = passage_attribution(data.classifier, list(test.pieces.values()), style, float(np.median(spans)))
            metrics.update(style_attribution_real=ref["share"], style_attribution_real_passages=ref["passages"])
    if data.base_windows is not None:
        metrics["base_corpus_nll"] = mean_nll(model, data.base_windows, data.pad_id, ec.batch_size)
    return ModelEval(metrics=metrics, values=values, gens=gens, nll_sums=sums, nll_counts=counts)


def _one_sample(tokenizer, ids, seed, item, i, data: EvalData, cfg: Config, out_dir: Path, tempo: float):
    """Check, save, plot and (for the first `evaluate.audio`) render one sample. Returns (its row, notes or None)."""
    ec = cfg.evaluate
    score_, problems = F.check_sample(tokenizer, ids, ec.max_open_beats)
    notes = F.notes_from_score(score_) if score_ is not None else []
    name = f"{item}_seed{seed}"
    row = {"piece": item, "seed": seed, "tokens": len(ids), "notes": len(notes), "valid": not problems,
           "problems": problems}  # fmt: skip
    if score_ is None:
        return row, None
    midi = _mkdir(out_dir / "samples") / f"{name}.mid"
    score_.dump_midi(str(midi))
    if i < ec.plots and item in data.pieces:
        plots.piano_roll_png(
            notes, data.pieces[item], out_dir / f"pianoroll_{name}.png", (f"sample (seed {seed})", f"real: {item}")
        )
    if i < ec.audio and notes:
        length_s = max(n.end for n in notes) * 60.0 / tempo
        row["audio"] = S.render_wav(midi, out_dir / f"audio_{name}.wav", cfg, length_s) or f"audio_{name}.wav"
    return row, notes


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_outputs(out_dir: Path, ev: ModelEval, base: ModelEval | None, data: EvalData, style: str, ec) -> None:
    plots.feature_comparison_png(_oa(ev), _oa(base) if base else None, out_dir / "features_oa.png")
    sets = {"real": data.styles[style].real_values, "model": ev.values, **({"base": base.values} if base else {})}
    plots.feature_histograms_png(sets, out_dir / "features_hist.png")
    write_json(out_dir / "samples.json", ev.gens.samples)
    write_json(out_dir / "metrics.json", ev.metrics)
    write_json(out_dir / "eval_config.json", json.loads(section_json(ec)))


def _oa(ev: ModelEval) -> dict[str, float]:
    return {k.removeprefix("oa_"): v for k, v in ev.metrics.items() if k.startswith("oa_")}


def _log(client, run_id: str, metrics: dict[str, float], out_dir: Path, key: str, where: str = "eval") -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())])
    client.log_artifacts(run_id, str(out_dir), where)
    client.set_tag(run_id, EVAL_KEY_TAG, key)


# ---------------------------------------------------------------- runs


@dataclass
class Session:
    """What one `jam evaluate` shares between runs: the data, and each base's generations (the same prompts and
    seeds for every style, so a base is sampled once however many adapters sit on it)."""

    cfg: Config
    data: EvalData
    key: str
    client: Any
    root: Path
    pool: S.ContinuationPool
    force: bool = False
    base_gens: dict[str, Generations] = field(default_factory=dict)
    base_logs: dict[str, bool] = field(default_factory=dict)  # base run id -> log to it (it was not current)
    base_uploaded: set[str] = field(default_factory=set)  # base runs whose shared samples were uploaded


def _run_style(session: Session, run: RunSummary) -> str:
    style = run.tags.get(STYLE_TAG)
    if not style:
        raise EvaluateError(f"run has no {STYLE_TAG} tag (trained before styles existed): retrain with `jam run`")
    if style not in session.data.styles:
        raise EvaluateError(f"style {style!r} is not under params.yaml's styles {sorted(session.data.styles)}")
    return style


def evaluate_run(session: Session, run: RunSummary) -> dict:
    """Evaluate one run's bundle, log to it (and, for a fine-tune, to its base run). Returns the metrics logged.

    A fine-tune is judged on its style, beside its base on the same prompts; a base run alone (`--run-id`) on every
    style, its metrics logged as `<style>/<metric>`.
    """
    from realtime.bundle import load_model

    cfg, data = session.cfg, session.data
    bundle = download_bundle(cfg, run.run_id, session.root / "bundles")
    info = read_bundle(bundle)
    tokenizer = load_tokenizer(bundle / info["tokenizer"])
    if not same_vocab(tokenizer, load_tokenizer(data.tokenizer_path)):
        raise EvaluateError("the run's tokenizer differs from data/tokenize/tokenizer.json: re-tokenize or retrain")
    out = _fresh_dir(session.root / "runs" / run.run_id)
    if run.role != "finetune":
        return _evaluate_base_alone(session, run, load_model(bundle, adapters={}), tokenizer, info, out)
    style = _run_style(session, run)
    if not info["default_adapter"]:
        raise EvaluateError("fine-tune bundle has no default adapter to evaluate")
    model = load_model(bundle)  # as the jam runner plays it
    ev = score(model, generate(model, tokenizer, data, cfg, out, info, session.pool), data, style, cfg)
    base_model = load_model(bundle, adapters={})
    base_id = run.tags.get(BASE_RUN_TAG) or f"{run.run_id}_base"
    if base_id not in session.base_gens:
        base_out = _fresh_dir(session.root / "runs" / base_id)
        session.base_gens[base_id] = generate(base_model, tokenizer, data, cfg, base_out, info, session.pool)
    base = score(base_model, session.base_gens[base_id], data, style, cfg)
    _write_outputs(_mkdir(base.gens.out_dir / style), base, None, data, style, cfg.evaluate)
    if run.tags.get(BASE_RUN_TAG):
        _log_base_run(session, base_id, base, style)
    metrics = {**ev.metrics, **_against_base(ev, base, cfg)}
    if data.classifier is not None:
        metrics["attribution_classifier_accuracy"] = data.classifier_accuracy
    _write_outputs(out, ev, base, data, style, cfg.evaluate)
    _log(session.client, run.run_id, metrics, out, session.key)
    return metrics


def _evaluate_base_alone(session: Session, run: RunSummary, model, tokenizer, info: dict, out: Path) -> dict:
    cfg, data = session.cfg, session.data
    gens = generate(model, tokenizer, data, cfg, out, info, session.pool)
    metrics = {}
    for style in data.styles:
        ev = score(model, gens, data, style, cfg)
        _write_outputs(_mkdir(out / style), ev, None, data, style, cfg.evaluate)
        metrics.update({f"{style}/{k}": v for k, v in ev.metrics.items()})
    _log(session.client, run.run_id, metrics, out, session.key)
    return metrics


def _against_base(ev: ModelEval, base: ModelEval, cfg: Config) -> dict[str, float]:
    """The base's metrics (prefixed `base_`), nll_ratio with its paired bootstrap CI, and the forgetting figure."""
    out = {f"base_{k}": v for k, v in base.metrics.items()}
    out["nll_ratio"] = ev.metrics["test_nll"] / base.metrics["test_nll"]
    n_boot, seed = cfg.evaluate.bootstrap, cfg.project.seed
    lo, hi = CI.nll_ratio_ci(ev.nll_sums, base.nll_sums, ev.nll_counts, n_boot, seed)
    out.update(nll_ratio_ci_low=lo, nll_ratio_ci_high=hi)
    if "base_corpus_nll" in ev.metrics:  # > 0: the fine-tune got worse on the base corpus (forgetting)
        out["base_corpus_nll_change"] = ev.metrics["base_corpus_nll"] / base.metrics["base_corpus_nll"] - 1.0
        out["forgetting_ok"] = float(out["base_corpus_nll_change"] <= cfg.evaluate.max_forgetting)  # 1 / 0
    return out


def _log_base_run(session: Session, base_id: str, base: ModelEval, style: str) -> None:
    """Log the base's metrics on `style` as `<style>/<metric>` to the base run, unless it was already evaluated with
    this eval key before this session began."""
    if base_id not in session.base_logs:
        current = get_run(session.cfg, base_id, session.client).tags.get(EVAL_KEY_TAG) == session.key
        session.base_logs[base_id] = session.force or not current
    if session.base_logs[base_id]:
        metrics = {f"{style}/{k}": v for k, v in base.metrics.items()}
        first = base_id not in session.base_uploaded  # samples once; each later style adds only its own folder
        session.base_uploaded.add(base_id)
        folder, where = (base.gens.out_dir, "eval") if first else (base.gens.out_dir / style, f"eval/{style}")
        _log(session.client, base_id, metrics, folder, session.key, where)


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return _mkdir(path)


def _targets(cfg: Config, run_id: str | None, client) -> list[RunSummary]:
    if run_id:
        return [get_run(cfg, run_id, client)]
    return list_runs(cfg, role="finetune", client=client)


def run_evaluate(
    cfg: Config, inputs: dict[str, Path], out_dir: Path, run_id: str | None = None, force: bool = False
) -> StageReport:
    """Evaluate every fine-tune run not yet evaluated with the current eval params (or just `run_id`).

    Args:
        cfg: project config; `cfg.evaluate` holds the eval params.
        run_id: evaluate only this fine-tune run.
        force: re-evaluate even runs tagged with the current eval key.

    Returns:
        The stage report: processed / cached run ids, failures with one-line reasons, metrics in `stats`.

    Raises:
        EvaluateError: no test data. RunsError: no MLflow store or experiment. AllItemsFailed: every run failed.
    """
    import torch

    report = StageReport(stage=STAGE)
    data = load_eval_data(cfg, inputs)
    pool = S.ContinuationPool(cfg)
    session = Session(cfg, data, eval_key(cfg, data), mlflow_client(cfg), out_dir, pool, force)
    targets = _targets(cfg, run_id, session.client)
    report.items_in = len(targets)
    torch.manual_seed(cfg.project.seed)
    # Scoring on every core, generation at the runner's count (`generate`). The explicit call matters even with the
    # same number: torch's implicit default was measured 10x slower per token here (2-core container, OpenMP pool
    # sized from the host).
    torch.set_num_threads(torch.get_num_threads())
    with pool:
        for run in targets:
            if not force and run.tags.get(EVAL_KEY_TAG) == session.key:
                report.cached.append(run.run_id)
                continue
            try:
                report.stats[run.run_id] = evaluate_run(session, run)
                report.processed.append(run.run_id)
            except (EvaluateError, RunsError, BundleError) as err:
                report.failed[run.run_id] = str(err)
            except Exception as err:  # one broken run must not stop the others
                report.failed[run.run_id] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    logged_bases = sorted(b for b, logged in session.base_logs.items() if logged)
    report.outputs = len(report.processed) + len(logged_bases)
    report.stats.update(eval_key=session.key, base_runs_logged=logged_bases, attribution=data.classifier_note)
    report.finish(_mkdir(out_dir), section_json(cfg.evaluate))
    raise_if_all_failed(report)
    return report
