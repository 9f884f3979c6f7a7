"""`ggufloop sweep`: score every block range (s, e) of a plan on the same items, as a heatmap.

The (plan, task) units run in worker processes (--jobs), each with its own model load; the
results database makes the sweep resumable.
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

from ..errors import TaskError
from ..eval.store import DEFAULT_DB, Store
from ..plan import LoopPlan, Mix


@click.command("sweep")
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
def command(
    model: str,
    task: str,
    count: int,
    mix: str,
    starts: str | None,
    sizes: str | None,
    limit: int | None,
    shots: int | None,
    jobs: int,
    threads: int | None,
    db: str,
    output: str,
) -> None:
    """Score every block range of MODEL at COUNT passes on one task; heatmap and CSV."""
    from .. import plots
    from ..eval.sweep import block_ranges
    from ..eval.tasks import TASKS
    from ..gguf_io import model_info
    from ..models import resolve

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
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ggufloop.eval.sweep",
                json.dumps(
                    {
                        "model": str(path),
                        "plans": plans[j::jobs],
                        "task": task,
                        "shots": shots,
                        "limit": limit,
                        "db": db,
                        "threads": per_job,
                    }
                ),
            ]
        )
        for j in range(jobs)
    ]

    def scored() -> int:
        return sum(len(store.done(sha, task, shots_used, p)) for p in plans)

    with click.progressbar(
        length=len(plans) * n_items, label=f"{len(plans)} plans x {n_items} items", file=sys.stderr, show_eta=True
    ) as bar:
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
    plots.heatmap(
        grid,
        base,
        n_layer,
        f"{path.stem}, {task} ({len(ids)} items, {shots_used}-shot), K={count}, mix {mixed}",
        out / f"{stem}.png",
    )
    best = sorted(grid.items(), key=lambda kv: -kv[1])[:5]
    click.echo(f"baseline {base:.4f}; best blocks: " + ", ".join(f"{s}:{e} {a:.4f}" for (s, e), a in best))
    click.echo(f"wrote {out / stem}.csv and .png", err=True)
