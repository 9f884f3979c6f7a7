"""`ggufloop sweep`: score every block range (s, e) of a plan on the same items, as a heatmap.

Each (plan, task) is an independent, resumable unit of work in the results database, so a
sweep can be stopped and restarted, split over worker processes (--jobs), or over machines that
share the database file.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from . import plots
from .cli import command, quiet_llama_logs
from .evaluate import run_unit
from .modelinfo import model_info
from .models import resolve
from .plan import LoopPlan, Mix, PlanError
from .scoring import Scorer
from .store import DEFAULT_DB, Store
from .tasks import TASKS, TaskError


def block_ranges(n_layer: int, starts: "str | None", sizes: "str | None") -> list[tuple[int, int]]:
    """Every (s, e) with s in the start window and e - s in the size window (S0:S1, slice semantics)."""
    def window(text: "str | None", lo: int, hi: int) -> range:
        if not text:
            return range(lo, hi)
        a, _, b = text.partition(":")
        try:
            return range(int(a), int(b) if b else int(a) + 1)
        except ValueError:
            raise PlanError(f"bad window {text!r}: expected FIRST:END, such as 4:12") from None
    return [(s, s + m) for s in window(starts, 0, n_layer) for m in window(sizes, 1, n_layer + 1) if s + m <= n_layer]


def run_units(model: str, plans: list[str], task: str, shots: "int | None", limit: "int | None", db: str,
              threads: "int | None") -> None:
    """Score the units of one worker on one model load."""
    store = Store(db)
    sha = store.model_sha(model)
    scorer = Scorer(model, None, threads=threads)
    try:
        for plan in plans:
            if LoopPlan.parse(plan) != scorer.plan:
                scorer.set_plan(plan)
            run_unit(scorer, store, sha, TASKS[task], shots, limit)
    finally:
        scorer.close()
        store.close()


def heatmap(grid: dict[tuple[int, int], float], base: float, n_layer: int, title: str, path: Path) -> None:
    """Accuracy per (start, last layer) with the baseline marked on the colour bar and the best cells labelled."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    m = np.full((n_layer, n_layer), np.nan)
    for (s, e), acc in grid.items():
        m[s, e - 1] = acc
    fig, ax = plots.subplots(figsize=(8, 7))
    norm = TwoSlopeNorm(vcenter=base, vmin=min(np.nanmin(m), base - 1e-6),
                                          vmax=max(np.nanmax(m), base + 1e-6))  # white = the baseline
    im = ax.imshow(m, origin="lower", cmap="RdBu", norm=norm)
    cbar = fig.colorbar(im, ax=ax, label="accuracy")
    cbar.ax.axhline(base, color="k", linewidth=2)
    cbar.ax.text(1.05, base, " baseline", transform=cbar.ax.get_yaxis_transform(), va="center", fontsize=8)
    for (s, e), acc in sorted(grid.items(), key=lambda kv: -kv[1])[:5]:
        ax.text(e - 1, s, f"{acc:.3f}", ha="center", va="center", fontsize=7, color="k", fontweight="bold")
    ax.set_xlabel("last layer of the block (e - 1)")
    ax.set_ylabel("first layer of the block (s)")
    ax.set_title(title, fontsize=10)
    plots.save(fig, path, dpi=120)


@command
@click.command()
@click.argument("model")
@click.option("--task", default="winogrande", show_default=True)
@click.option("--count", "-k", type=click.IntRange(2), default=3, show_default=True, help="Passes of every block.")
@click.option("--mix", default="none", show_default=True, metavar="MIX")
@click.option("--starts", default=None, metavar="S0:S1", help="Window of first layers (default: all).")
@click.option("--sizes", default=None, metavar="M0:M1", help="Window of block sizes (default: all).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N items.")
@click.option("--shots", type=click.IntRange(0), default=None)
@click.option("--jobs", "-j", type=click.IntRange(1), default=1, show_default=True, help="Worker processes.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None, help="Threads in all (split over jobs).")
@click.option("--db", type=click.Path(dir_okay=False), default=str(DEFAULT_DB), show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False), default="results", show_default=True)
def sweep(model: str, task: str, count: int, mix: str, starts: "str | None", sizes: "str | None",
          limit: "int | None", shots: "int | None", jobs: int, threads: "int | None", db: str, output: str) -> None:
    """Score every block range of MODEL at COUNT passes on one task; heatmap and CSV."""
    quiet_llama_logs()
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}")
    path = resolve(model)
    n_layer = model_info(path).n_layer
    mixed = Mix.parse(mix)
    ranges = block_ranges(n_layer, starts, sizes)
    plans = ["none"] + [str(LoopPlan(s, e, count, mix=mixed)) for s, e in ranges]
    n_items = len(TASKS[task].items(shots, limit))
    shots_used = TASKS[task].default_shots if shots is None else shots
    store = Store(db)
    sha = store.model_sha(path)
    per_job = max(1, (threads or os.cpu_count() or 1) // jobs)
    workers = [subprocess.Popen([sys.executable, "-m", "ggufloop.sweep", json.dumps(
        {"model": str(path), "plans": plans[j::jobs], "task": task, "shots": shots, "limit": limit, "db": db,
         "threads": per_job})]) for j in range(jobs)]

    def scored() -> int:
        return sum(len(store.done(sha, task, shots_used, p)) for p in plans)

    with click.progressbar(length=len(plans) * n_items, label=f"{len(plans)} plans x {n_items} items",
                           file=sys.stderr, show_eta=True) as bar:
        last = scored()
        bar.update(last)
        while any(w.poll() is None for w in workers):
            time.sleep(2)
            now = scored()
            bar.update(now - last)
            last = now
    if any(w.returncode for w in workers):
        raise TaskError("a sweep worker failed; run the same command again to resume")

    ids = {it.id for it in TASKS[task].items(shots, limit)}
    acc = {}
    for plan in plans:
        rows = store.rows(sha, task, shots_used, plan)
        acc[plan] = sum(rows[i][0] for i in ids) / len(ids)
    store.close()
    base = acc["none"]
    grid = {(s, e): acc[p] for (s, e), p in zip(ranges, plans[1:])}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{path.stem}-{task}-x{count}-{mixed}".replace(":", "_")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["start", "end", "count", "mix", "n", "acc", "baseline"])
        for (s, e), a in grid.items():
            w.writerow([s, e, count, str(mixed), len(ids), f"{a:.4f}", f"{base:.4f}"])
    heatmap(grid, base, n_layer, f"{path.stem}, {task} ({len(ids)} items, {shots_used}-shot), K={count}, mix {mixed}",
            out / f"{stem}.png")
    best = sorted(grid.items(), key=lambda kv: -kv[1])[:5]
    click.echo(f"baseline {base:.4f}; best blocks: " + ", ".join(f"{s}:{e} {a:.4f}" for (s, e), a in best))
    click.echo(f"wrote {out / stem}.csv and .png", err=True)


if __name__ == "__main__":
    quiet_llama_logs()
    spec = json.loads(sys.argv[1])
    run_units(spec["model"], spec["plans"], spec["task"], spec["shots"], spec["limit"], spec["db"], spec["threads"])
