"""What the KV modes (@kv=first, @kv=last) cost in quality, where they differ from the exact plan: in
generation, when later tokens attend to the KV slot that the earlier ubatches left.

Over --windows windows of the LAMBADA corpus (ggufloop perplexity's, tokenized once and cut into windows of
--prompt + --gen tokens), the model decodes each window as a chat does, teacher-forced: the prompt in one
ubatch, then the next --gen tokens one at a time. At each of those --gen positions it compares the next-token
distributions of the plan in each KV mode with the exact plan's and with the unlooped model's:
KL(reference || mode) with llama-perplexity's definitions (ggufloop.eval.perplexity.statistics: mean +- SE,
percentiles; same top; ln PPL ratio with its paired error, over the --gen tokens). With --task, also the
accuracy of each mode on that multiple-choice task (ggufloop's scorer decodes an item's shared context, then
each choice's tokens in a ubatch of their own, so the modes act there too): paired against the exact plan,
exact McNemar, Holm over the comparisons. Writes kv-quality-MODEL.json and .md to --out.

    .venv/bin/python bench/measure_kv.py smollm2-135m-instruct --loop 7:11x3/uniform --task arc_easy --limit 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ggufloop import LoopedLlama, LoopPlan
from ggufloop.eval import perplexity as ppl
from ggufloop.eval.evaluate import paired
from ggufloop.eval.executors import open_executor
from ggufloop.eval.stats import holm
from ggufloop.eval.store import Store
from ggufloop.eval.units import Request
from ggufloop.models import resolve
from ggufloop.numeric import log_softmax

MODES = ("exact", "first", "last")


def windows(llm: LoopedLlama, n: int, length: int) -> list[list[int]]:
    """n windows of length tokens, evenly spread over the tokenized corpus."""
    tokens = llm.tokenize(ppl.corpus("lambada").text.encode(), add_bos=False, special=False)
    starts = np.linspace(0, len(tokens) - length, n).astype(int)
    return [tokens[s : s + length] for s in starts]


def generation_logprobs(llm: LoopedLlama, window: list[int], n_prompt: int) -> np.ndarray:
    """Log-probabilities [gen, vocab] at the positions that predict window[n_prompt:]: the prompt decoded in
    one ubatch, then every further token alone."""
    llm.reset()
    llm.eval(window[:n_prompt])
    for tok in window[n_prompt:-1]:
        llm.eval([tok])
    rows = np.array(llm.scores[n_prompt - 1 : len(window) - 1], dtype=np.float64)
    return log_softmax(rows)


def measure(model: str, plans: list[str], n_windows: int, n_prompt: int, n_gen: int, threads: int) -> dict:
    path = resolve(model)
    llm = LoopedLlama(
        str(path), n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt, logits_all=True,
        n_threads=threads, n_threads_batch=threads,
    )  # fmt: skip
    try:
        wins = windows(llm, n_windows, n_prompt + n_gen)
        targets = np.concatenate([np.array(w[n_prompt:]) for w in wins])
        t0 = time.perf_counter()
        llm.set_loop("none")
        base = np.concatenate([generation_logprobs(llm, w, n_prompt) for w in wins])
        out: dict = {"model": path.stem, "windows": n_windows, "prompt": n_prompt, "gen": n_gen, "plans": {}}
        for text in plans:
            plan = LoopPlan.parse(text)
            got = {}
            for kv in MODES:
                llm.set_loop(plan.with_kv(kv))
                got[kv] = np.concatenate([generation_logprobs(llm, w, n_prompt) for w in wins])
                print(f"{text} @kv={kv}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            out["plans"][text] = {
                kv: {
                    "vs_unlooped": ppl.statistics(ppl.compare_logprobs(got[kv], base, targets)),
                    **(
                        {"vs_exact": ppl.statistics(ppl.compare_logprobs(got[kv], got["exact"], targets))}
                        if kv != "exact"
                        else {}
                    ),
                }
                for kv in MODES
            }
    finally:
        llm.close()
    return out


def accuracy(model: str, plans: list[str], task: str, limit: int | None, db: str, threads: int) -> dict:
    """Accuracy of the unlooped model and of every plan in every KV mode on task; each mode paired against
    the exact plan (Holm over all those comparisons)."""
    path = resolve(model)
    store = Store(db)
    executor = open_executor(path, store, store.model_sha(path), threads)
    names = ["none"] + [str(LoopPlan.parse(p).with_kv(kv)) for p in plans for kv in MODES]
    try:
        got = dict(zip(names, executor.run([Request(n, task, None, limit) for n in names]), strict=True))
    finally:
        executor.close()
        store.close()
    out: dict = {
        "task": task,
        "n": len(got["none"]),
        "acc": {n: float(np.mean([v[0] for v in r.values()])) for n, r in got.items()},
    }
    pairs = [(p, kv) for p in plans for kv in MODES if kv != "exact"]
    comps = [paired(got[str(LoopPlan.parse(p))], got[str(LoopPlan.parse(p).with_kv(kv))]) for p, kv in pairs]
    adjusted = holm([c.p_value for c in comps])
    out["vs_exact"] = {
        f"{p}@kv={kv}": {**asdict(c), "holm_p": h} for (p, kv), c, h in zip(pairs, comps, adjusted, strict=True)
    }
    return out


def markdown(r: dict) -> str:
    rows = [
        f"### {r['model']}: {r['windows']} LAMBADA windows, a {r['prompt']}-token prompt, then {r['gen']} tokens "
        "one at a time",
        "",
        "| plan | KV mode | against | mean KLD +- SE | KLD p99 | same top | ln PPL ratio +- SE |",
        "|---|---|---|---|---|---|---|",
    ]
    for plan, modes in r["plans"].items():
        for kv, against in modes.items():
            for who, s in against.items():
                rows.append(
                    f"| `{plan}` | {kv} | {who.removeprefix('vs_')} | {s['kld']['mean']:.5f} +- {s['kld']['se']:.5f} "
                    f"| {s['kld']['p99']:.4f} | {100 * s['same_top']:.2f} % +- {100 * s['same_top_se']:.2f} "
                    f"| {s['ln_ratio']:+.4f} +- {s['ln_ratio_se']:.4f} |"
                )
    if "accuracy" in r:
        a = r["accuracy"]
        rows += ["", f"{a['task']}, {a['n']} items: accuracy (the unlooped model: {a['acc']['none']:.4f}), and each KV "
                 "mode against the exact plan, paired (95 % interval, exact McNemar, Holm over the comparisons)", "",
                 "| plan | accuracy | vs exact [95 % CI] | McNemar p | Holm p |", "|---|---|---|---|---|"]  # fmt: skip
        for name, acc in a["acc"].items():
            c = a["vs_exact"].get(name)
            vs = (
                f"{c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p_value']:.3f} | {c['holm_p']:.3f}"
                if c
                else " | |"
            )
            rows.append(f"| `{name}` | {acc:.4f} | {vs} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--loop", action="append", required=True, help="a plan (count >= 2); repeat for more")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", help="also the accuracy on this multiple-choice task (e.g. arc_easy)")
    ap.add_argument("--limit", type=int, help="the task's first N items")
    ap.add_argument("--db", default="results/kv.sqlite", help="results database of the accuracy runs (resumes)")
    ap.add_argument("--out", default="docs/reproduction/kv")
    a = ap.parse_args()
    r = measure(a.model, a.loop, a.windows, a.prompt, a.gen, a.threads)
    if a.task:
        r["accuracy"] = accuracy(a.model, a.loop, a.task, a.limit, a.db, a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kv-quality-{r['model']}.json").write_text(json.dumps(r, indent=1))
    (out / f"kv-quality-{r['model']}.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
