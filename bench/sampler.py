"""The sampler's parts, timed one by one per generated id; prints JSON.

    python bench/sampler.py                       # 1024 ids, 4 model notes sounding, one torch thread
    python bench/sampler.py --vocab 2048 --held 8 --rounds 5

What one step of `realtime.sampling` costs besides the forward: `prepare` (the grammar's mask from the stream's
state), the grammar's probability moves (unused NoteOffs onto sounding notes' NoteOffs, re-strikes of held keys onto
their NoteOffs: `moved`), the draw (ban, top-p, inverse CDF: `kernels.draw`), and a whole step (`prepare` and
`sample_token`). The vocabulary is the pipeline's MIDILike tokenizer BPE-trained to `--vocab` ids on random phrases
(`realtime.synthetic.make_tokenizer`, as the random demo-size bundle is): the grammar's cost depends on the
vocabulary's size and the number of sounding notes, not on the model's weights. Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from realtime import kernels
from realtime.codec import TokenCodec
from realtime.sampling import GrammarProcessor, Sampling, sample_token
from realtime.synthetic import make_tokenizer


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
    codec = TokenCodec(make_tokenizer(bpe_vocab=args.vocab))
    grammar = GrammarProcessor(codec.ops, codec.pad_id, codec.bos_id, codec.eos_id, codec.vocab_size)
    sampling = Sampling(top_p=args.top_p)
    logits = torch.randn(codec.vocab_size, generator=torch.Generator().manual_seed(0)) * 2
    scores = logits.numpy()
    rng = np.random.default_rng(0)
    held = tuple(sorted(codec.pitches)[len(codec.pitches) // 2 :: 3][: args.held])  # middle of the keyboard, apart

    def prepare() -> None:
        grammar.prepare(False, False, True, shift_budget=2.0, sounding=held)

    parts = {
        "prepare": prepare,
        "moved": lambda: grammar.moved(scores),
        "draw": lambda: kernels.draw(scores, grammar.banned, 1.0, 0, args.top_p, rng.random()),
        "step": lambda: (prepare(), sample_token(logits, grammar, sampling, rng)),
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
                "vocab": codec.vocab_size,
                "held": args.held,
                **{f"{name}_ms": round(statistics.median(ts), 4) for name, ts in times.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
