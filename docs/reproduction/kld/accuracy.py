"""Does a plan's KL divergence predict its accuracy change? (docs/reproduction/kld.md)

    .venv/bin/python docs/reproduction/kld/accuracy.py --db results/study.sqlite

Reads the KLD maps (``kld-<model>.json`` here, written by ``ggufloop perplexity --starts ...``) and the
WinoGrande rows of the accuracy heat maps (docs/reproduction.md §1: 0-shot, the first 500 items, K = 3,
naive and uniform, scored by ``run.sh heatmap``; nothing is rescored) and, for every block the two share,
puts the mean KLD beside the paired accuracy difference from the unlooped model. Per model and mix (and
both mixes pooled): Spearman's rank correlation between mean KLD and the accuracy difference, with two
95 % intervals: resampling items (2,000 bootstrap draws of the 500 items, every block's difference
recomputed on the same draw: the accuracy noise at these blocks, which is shared between blocks) and
Fisher's z with Spearman's variance 1.06 / (n - 3) (the blocks taken as independent draws, which they are
not quite). The KLD's own noise is left out: its standard error is a few per cent of the mean, against
accuracy differences that are mostly noise. Writes ``accuracy.md`` and ``accuracy.png`` here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from ggufloop import plots
from ggufloop.eval.store import Store, Unit
from ggufloop.eval.tasks import TASKS
from ggufloop.models import resolve

HERE = Path(__file__).resolve().parent
MODELS = ("gemma3-270m", "smollm2-135m-instruct")  # the two with an accuracy heat map
LABEL = {"none": "naive", "uniform": "uniform"}


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks of a 1-D array (ties share their mean rank)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of x (blocks) against each row of y ([..., blocks])."""
    rx, ry = ranks(x), np.apply_along_axis(ranks, -1, y)
    rx = rx - rx.mean()
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum() * (ry**2).sum(-1))
    return np.where(den > 0, (ry * rx).sum(-1) / np.where(den > 0, den, 1), 0.0)


def fisher(rho: float, n: int) -> tuple[float, float]:
    z, se = math.atanh(max(min(rho, 0.999999), -0.999999)), math.sqrt(1.06 / (n - 3))
    return math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, help="the database the accuracy heat maps were scored into")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    args = ap.parse_args()
    task = TASKS["winogrande"]
    ids = [it.id for it in task.items(0, args.limit)]
    store = Store(args.db)
    rng = np.random.default_rng(0)
    rows, scatter = [], {}
    models = args.models.split(",")
    for model in models:
        record = json.loads((HERE / f"kld-{model}.json").read_text())
        sha = store.model_sha(resolve(model))

        def correct(plan: str, sha: str = sha) -> np.ndarray | None:
            got = store.rows(Unit(sha, "winogrande", 0, task.prompt_key(), plan))
            return np.array([got[i][0] for i in ids], dtype=np.float64) if all(i in got for i in ids) else None

        base = correct("none")
        if base is None:
            sys.exit(f"error: {model}'s unlooped WinoGrande rows are not all in {args.db}")
        draws = rng.integers(0, len(ids), size=(args.draws, len(ids)))
        pooled_k, pooled_d, pooled_boot = [], [], []
        for mix in ("none", "uniform"):
            klds, diffs, boots, blocks = [], [], [], []
            for c in record["cells"]:
                if c["count"] != args.count or c["mix"] != mix:
                    continue
                acc = correct(c["plan"])
                if acc is None:  # the accuracy map has no such block
                    continue
                d = acc - base
                blocks.append((c["start"], c["end"]))
                klds.append(c["stats"]["kld"]["mean"])
                diffs.append(d.mean())
                boots.append(d[draws].mean(-1))
            k, d, b = np.array(klds), np.array(diffs), np.stack(boots, axis=-1)
            scatter[(model, mix)] = (k, d)
            rows.append((model, LABEL[mix], len(k), k, d, b))
            pooled_k.append(k)
            pooled_d.append(d)
            pooled_boot.append(b)
        rows.append((model, "both", sum(map(len, pooled_k)), *map(np.concatenate, (pooled_k, pooled_d)),
                     np.concatenate(pooled_boot, axis=-1)))  # fmt: skip
    store.close()

    lines = [
        "# KLD against accuracy change, block by block\n",
        f"WinoGrande 0-shot, the first {args.limit} items, K = {args.count}: per block, the accuracy difference "
        "from the unlooped model (the accuracy heat maps of docs/reproduction.md §1) against the mean KL "
        "divergence from the unlooped model (the KLD maps here). Spearman's rho between the two over the "
        "blocks both maps have; 95 % intervals from resampling items (the accuracy noise at these blocks) and "
        "from Fisher's z (the blocks as independent draws). Written by accuracy.py.\n",
        "| model | mix | blocks | mean KLD (range) | accuracy difference (range) | Spearman rho | 95 % CI, items "
        "| 95 % CI, Fisher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, mix, n, k, d, b in rows:
        rho = float(spearman(k, d[None])[0])
        lo, hi = np.percentile(spearman(k, b), [2.5, 97.5])
        flo, fhi = fisher(rho, n)
        lines.append(
            f"| {model} | {mix} | {n} | {k.mean():.3f} ({k.min():.3f}-{k.max():.3f}) | {d.mean():+.3f} "
            f"({d.min():+.3f} to {d.max():+.3f}) | {rho:+.2f} | [{lo:+.2f}, {hi:+.2f}] | [{flo:+.2f}, {fhi:+.2f}] |"
        )
    (HERE / "accuracy.md").write_text("\n".join(lines) + "\n")

    fig, axes = plots.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for mix, colour in (("none", "tab:red"), ("uniform", "tab:blue")):
            k, d = scatter[(model, mix)]
            ax.scatter(k, 100 * d, color=colour, label=LABEL[mix], s=18)
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("mean KL(unlooped || plan), nats (LAMBADA)")
        ax.set_ylabel("accuracy - unlooped, points (WinoGrande)")
        ax.set_title(f"{model}, K = {args.count}, one point per block", fontsize=10)
        ax.legend(fontsize=8)
    plots.save(fig, HERE / "accuracy.png")
    print(f"wrote {HERE / 'accuracy.md'} and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
