"""Where the scorer's time goes (issue 28, item 3: the scorer against the 512-token prefill ceiling).

Scores --limit items of each task with the unlooped model under cProfile, and reports: the share of the time in
llama_decode (SideContext.decode: the C call and its batch), the Python around it (log-softmax, tokenizing,
cache clears), the decode calls' sizes, and the tokens per second the scorer decodes against the same model's
prefill of one 512-token batch and of batches of the scorer's median size, measured in the same process.

    .venv/bin/python bench/profile_scoring.py [--model smollm2-135m-instruct] [--tasks arc_easy,winogrande]
        [--limit 40] [-t 2]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

from ggufloop import models
from ggufloop.eval.scoring import Scorer
from ggufloop.eval.tasks import TASKS
from ggufloop.runtime import SideContext


def prefill_tps(scorer: Scorer, n: int, repeat: int = 5) -> float:
    """Tokens per second of one batch of n tokens from position 0, the median of repeat runs."""
    vocab = scorer.llm.n_vocab()
    tokens = [(i * 7919) % (vocab - 100) + 50 for i in range(n)]
    times = []
    for _ in range(repeat):
        scorer.ctx.clear()
        t = time.perf_counter()
        scorer.ctx.decode([(tok, i, 0, i == n - 1) for i, tok in enumerate(tokens)])
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="arc_easy,winogrande")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    scorer = Scorer(str(models.fetch(args.model, quiet=True)), None, threads=args.threads)
    sizes: list[int] = []
    decode = SideContext.decode

    def counted(self, entries, generated=False):
        sizes.append(len(entries))
        return decode(self, entries, generated)

    SideContext.decode = counted
    print(
        "| task | items | time s | in llama_decode | Python around it | decode calls | tokens per call (median) | "
        "scorer tok/s | prefill 512 tok/s | scorer / prefill 512 | prefill at the median size tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    try:
        for task in args.tasks.split(","):
            items = TASKS[task].items(shots=0, limit=args.limit)
            scorer.score(items[:2])  # warm
            sizes.clear()
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.enable()
            scorer.score(items)
            prof.disable()
            total = time.perf_counter() - t
            stats = pstats.Stats(prof).stats
            in_decode = sum(v[2] for k, v in stats.items() if k[2] == "decode" and k[0].endswith("runtime.py"))
            calls, tokens = len(sizes), sum(sizes)
            median = int(statistics.median(sizes))
            ceiling, small = prefill_tps(scorer, 512), prefill_tps(scorer, max(1, median))
            print(
                f"| {task} | {len(items)} | {total:.2f} | {in_decode / total:.1%} | {1 - in_decode / total:.1%} | "
                f"{calls} | {median} | {tokens / total:.0f} | {ceiling:.0f} | {tokens / total / ceiling:.2f} | "
                f"{small:.0f} |"
            )
    finally:
        SideContext.decode = decode
        scorer.close()


if __name__ == "__main__":
    main()
