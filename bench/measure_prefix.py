"""What prefix reuse saves a search: the same candidates on the same items, scored in full and by prefix reuse,
side by side in one process (ggufloop/eval/prefix.py; issue 28, item 1).

The candidates are §3's 40 (SmolLM2-135M, WinoGrande 0-shot, blocks starting at 8..17 of 2 or 3 layers, K = 3, naive
and uniform) unless told otherwise. Each way scores every candidate on the items, in the order a rung does (one
plan over all items, then the next), from a fresh Scorer; the scores must be equal, bit for bit. Printed: wall and
CPU time of each way and their ratio, and the layer-item evaluations (items x virtual layers run, the capture passes
included).

    .venv/bin/python bench/measure_prefix.py [--model smollm2-135m-instruct] [--items 100] [--starts 8:18]
        [--sizes 2:4] [--count 3] [--mixes none,uniform] [-t 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import time

from ggufloop import models
from ggufloop.eval.prefix import PrefixConfig, refusal
from ggufloop.eval.scoring import Scorer
from ggufloop.eval.tasks import TASKS
from ggufloop.gguf_io import model_info
from ggufloop.plan import LoopPlan, Mix


def run(path: str, plans: list[LoopPlan], items: list, threads: int, prefix: PrefixConfig | None) -> tuple:
    """(wall s, CPU s, scores per plan, capture passes) of one way, from a fresh Scorer."""
    scorer = Scorer(path, None, threads=threads, prefix=prefix)
    captures = []
    if scorer.prefix is not None:
        states = scorer.prefix.states
        counted = lambda *a, replay: captures.append(1) or replay(*a)  # noqa: E731
        scorer.prefix.states = lambda key, layer, replay: states(key, layer, lambda *a: counted(*a, replay=replay))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        scores = []
        for plan in plans:
            scorer.set_plan(plan)
            scores.append(scorer.score(items))
        depth = scorer.prefix.depth if scorer.prefix is not None else 0
        return time.perf_counter() - wall, time.process_time() - cpu, scores, len(captures), depth
    finally:
        scorer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="winogrande")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--starts", default="8:18")
    ap.add_argument("--sizes", default="2:4")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--mixes", default="none,uniform")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="Runs of each way, interleaved; the medians are printed.")
    args = ap.parse_args()
    path = str(models.fetch(args.model, quiet=True))
    info = model_info(path)
    s0, s1 = map(int, args.starts.split(":"))
    m0, m1 = map(int, args.sizes.split(":"))
    mixes = [Mix.parse(x) for x in args.mixes.split(",")]
    blocks = [(s, s + m) for s in range(s0, s1) for m in range(m0, m1) if s + m <= info.n_layer]
    plans = [LoopPlan(s, e, args.count, mix=mix) for mix in mixes for s, e in blocks]
    items = TASKS[args.task].items(shots=0, limit=args.items)
    prefix = PrefixConfig(4 << 30, tuple(sorted({p.start for p in plans})))
    times: dict[str, list] = {"full": [], "reuse": []}
    for _ in range(args.repeat):
        full = run(path, plans, items, args.threads, None)
        reuse = run(path, plans, items, args.threads, prefix)
        assert reuse[2] == full[2], "prefix reuse changed a score"
        times["full"].append(full[:2])
        times["reuse"].append(reuse[:2])
    n = len(items)
    layers_full = n * sum(p.virtual_depth(info.n_layer) for p in plans)
    skipped = [p.start if refusal(p, info.arch) is None else 0 for p in plans]
    layers_reuse = n * sum(p.virtual_depth(info.n_layer) - k for p, k in zip(plans, skipped)) + reuse[3] * reuse[4]

    def med(way: str, k: int) -> float:
        vals = sorted(t[k] for t in times[way])
        return vals[len(vals) // 2]

    print(f"{args.model} ({info.n_layer} layers), {args.task} 0-shot, {n} items, ", end="")
    print(f"{len(plans)} plans x{args.count} ({args.mixes}), {sum(k > 0 for k in skipped)} of them by prefix reuse")
    print(f"scores equal, bit for bit, in all {args.repeat} runs")
    print("| way | wall s | CPU s | layer-item evaluations |")
    print("|---|---|---|---|")
    print(f"| full | {med('full', 0):.1f} | {med('full', 1):.1f} | {layers_full:,} |")
    print(f"| prefix reuse | {med('reuse', 0):.1f} | {med('reuse', 1):.1f} | {layers_reuse:,} |")
    print(
        f"| ratio | {med('reuse', 0) / med('full', 0):.2f} | {med('reuse', 1) / med('full', 1):.2f} | "
        f"{layers_reuse / layers_full:.2f} |"
    )
    print(f"(captures: {reuse[3]} passes of {reuse[4]} layers, one per item)")


if __name__ == "__main__":
    main()
