"""The paper's heat map, naive against uniform (docs/reproduction.md §1): claim 1 tested on one model.

    .venv/bin/python docs/reproduction/heatmap.py --db results/study.sqlite gemma3-270m \\
        --sizes 2:5 --starts 0:17 -o docs/reproduction/heatmap

Reads the rows ``run.sh heatmap`` scored (nothing is rescored): WinoGrande, 0-shot, the first 500
items, K passes, every block (s, e) of the windows, naive and uniform, and the unlooped model on the
same items. Writes ``heatmap-<model>.md`` and ``heatmap-<model>.png`` (three panels: naive minus
unlooped, uniform minus unlooped, uniform minus naive; outlined: Holm-adjusted McNemar p < 0.05 over
the blocks of that panel).

Per panel it reports how many blocks lie below and above the reference, how many differ after Holm,
and the mean difference over all blocks with a 95 % interval from resampling items (each item's
mean over the blocks, so the interval accounts for blocks being scored on the same items): the
question of claim 1 is whether a block chosen at random hurts, which is that mean.

A block whose rows are incomplete (the run still going) is left out and counted; ``--partial`` is
required to write a map with such gaps, and the output then says so.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufloop import plots
from ggufloop.eval.stats import compare, holm, paired_bootstrap
from ggufloop.eval.store import Store, Unit
from ggufloop.eval.sweep import block_ranges
from ggufloop.eval.tasks import TASKS
from ggufloop.gguf_io import model_info
from ggufloop.models import resolve
from ggufloop.plan import LoopPlan, Mix

PANELS = [("none", "unlooped"), ("uniform", "unlooped"), ("uniform", "none")]
LABEL = {"none": "naive", "uniform": "uniform", "unlooped": "unlooped"}


@dataclass(frozen=True)
class Panel:
    """One side of a comparison over every block: plan (mix) against ref (mix or unlooped)."""

    plan: str
    ref: str
    diff: dict[tuple[int, int], float]
    p_holm: dict[tuple[int, int], float]
    mean: float
    ci: tuple[float, float]

    @property
    def title(self) -> str:
        return f"{LABEL[self.plan]} minus {LABEL[self.ref]}"

    def counts(self) -> tuple[int, int, int, int]:
        """Blocks below, above, significantly below, significantly above the reference."""
        below = sum(d < 0 for d in self.diff.values())
        above = sum(d > 0 for d in self.diff.values())
        sig_below = sum(self.p_holm[b] < 0.05 and self.diff[b] < 0 for b in self.diff)
        sig_above = sum(self.p_holm[b] < 0.05 and self.diff[b] > 0 for b in self.diff)
        return below, above, sig_below, sig_above


def panel(correct: dict[str, np.ndarray], blocks: list[tuple[int, int]], plan: str, ref: str) -> Panel:
    """Per block the paired comparison, Holm over the blocks; the mean over blocks, resampling items."""
    other = correct[ref] if ref == "unlooped" else None
    comps = {}
    for i, b in enumerate(blocks):
        base = other if other is not None else correct[ref][:, i]
        comps[b] = compare(base, correct[plan][:, i])
    adjusted = dict(zip(blocks, holm([comps[b].p_value for b in blocks]), strict=True))
    mine = correct[plan].mean(axis=1)
    theirs = other if other is not None else correct[ref].mean(axis=1)
    ci = paired_bootstrap(theirs, mine)
    return Panel(plan, ref, {b: c.diff for b, c in comps.items()}, adjusted, float(mine.mean() - theirs.mean()), ci)


def figure(panels: list[Panel], n_layer: int, title: str, path: Path) -> None:
    from matplotlib.patches import Rectangle

    top = max(max(abs(d) for d in p.diff.values()) for p in panels)
    fig, axes = plots.subplots(1, len(panels), figsize=(6 * len(panels), 5.6))
    for ax, p in zip(axes, panels, strict=True):
        m = np.full((n_layer, n_layer), np.nan)
        for (s, e), d in p.diff.items():
            m[s, e - 1] = d
        im = ax.imshow(m, origin="lower", cmap="RdBu", vmin=-top, vmax=top)
        for (s, e), ph in p.p_holm.items():
            if ph < 0.05:
                ax.add_patch(Rectangle((e - 1.5, s - 0.5), 1, 1, fill=False, edgecolor="k", linewidth=1.8))
        below, above, sig_below, sig_above = p.counts()
        ax.set_title(
            f"{p.title}\nmean {p.mean:+.3f} [{p.ci[0]:+.3f}, {p.ci[1]:+.3f}]; "
            f"{below} below, {above} above; Holm: {sig_below} below, {sig_above} above",
            fontsize=9,
        )
        ax.set_xlabel("last layer of the block (e - 1)")
        ax.set_ylabel("first layer of the block (s)")
        fig.colorbar(im, ax=ax, label="accuracy difference", shrink=0.8)
    fig.suptitle(title + "\noutlined: Holm-adjusted McNemar p < 0.05 over the blocks of the panel", fontsize=10)
    plots.save(fig, path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--db", required=True)
    ap.add_argument("--task", default="winogrande")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--sizes", required=True, metavar="M0:M1")
    ap.add_argument("--starts", required=True, metavar="S0:S1")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--partial", action="store_true", help="write the map even if some blocks are not scored yet")
    ap.add_argument("-o", "--output", default="docs/reproduction/heatmap")
    args = ap.parse_args()

    path = resolve(args.model)
    n_layer = model_info(path).n_layer
    task = TASKS[args.task]
    ids = [it.id for it in task.items(0, args.limit)]
    store = Store(args.db)
    sha = store.model_sha(path)

    def rows(plan: str) -> np.ndarray | None:
        got = store.rows(Unit(sha, args.task, 0, task.prompt_key(), plan))
        return np.array([got[i][0] for i in ids], dtype=np.float64) if all(i in got for i in ids) else None

    base = rows("none")
    if base is None:
        sys.exit(f"error: the unlooped model's {len(ids)} {args.task} items are not all in {args.db}")
    blocks, missing = [], []
    columns: dict[str, list[np.ndarray]] = {"none": [], "uniform": []}
    for s, e in block_ranges(n_layer, args.starts, args.sizes):
        got = {mix: rows(str(LoopPlan(s, e, args.count, mix=Mix.parse(mix)))) for mix in columns}
        if any(v is None for v in got.values()):
            missing.append((s, e))
            continue
        blocks.append((s, e))
        for mix, v in got.items():
            columns[mix].append(v)
    store.close()
    if missing and not args.partial:
        sys.exit(
            f"error: {len(missing)} blocks are not fully scored yet (first {missing[0]}); --partial draws the rest"
        )
    if not blocks:
        sys.exit("error: no block is fully scored for both mixes yet")
    correct = {"unlooped": base, **{mix: np.stack(v, axis=1) for mix, v in columns.items()}}
    panels = [panel(correct, blocks, plan, ref) for plan, ref in PANELS]

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"heatmap-{path.stem}"
    scope = f"{len(blocks)} blocks" + (f" (partial: {len(missing)} not scored yet)" if missing else "")
    title = f"{path.stem}, {args.task} ({len(ids)} items, 0-shot), K={args.count}, {scope}; unlooped {base.mean():.3f}"
    figure(panels, n_layer, title, out / f"{stem}.png")
    lines = [
        f"# Heat map: {path.stem}, naive and uniform looping against the unlooped model\n",
        f"{args.task}, first {len(ids)} items, 0-shot, K = {args.count}, blocks of sizes {args.sizes} starting at "
        f"{args.starts} (slice windows): {scope}. Unlooped accuracy {base.mean():.4f}. Per block: paired accuracy "
        "difference, exact McNemar p, Holm-adjusted over the blocks of each comparison. Mean over blocks: 95 % "
        "interval from resampling items (each item's mean correctness over the blocks).\n",
        "| comparison | blocks | mean difference [95% CI] | below | above | below, Holm p < 0.05 "
        "| above, Holm p < 0.05 |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in panels:
        below, above, sig_below, sig_above = p.counts()
        lines.append(
            f"| {p.title} | {len(p.diff)} | {p.mean:+.4f} [{p.ci[0]:+.4f}, {p.ci[1]:+.4f}] | {below} | {above} | "
            f"{sig_below} | {sig_above} |"
        )
    lines += ["", "| block | naive - unlooped | Holm p | uniform - unlooped | Holm p | uniform - naive | Holm p |"]
    lines.append("|---|---|---|---|---|---|---|")
    for b in blocks:
        cells = " | ".join(f"{p.diff[b]:+.3f} | {p.p_holm[b]:.3g}" for p in panels)
        lines.append(f"| {b[0]}:{b[1]} | {cells} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md and .png ({scope})", file=sys.stderr)


if __name__ == "__main__":
    main()
