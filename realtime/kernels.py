"""The generation loop's hot path compiled by numba: the decode step (one id over the KV cache, LeanLlama's
arithmetic), the grammar's masks (`grammar_masks`), its probability moves (`give`, `moved`) and the draw (`filtered`,
`draw`, `sample`: transformers' temperature/top-k/top-p filters, then inverse CDF). One call each per generated id.

Why our own loops: at jam size a generated id is ~55 torch calls, each 3-15 us of dispatch around a few us of
arithmetic; numpy's calls cost less (1-2 us) but the step still makes ~60 of them. Compiled by numba (already in
the venv: librosa needs it) the whole step is one call that streams the weights once, releases the GIL while it
runs (the jam's scheduler thread is never blocked behind it) and allocates nothing but its small scratch rows.
Side by side on the demo model (`python bench/backends.py`, one thread): see realtime/README.md. The sampler's
parts likewise, where numpy's and torch's calls made ~40 per id (bench/sampler.py).

The arithmetic is realtime/llama.py's, in the same order where it matters: the projections read the folded
(in, out) weights LeanLlama holds (norm weights, sqrt(hidden) and the attention scale inside), the RMSNorm divides
each projection's output by `sqrt(|x|^2 + hidden * eps)`, RoPE turns q and k (v's table rows are cos 1, sin 0),
the new key and value are written at `pos` before attention reads positions `0 ... pos`. Float32 only; sums may be
reassociated (vectorized), so logits differ from torch's in the last bits (within 1e-5 on the demo model; the tests
hold both to transformers' within 1e-4).

Compiled once per machine: numba caches the machine code beside this file (or in NUMBA_CACHE_DIR), so only the
first start pays the compile (measured 6 s for the decode step and 24 s for the sampler's kernels, with a training
running beside it); later starts load them in ~0.6 s.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# reassociation and contraction vectorize the dot products; no "nnan"/"ninf": the softmax's max starts at -inf
_FLAGS = {"reassoc", "contract", "nsz"}


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def _project(x, w, out):
    """out[j] = sum_k x[k] w[k, j]: w (in, out) row-major, so the inner loop runs along a contiguous row."""
    n = w.shape[1]
    out[:] = 0.0
    for k in range(w.shape[0]):
        xk = x[k]
        for j in range(n):
            out[j] += xk * w[k, j]


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def _add_project(x, w, residual):
    """residual[j] += sum_k x[k] w[k, j] (o_proj and down_proj add into the residual)."""
    n = w.shape[1]
    for k in range(w.shape[0]):
        xk = x[k]
        for j in range(n):
            residual[j] += xk * w[k, j]


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def _rms(x, floor2):
    """sqrt(|x|^2 + hidden * eps): RMSNorm's divisor times sqrt(hidden) (LeanLlama._rms)."""
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    return np.float32(math.sqrt(total + floor2))


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def decode_step(token, pos, embed, cos, sin, floor2, qkv_w, o_w, gate_up_w, down_w, head_w, kv, heads):
    """Logits (vocab,) of `token` at position `pos`; writes its keys and values into `kv` at `pos`.

    Args:
        token, pos: the id and its position (positions below `pos` hold the window's keys and values).
        embed: (vocab, hidden) embedding rows.
        cos, sin: (max_len, heads + 2 kv_heads, head_dim) RoPE tables of the q|k|v row (LeanLlama._tables).
        floor2: hidden * eps.
        qkv_w, o_w, gate_up_w, down_w: (layers, in, out) folded projections.
        head_w: (hidden, vocab) folded output head.
        kv: (layers, 2, kv_heads, max_len, head_dim) the cache.
        heads: query heads.
    """
    layers, kv_heads, head_dim = kv.shape[0], kv.shape[2], kv.shape[4]
    inter, half = down_w.shape[1], head_dim // 2
    group, rows, end = heads // kv_heads, qkv_w.shape[2], pos + 1
    x = embed[token].copy()
    qkv = np.empty(rows, np.float32)
    gate_up = np.empty(gate_up_w.shape[2], np.float32)
    act = np.empty(inter, np.float32)
    attn = np.empty(heads * head_dim, np.float32)
    scores = np.empty(end, np.float32)
    c, s = cos[pos].ravel(), sin[pos].ravel()
    for layer in range(layers):
        _project(x, qkv_w[layer], qkv)
        inv = np.float32(1.0) / _rms(x, floor2)
        for i in range(rows):
            qkv[i] *= inv
        # RoPE: row * cos + rotate_half(row) * sin, rotate_half's sign inside sin (LeanLlama._tables)
        rot = np.empty(rows, np.float32)
        for b in range(0, rows, head_dim):
            for d in range(half):
                rot[b + d] = qkv[b + d] * c[b + d] + qkv[b + d + half] * s[b + d]
                rot[b + d + half] = qkv[b + d + half] * c[b + d + half] + qkv[b + d] * s[b + d + half]
        for m in range(2):
            for g in range(kv_heads):
                base = (heads + m * kv_heads + g) * head_dim
                for d in range(head_dim):
                    kv[layer, m, g, pos, d] = rot[base + d]
        for h in range(heads):
            g, q = h // group, h * head_dim
            top = -np.inf
            for t in range(end):
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += rot[q + d] * kv[layer, 0, g, t, d]
                scores[t] = dot
                top = max(top, dot)
            total = np.float32(0.0)
            for t in range(end):
                e = np.float32(math.exp(scores[t] - top))
                scores[t] = e
                total += e
            attn[q : q + head_dim] = 0.0
            for t in range(end):
                p = scores[t] / total
                for d in range(head_dim):
                    attn[q + d] += p * kv[layer, 1, g, t, d]
        _add_project(attn, o_w[layer], x)
        _project(x, gate_up_w[layer], gate_up)
        inv = np.float32(1.0) / _rms(x, floor2)
        for i in range(inter):
            gate, up = gate_up[i] * inv, gate_up[inter + i] * inv
            act[i] = gate / (np.float32(1.0) + np.float32(math.exp(-gate))) * up
        _add_project(act, down_w[layer], x)
    out = np.empty(head_w.shape[1], np.float32)
    _project(x, head_w, out)
    inv = np.float32(1.0) / _rms(x, floor2)
    for i in range(out.shape[0]):
        out[i] *= inv
    return out


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def give(scores, source, dest):
    """Each row's `source` probability moved onto its `dest` ids, in logits: `dest` scaled by
    (P(source) + P(dest)) / P(dest); an id in several rows takes the largest factor (realtime/sampling.py).

    Args:
        scores: (n,) finite logits, changed in place.
        source, dest: (k, >= n) bool, every row of each non-empty within the first n ids.
    """
    n = scores.shape[0]
    top = -np.inf
    for i in range(n):
        top = max(top, scores[i])
    boost = np.zeros(n, np.float32)
    for r in range(source.shape[0]):
        from_mass, to_mass = 0.0, 0.0  # float64 sums of exp(score - top): no overflow, no cancellation
        for i in range(n):
            if source[r, i]:
                from_mass += math.exp(scores[i] - top)
            if dest[r, i]:
                to_mass += math.exp(scores[i] - top)
        factor = np.float32(math.log((from_mass + to_mass) / to_mass))
        for i in range(n):
            if dest[r, i] and factor > boost[i]:
                boost[i] = factor
    for i in range(n):
        scores[i] += boost[i]


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def filtered(scores, banned, temperature, top_k, top_p):
    """The allowed ids and their unnormalized probabilities after temperature, top-k and top-p (0: filtered out),
    as transformers' warpers filter: ties with the k-th score stay; top-p keeps the most likely ids up to `top_p`
    of the mass, and always the most likely one.

    Args:
        scores: (n,) logits.
        banned: (>= n,) bool, at least one of the first n False.
        temperature: > 0; top_k: 0 = off; top_p: 1 = off.

    Returns:
        (ids (m,) int64 ascending, weights (m,) float64).
    """
    n = scores.shape[0]
    ids = np.empty(n, np.int64)
    vals = np.empty(n, np.float32)
    m = 0
    for i in range(n):
        if not banned[i]:
            ids[m] = i
            vals[m] = scores[i] / np.float32(temperature)
            m += 1
    ids, vals = ids[:m], vals[:m]
    if 0 < top_k < m:
        kth = np.sort(vals)[m - top_k]
        keep = vals >= kth
        ids, vals = ids[keep], vals[keep]
        m = ids.shape[0]
    top = vals.max()
    weights = np.empty(m, np.float64)
    for j in range(m):
        weights[j] = math.exp(vals[j] - top)
    if top_p < 1.0:
        # TopPLogitsWarper drops ids in ascending order while the mass dropped, this id's included, stays within
        # 1 - top_p. Every id of weight <= cut goes (what lies at or below it sums to at most m * cut = that
        # budget), so only the heavier ones are sorted: tens of ids, not the ~900 a step allows (a 5-10x cheaper
        # sort on a trained model's peaked logits)
        total = weights.sum()
        budget = (1.0 - top_p) * total
        cut = budget / m
        heavy = np.empty(m, np.int64)
        h, cumulative = 0, 0.0
        for j in range(m):
            if weights[j] <= cut:
                cumulative += weights[j]
                weights[j] = 0.0
            else:
                heavy[h] = j
                h += 1
        heavy = heavy[:h]
        if h == 0:  # every weight at the cut (all equal): the most likely id always stays
            weights[int(np.argmax(vals))] = 1.0
        order = heavy[np.argsort(vals[heavy])]  # ascending, as the warper sorts (ties in any order, as torch's)
        for j in range(h - 1):  # the most likely id always stays
            cumulative += weights[order[j]]
            if cumulative > budget:
                break
            weights[order[j]] = 0.0
    return ids, weights


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def moved(scores, transfer, restrike):
    """A float32 copy of `scores` (n,) after the grammar's probability moves (`give`).

    Args:
        transfer: (2, size) bool (source, dest), or (0, size): none; restrike: (2, k, size) bool, k rows of moves.
    """
    x = scores.astype(np.float32)
    if transfer.shape[0]:  # NoteOffs of silent pitches onto the sounding notes' NoteOffs
        give(x, transfer[:1], transfer[1:])
    if restrike.shape[1]:  # each held key's strikes onto its NoteOffs
        give(x, restrike[0], restrike[1])
    return x


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def sample(scores, banned, transfer, restrike, temperature, top_k, top_p, u):
    """`draw` after `moved`: one call per generated id."""
    return draw(moved(scores, transfer, restrike), banned, temperature, top_k, top_p, u)


@numba.njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def draw(scores, banned, temperature, top_k, top_p, u):
    """One id of `filtered`'s, by inverse CDF at `u`, a uniform draw in [0, 1)."""
    ids, weights = filtered(scores, banned, temperature, top_k, top_p)
    target = u * weights.sum()
    cumulative = 0.0
    for j in range(ids.shape[0]):
        cumulative += weights[j]
        if cumulative > target and weights[j] > 0.0:
            return ids[j]
    for j in range(ids.shape[0] - 1, -1, -1):  # rounding left the target at the very top: the last kept id
        if weights[j] > 0.0:
            return ids[j]
    return ids[-1]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def grammar_masks(masks, per_pitch, flags, shift_beats, shift_budget, overdue, just_started, sounding):
    """One step's grammar (realtime/sampling.py `GrammarProcessor.prepare`, which documents each rule) in one pass.

    Args:
        masks: (7, size) bool rows: base, no_eos, lead, vel, empty_note | vel_first, any_end, any_strike.
        per_pitch: (3, 128, size) bool: ids opening with NoteOff_p, ids ending p, ids striking p (see prepare).
        flags: (pending_velocity, leading, allow_eos, strikes) as 0/1.
        shift_beats: (size,) beats each id moves time by; shift_budget: < 0 for none.
        overdue, just_started, sounding: int64 pitches.

    Returns:
        (banned (size,), transfer (2, size) or (0, size): ids whose probability moves, ids it moves onto;
        restrike (2, k, size): per held key, its strikes and the ids ending it).
    """
    size = masks.shape[1]
    pending, leading, allow_eos, strikes = flags[0], flags[1], flags[2], flags[3]
    none2 = np.zeros((0, size), np.bool_)
    none3 = np.zeros((2, 0, size), np.bool_)
    if pending:
        return masks[3].copy(), none2, none3
    forced = np.zeros(size, np.bool_)
    any_forced = False
    for p in overdue:
        for i in range(size):
            if per_pitch[0, p, i]:
                forced[i] = True
                any_forced = True
    if any_forced:
        banned = np.empty(size, np.bool_)
        for i in range(size):
            banned[i] = masks[1, i] or not forced[i]
        return banned, none2, none3
    start = 2 if leading else 0 if allow_eos else 1
    useful = np.zeros(size, np.bool_)
    for p in sounding:
        for i in range(size):
            useful[i] |= per_pitch[1, p, i]
    banned = np.empty(size, np.bool_)  # before the re-strike ban (the re-strike rows' own ids stay in `again`)
    wrong = np.empty(size, np.bool_)
    for i in range(size):
        b = masks[start, i] or masks[4, i]
        if shift_budget >= 0 and not leading:
            b = b or shift_beats[i] > shift_budget
        for p in just_started:
            b = b or per_pitch[1, p, i]
        stray = masks[5, i] and not useful[i]
        wrong[i] = stray and not b
        b = b or stray
        if not strikes and not leading:
            b = b or masks[6, i]
        banned[i] = b
    final = banned.copy()
    for p in sounding:
        for i in range(size):
            final[i] |= per_pitch[2, p, i]
    right = useful & ~final
    transfer = none2
    if right.any() and wrong.any():
        transfer = np.empty((2, size), np.bool_)
        transfer[0], transfer[1] = wrong, right
    rows = np.zeros(len(sounding), np.bool_)
    for r in range(len(sounding)):
        p = sounding[r]
        again_any, release_any = False, False
        for i in range(size):
            again_any |= per_pitch[2, p, i] and not banned[i]
            release_any |= per_pitch[1, p, i] and not final[i]
        rows[r] = again_any and release_any  # a held key the model may want again
    restrike = np.empty((2, rows.sum(), size), np.bool_)
    k = 0
    for r in range(len(sounding)):
        if rows[r]:
            p = sounding[r]
            for i in range(size):
                restrike[0, k, i] = per_pitch[2, p, i] and not banned[i]
                restrike[1, k, i] = per_pitch[1, p, i] and not final[i]
            k += 1
    return final, transfer, restrike
