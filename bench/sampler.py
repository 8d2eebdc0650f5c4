"""The sampler's parts, timed one by one per generated id; prints JSON.

    python bench/sampler.py                       # 1024 ids, 4 model notes sounding, one torch thread
    python bench/sampler.py --vocab 2048 --held 8 --rounds 5

What one step of `realtime.sampling` costs besides the forward: `prepare` (the grammar's mask from the stream's
state), the grammar processor's call (the ban plus the two probability moves: unused NoteOffs onto sounding notes'
NoteOffs, re-strikes of held keys onto their NoteOffs), top-p, and the draw (softmax + multinomial), and the whole
`sample_token`. The vocabulary is synthetic but shaped like the demo's BPE one (MIDILike base tokens: NoteOn and
NoteOff for 88 keys, 8 velocities, 32 time shifts, then random two-token merges up to `--vocab`): the grammar's
cost depends on the vocabulary's size and the number of sounding notes, not on the model. Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from realtime.sampling import GrammarProcessor, TopP, sample_token  # noqa: E402


def vocabulary(size: int, seed: int = 0) -> list[tuple]:
    """PAD, BOS, EOS, the MIDILike base tokens, then random merges of two base tokens up to `size` ids."""
    base = (
        [(("on", p),) for p in range(21, 109)]
        + [(("vel", v),) for v in range(8)]
        + [(("off", p),) for p in range(21, 109)]
        + [(("shift", s / 8),) for s in range(1, 33)]
    )
    rng = random.Random(seed)
    ops = [(), (), ()] + base
    while len(ops) < size:
        ops.append(rng.choice(base) + rng.choice(base))
    return ops


def _per_call_ms(fn, n: int) -> float:
    for _ in range(n // 10):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--held", type=int, default=4, help="model notes sounding at the step")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--steps", type=int, default=2000, help="calls per part and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    grammar = GrammarProcessor(vocabulary(args.vocab), pad_id=0, bos_id=1, eos_id=2, model_vocab=args.vocab)
    top_p = TopP(args.top_p)
    logits = torch.randn(args.vocab, generator=torch.Generator().manual_seed(0)) * 2
    rows = logits[None]
    draw_gen = torch.Generator().manual_seed(0)
    held = tuple(range(60, 60 + 3 * args.held, 3))

    def prepare() -> None:
        grammar.prepare(False, False, True, shift_budget=2.0, sounding=held)

    parts = {
        "prepare": prepare,
        "grammar_call": lambda: grammar(None, rows),
        "top_p": lambda: top_p(None, rows),
        "draw": lambda: torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=draw_gen).item(),
        "step": lambda: (prepare(), sample_token(logits, [grammar, top_p], draw_gen)),
    }
    prepare()  # the grammar call's masks: those of this state
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.rounds):  # parts take turns, so load hits them alike
        for name, fn in parts.items():
            times[name].append(_per_call_ms(fn, args.steps))
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread",
                "vocab": args.vocab,
                "held": args.held,
                **{f"{name}_ms": round(statistics.median(ts), 4) for name, ts in times.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
