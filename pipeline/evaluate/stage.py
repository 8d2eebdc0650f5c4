"""Evaluate trained runs on the held-out style test split and log the results to their MLflow runs.

Per fine-tune run (and once for its base run): mean token NLL and perplexity on `data/tokenize/style/test.npy`;
continuations of test-piece openings sampled at fixed seeds, their validity rate, and per-feature overlapping areas
(`pipeline.evaluate.features`) against the real test pieces. Models load as the jam runner loads them
(`realtime.bundle.load_model`): the fine-tune with its adapter folded in, its base from the same bundle without, so
`base_*` metrics describe exactly the weights the adapter sits on. A tag `jam.eval_key` (hash of the
eval params and test data) makes a second `jam evaluate` skip runs already evaluated with the same settings.
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

from pipeline.core import constants as C
from pipeline.core.config import Config, EvaluateConfig, section_json
from pipeline.core.files import read_json, sha256_file, sha256_text, write_json
from pipeline.core.items import StageReport, raise_if_all_failed
from pipeline.evaluate import confidence as CI
from pipeline.evaluate import features as F
from pipeline.evaluate import plots
from pipeline.evaluate import samples as S
from pipeline.registry.client import RunsError, mlflow_client
from pipeline.registry.runs import (
    BASE_RUN_TAG,
    EVAL_KEY_TAG,
    RunSummary,
    download_bundle,
    get_run,
    list_runs,
    same_vocab,
)
from realtime.bundle_format import TOKENIZER_FILE, BundleError, load_tokenizer, read_bundle, special_ids

STAGE = "evaluate"
EVAL_VERSION = "2"  # bump when a metric changes, to re-evaluate every run (2: runner engine, CIs, base corpus)


class EvaluateError(RuntimeError):
    """Nothing can be evaluated (no test data, bad bundle); the message says what to do."""


@dataclass
class TestSet:
    """The held-out style test split, ready for every model."""

    windows: np.ndarray  # (n_windows, max_seq_len) int32, PAD-padded
    pad_id: int
    pieces: dict[str, list[F.Note]]  # item id -> notes in beats (sorted ids)
    paths: dict[str, Path]  # item id -> clean MIDI
    real_values: dict[str, np.ndarray]  # pooled feature values of all pieces
    tokenizer_path: Path
    base_windows: np.ndarray | None = None  # base corpus test windows: forgetting is measured on them
    key: str = ""  # hash of the data (eval params are added by `eval_key`)


@dataclass
class ModelEval:
    """One model's results: metrics without prefix, samples and their feature values."""

    metrics: dict[str, float]
    values: dict[str, np.ndarray]
    samples: list[dict[str, Any]] = field(default_factory=list)
    nll_sums: np.ndarray | None = None  # (n_windows,) nats per test window, for paired bootstrap CIs
    nll_counts: np.ndarray | None = None  # (n_windows,) tokens scored per test window


# ---------------------------------------------------------------- data


def _piece_paths(clean_dir: Path, ids: list[str]) -> dict[str, Path]:
    """Clean MIDI of each test id: `<id>.mid`, or its segments `<id>__s*.mid` when the split lists pieces."""
    found: dict[str, Path] = {}
    for item in sorted(ids):
        path = clean_dir / f"{item}.mid"
        segments = [path] if path.exists() else sorted(clean_dir.glob(f"{item}{C.SEGMENT_SEP}*.mid"))
        found.update({p.stem: p for p in segments})
    return found


def _even_subset(windows: np.ndarray, limit: int) -> np.ndarray:
    if not limit or len(windows) <= limit:
        return windows
    return windows[np.linspace(0, len(windows) - 1, limit).round().astype(int)]


def _read_pieces(paths: dict[str, Path]) -> dict[str, list[F.Note]]:
    """Notes of each readable, non-empty piece (a broken test file is left out, not fatal)."""
    pieces = {}
    for item, path in sorted(paths.items()):
        try:
            notes = F.load_notes(path)
        except Exception:  # symusic raises RuntimeError/ValueError on corrupt files
            continue
        if notes:
            pieces[item] = notes
    return pieces


def load_test_set(cfg: Config, inputs: dict[str, Path]) -> TestSet:
    """Test windows, test pieces and their features.

    Raises:
        EvaluateError: a missing or empty test split (with the stage to run).
    """
    tok_dir, clean_dir = inputs["tokenize"], inputs["clean"] / C.STYLE
    npy, tok_path = tok_dir / C.STYLE / "test.npy", tok_dir / TOKENIZER_FILE
    ids = (read_json(inputs["split"] / "split.json", {}) or {}).get(C.STYLE, {}).get("test", [])
    if not ids:
        raise EvaluateError("empty test split: data/split/split.json lists no style test pieces (`jam stage split`)")
    if not npy.exists() or not tok_path.exists():
        raise EvaluateError(f"{npy} or {tok_path} missing: run `jam stage tokenize` first")
    windows = np.load(npy)
    if windows.ndim != 2 or len(windows) == 0:
        raise EvaluateError(f"empty test split: {npy} has no token windows")
    paths = _piece_paths(clean_dir, ids)
    pieces = _read_pieces(paths)
    if not pieces:
        raise EvaluateError(f"empty test split: no readable test piece with notes under {clean_dir}")
    pad_id = (read_json(tok_dir / C.REPORT_NAME, {}) or {}).get("stats", {}).get("pad_id")
    if pad_id is None:
        pad_id = special_ids(load_tokenizer(tok_path))["pad_id"]
    return TestSet(
        windows=_even_subset(windows, cfg.evaluate.max_windows),
        pad_id=int(pad_id),
        pieces=pieces,
        paths={k: paths[k] for k in pieces},
        real_values=F.pooled_values(pieces.values(), cfg.evaluate.window_beats),
        tokenizer_path=tok_path,
        base_windows=_base_windows(tok_dir / C.BASE / "test.npy", cfg.evaluate.max_windows),
        key=sha256_text(sha256_file(npy), sha256_file(tok_path), json.dumps(sorted(pieces))),
    )


def _base_windows(npy: Path, limit: int) -> np.ndarray | None:
    windows = np.load(npy) if npy.exists() else None
    return _even_subset(windows, limit) if windows is not None and windows.ndim == 2 and len(windows) else None


def eval_key(cfg: Config, test: TestSet) -> str:
    """Hash of everything an evaluation depends on besides the model: params (the runner's sampling controls and
    note limit included), test data, metric code version."""
    rt = cfg.realtime.model_dump(include={"temperature", "top_p", "top_k", "max_note_beats"})
    return sha256_text(section_json(cfg.evaluate), json.dumps(rt, sort_keys=True), test.key, EVAL_VERSION)[:16]


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


def evaluate_model(model, tokenizer, test: TestSet, cfg: Config, out_dir: Path, meta: dict) -> ModelEval:
    """Likelihood, samples (through the runner's engine), validity and style OAs of one model, with bootstrap CIs;
    sample MIDI, piano rolls and WAVs go to `out_dir`."""
    ec = cfg.evaluate
    sums, counts = window_nll(model, test.windows, test.pad_id, ec.batch_size)
    nll = float(sums.sum() / counts.sum())
    try:
        items, prompts = S.make_prompts(tokenizer, test.paths, ec)
    except S.NoPrompts as err:
        raise EvaluateError(str(err)) from None
    max_len = int(meta.get("max_seq_len") or cfg.tokenize.max_seq_len)
    engine = S.make_engine(model, tokenizer, cfg, meta, max_len)
    tempo = float(meta.get("tempo_bpm") or cfg.finetune.tempo_bpm)
    continuations = S.sample_continuations(engine, prompts, ec.seeds, ec.n_tokens, tempo)
    samples, pieces = [], []
    for i, ids in enumerate(continuations):
        sample, notes = _one_sample(
            tokenizer, ids, ec.seeds[i // len(items)], items[i % len(items)], i, test, cfg, out_dir, tempo
        )
        samples.append(sample)
        if notes is not None:
            pieces.append(notes)
    values = F.pooled_values(pieces, ec.window_beats)
    oa = F.compare_sets(values, test.real_values, ec.oa_method)
    lo, hi = CI.style_score_ci(pieces, test.real_values, ec.window_beats, ec.oa_method, ec.bootstrap, cfg.project.seed)
    metrics = {
        "test_nll": nll,
        "test_ppl": math.exp(min(nll, 50.0)),  # capped: an untrained model must not log inf
        "validity_rate": sum(s["valid"] for s in samples) / len(samples),
        "style_score": F.style_score(oa),
        "style_score_ci_low": lo,
        "style_score_ci_high": hi,
        **{f"oa_{k}": v for k, v in oa.items()},
    }
    if test.base_windows is not None:
        metrics["base_corpus_nll"] = mean_nll(model, test.base_windows, test.pad_id, ec.batch_size)
    return ModelEval(metrics=metrics, values=values, samples=samples, nll_sums=sums, nll_counts=counts)


def _one_sample(tokenizer, ids, seed, item, i, test: TestSet, cfg: Config, out_dir: Path, tempo: float):
    """Check, save, plot and (for the first `evaluate.audio`) render one sample. Returns (its row, notes or None)."""
    ec = cfg.evaluate
    score, problems = F.check_sample(tokenizer, ids, ec.max_open_beats)
    notes = F.notes_from_score(score) if score is not None else []
    name = f"{item}_seed{seed}"
    row = {"piece": item, "seed": seed, "tokens": len(ids), "notes": len(notes), "valid": not problems,
           "problems": problems}  # fmt: skip
    if score is None:
        return row, None
    midi = _mkdir(out_dir / "samples") / f"{name}.mid"
    score.dump_midi(str(midi))
    if i < ec.plots:
        plots.piano_roll_png(
            notes, test.pieces[item], out_dir / f"pianoroll_{name}.png", (f"sample (seed {seed})", f"real: {item}")
        )
    if i < ec.audio and notes:
        length_s = max(n.end for n in notes) * 60.0 / tempo
        row["audio"] = S.render_wav(midi, out_dir / f"audio_{name}.wav", cfg, length_s) or f"audio_{name}.wav"
    return row, notes


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_outputs(out_dir: Path, ev: ModelEval, base: ModelEval | None, test: TestSet, ec: EvaluateConfig) -> None:
    plots.feature_comparison_png(_oa(ev), _oa(base) if base else None, out_dir / "features_oa.png")
    sets = {"real": test.real_values, "model": ev.values, **({"base": base.values} if base else {})}
    plots.feature_histograms_png(sets, out_dir / "features_hist.png")
    write_json(out_dir / "samples.json", ev.samples)
    write_json(out_dir / "metrics.json", ev.metrics)
    write_json(out_dir / "eval_config.json", json.loads(section_json(ec)))


def _oa(ev: ModelEval) -> dict[str, float]:
    return {k.removeprefix("oa_"): v for k, v in ev.metrics.items() if k.startswith("oa_")}


def _log(client, run_id: str, metrics: dict[str, float], out_dir: Path, key: str) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())])
    client.log_artifacts(run_id, str(out_dir), "eval")
    client.set_tag(run_id, EVAL_KEY_TAG, key)


# ---------------------------------------------------------------- runs


def evaluate_run(
    cfg: Config,
    run: RunSummary,
    test: TestSet,
    key: str,
    client,
    base_done: dict[str, bool],
    root: Path,
    force: bool = False,
) -> dict:
    """Evaluate one run's bundle, log to it (and, once, to its base run). Returns the metrics logged.

    `base_done` maps base run ids handled in this session to whether they were logged (False: already current).
    """
    from realtime.bundle import load_model

    bundle = download_bundle(cfg, run.run_id, root / "bundles")
    info = read_bundle(bundle)
    tokenizer, adapter = load_tokenizer(bundle / info["tokenizer"]), info["default_adapter"]
    if not same_vocab(tokenizer, load_tokenizer(test.tokenizer_path)):
        raise EvaluateError("the run's tokenizer differs from data/tokenize/tokenizer.json: re-tokenize or retrain")
    if run.role == "finetune" and not adapter:
        raise EvaluateError("fine-tune bundle has no default adapter to evaluate")
    out = _fresh_dir(root / "runs" / run.run_id)
    ev = evaluate_model(load_model(bundle), tokenizer, test, cfg, out, info)  # as the jam runner plays it
    base = None
    if adapter:
        base_id = run.tags.get(BASE_RUN_TAG)
        base_out = _fresh_dir(root / "runs" / (base_id or f"{run.run_id}_base"))
        base = evaluate_model(load_model(bundle, adapters={}), tokenizer, test, cfg, base_out, info)
        _write_outputs(base_out, base, None, test, cfg.evaluate)
        if base_id and base_id not in base_done:
            base_done[base_id] = _log_base_run(cfg, client, base_id, base, base_out, key, force)
    metrics = dict(ev.metrics)
    if base:
        metrics.update(_against_base(ev, base, cfg))
    _write_outputs(out, ev, base, test, cfg.evaluate)
    _log(client, run.run_id, metrics, out, key)
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


def _log_base_run(cfg: Config, client, base_id: str, base: ModelEval, out: Path, key: str, force: bool) -> bool:
    """Log base metrics to the base run unless it already carries this eval key. Returns whether it logged."""
    if not force and get_run(cfg, base_id, client).tags.get(EVAL_KEY_TAG) == key:
        return False
    _log(client, base_id, base.metrics, out, key)
    return True


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
        run_id: evaluate only this run (fine-tune or base).
        force: re-evaluate even runs tagged with the current eval key.

    Returns:
        The stage report: processed / cached run ids, failures with one-line reasons, metrics in `stats`.

    Raises:
        EvaluateError: no test data. RunsError: no MLflow store or experiment. AllItemsFailed: every run failed.
    """
    import torch

    report = StageReport(stage=STAGE)
    test = load_test_set(cfg, inputs)
    key = eval_key(cfg, test)
    client = mlflow_client(cfg)
    targets = _targets(cfg, run_id, client)
    report.items_in, base_done = len(targets), {}
    torch.manual_seed(cfg.project.seed)
    # The runner's thread count (as `jam play` sets it); an explicit call also matters with the same number: torch's
    # implicit default was measured 10x slower per token here (2-core container, OpenMP pool sized from the host).
    torch.set_num_threads(cfg.realtime.threads or torch.get_num_threads())
    for run in targets:
        if not force and run.tags.get(EVAL_KEY_TAG) == key:
            report.cached.append(run.run_id)
            continue
        try:
            report.stats[run.run_id] = evaluate_run(cfg, run, test, key, client, base_done, out_dir, force)
            report.processed.append(run.run_id)
        except (EvaluateError, RunsError, BundleError) as err:
            report.failed[run.run_id] = str(err)
        except Exception as err:  # one broken run must not stop the others
            report.failed[run.run_id] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    logged_bases = sorted(b for b, logged in base_done.items() if logged)
    report.outputs = len(report.processed) + len(logged_bases)
    report.stats.update({"eval_key": key, "base_runs_logged": logged_bases})
    report.finish(_mkdir(out_dir), section_json(cfg.evaluate))
    raise_if_all_failed(report)
    return report
