"""Does a row's result depend on the batch around it? The measurement behind Generator.ROWS.

    .venv/bin/python docs/generation/rows.py > docs/generation/rows.md

On a context with one KV stream per sequence (as Generator's), every sequence first decodes a random
40-token history of its own (two draws: seeds 0 and 1); then one step decodes a token on each of
sequences 1..W (W = the batch's rows), sequence 1 always the same token, the others random ones,
and the step's tokens are removed again. Sequence 1's logits at each W are compared with those at
W = 8 (the rows Generator uses), and with those at W = 8 when the companions' tokens are drawn
again (does a row depend on what the other rows hold?). Packaged models, unlooped, looped, mixed,
with decode bypass.
"""

from __future__ import annotations

import llama_cpp
import numpy as np

from ggufloop import models
from ggufloop._lib import quiet_logs
from ggufloop.runtime import LoopedLlama

CASES = [
    ("qwen2.5-coder-0.5b-instruct", ["none", "8:12x3", "8:12x3/uniform", "8:12x3/uniform@bypass"]),
    ("smollm2-135m-instruct", ["none", "10:15x3/uniform"]),
    ("gemma3-270m", ["none", "6:9x3/uniform@bypass"]),
]
WIDTHS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16]
REFERENCE = 8


def row_logits(llm: LoopedLlama, seed: int = 0) -> dict[int, np.ndarray]:
    """Sequence 1's logits at every width, and at the reference width with other companions (key -1)."""
    rng = np.random.default_rng(seed)
    n = max(WIDTHS) + 1
    out = {}
    with llm.side_context(256 * n, 256, 256, n, streams=True) as ctx:
        for s in range(n):
            history = rng.integers(100, 5000, 40).tolist()
            ctx.decode([(t, i, s, False) for i, t in enumerate(history)])
        for w in [*WIDTHS, -1]:
            seqs = list(range(1, (REFERENCE if w < 0 else w) + 1))
            step = [(777 if s == 1 else int(rng.integers(100, 5000)), 40, s, True) for s in seqs]
            rows = ctx.decode(step, generated=True)
            out[w] = ctx.logits(rows[0])
            for s in seqs:
                llama_cpp.llama_memory_seq_rm(ctx._memory, s, 40, -1)
    return out


def main() -> None:
    quiet_logs()
    print("# A row's logits against the batch around it\n")
    print(__doc__.split("\n\n")[2].replace("\n", " ") + "\n")
    print(f"Max |difference| of sequence 1's logits from those in a batch of {REFERENCE} rows.\n")
    print("| model | plan | seed | " + " | ".join(f"{w} rows" for w in WIDTHS) + f" | {REFERENCE}, other companions |")
    print("|---|---|---|" + "---|" * (len(WIDTHS) + 1))
    for name, plans in CASES:
        path = models.fetch(name, quiet=True)
        for plan in plans:
            llm = LoopedLlama(str(path), loop=plan, n_ctx=64, n_batch=64, n_threads=2, n_threads_batch=2)
            try:
                for seed in (0, 1):
                    got = row_logits(llm, seed)
                    ref = got[REFERENCE]
                    cells = [f"{np.abs(got[w] - ref).max():.3g}" if w != REFERENCE else "0" for w in [*WIDTHS, -1]]
                    print(f"| {name} | {plan} | {seed} | " + " | ".join(cells) + " |")
            finally:
                llm.close()


if __name__ == "__main__":
    main()
