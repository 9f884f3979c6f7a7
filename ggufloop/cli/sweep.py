"""`ggufloop sweep`: score every block range (s, e) of a plan on the same items, as a heatmap.

The (plan, task) units run on an executor (``eval.executors``: here, --jobs worker processes each
with its own model load, or --cluster); the results database makes the sweep resumable.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import OptionError, PlanError, TaskError
from ..eval.store import Store
from ..plan import DECODES, LoopPlan, Mix
from .options import prefix_cache_option, prefix_config, store_options

if TYPE_CHECKING:
    from ..eval.prefix import PrefixConfig
    from ..eval.units import Request


@click.command("sweep")
@click.argument("model")
@click.option("--task", default="winogrande", show_default=True)
@click.option("--count", "-k", type=click.IntRange(2), default=3, show_default=True, help="Passes of every block.")
@click.option("--mix", default="none", show_default=True, metavar="MIX")
@click.option("--starts", default=None, metavar="S0:S1", help="Window of first layers (default: all).")
@click.option("--sizes", default=None, metavar="M0:M1", help="Window of block sizes (default: all).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N items.")
@click.option("--jobs", "-j", type=click.IntRange(1), default=1, show_default=True, help="Worker processes.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None, help="Threads in all (split over jobs).")
@click.option(
    "--decode",
    type=click.Choice(DECODES),
    default="full",
    show_default=True,
    help="What generated tokens run (gsm8k): every block's plan, or the block once (@bypass).",
)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="gsm8k: most tokens per answer (256).")
@click.option("--gsm8k-format", type=click.Choice(["chat", "plain"]), default=None, help="gsm8k's prompt (see eval).")
@click.option(
    "--metric",
    type=click.Choice(["flexible", "strict"]),
    default="flexible",
    show_default=True,
    help="gsm8k: the filter an answer's correctness is read with (both are stored).",
)
@click.option("-o", "--output", type=click.Path(file_okay=False), default="results", show_default=True)
@prefix_cache_option
@store_options
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
    cluster: str | None,
    output: str,
    decode: str,
    max_new_tokens: int | None,
    gsm8k_format: str | None,
    metric: str,
    prefix_cache: int,
) -> None:
    """Score every block range of MODEL at COUNT passes on one task; heatmap and CSV.

    gsm8k (generative) generates every block's answers in this process, 8 per step, and reads them
    with --metric; every answer is stored, so sweep, eval and tune share them."""
    from .. import plots
    from ..eval import gsm8k
    from ..eval.evaluate import GenerativeExecutor
    from ..eval.sweep import block_ranges, cells, stored_correct
    from ..eval.tasks import TASKS
    from ..eval.units import Request, unit_for
    from ..gguf_io import model_info
    from ..models import resolve

    if task != gsm8k.TASK and task not in TASKS:
        raise TaskError(f"unknown task {task!r}")
    if task != gsm8k.TASK and (max_new_tokens is not None or gsm8k_format is not None):
        raise OptionError("--max-new-tokens and --gsm8k-format apply to --task gsm8k")
    if task == gsm8k.TASK and (jobs > 1 or cluster):
        raise OptionError("gsm8k generates in this process, 8 answers per step: --jobs and --cluster do not apply")
    if task == gsm8k.TASK and prefix_cache:
        raise OptionError("--prefix-cache applies to multiple-choice scoring: gsm8k generates from the first layer on")
    path = resolve(model)
    n_layer = model_info(path).n_layer
    mixed = Mix.parse(mix)
    ranges = block_ranges(n_layer, starts, sizes)
    if not ranges:
        raise PlanError(f"no block in the windows --starts {starts} --sizes {sizes} of a {n_layer}-layer model")
    block_plans = {(s, e): str(LoopPlan(s, e, count, mix=mixed, decode=decode)) for s, e in ranges}
    plans = ["none", *block_plans.values()]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(db)
    store.check_writable()
    sha = store.model_sha(path)
    if task == gsm8k.TASK:
        executor = GenerativeExecutor(path, store, sha, threads, gsm8k_format, max_new_tokens, metric, shots)
        ids = list(executor.problems)[:limit]
        shots_used = executor.shots
        try:
            with click.progressbar(
                length=len(plans) * len(ids), label=f"{len(plans)} plans x {len(ids)} answers", file=sys.stderr
            ) as bar:
                got = executor.run([Request(p, task, limit=limit) for p in plans], bar.update)
        finally:
            executor.close()
        correct = {p: {i: r[0] for i, r in rows.items()} for p, rows in zip(plans, got)}
    else:
        the_task = TASKS[task]
        items = the_task.items(shots, limit)
        shots_used = the_task.default_shots if shots is None else shots
        ids = [it.id for it in items]
        wanted = set(ids)
        # only what is not scored yet goes to workers: a finished sweep redraws its map without loading the model
        units = {p: unit_for(sha, the_task, shots, p, None) for p in plans}
        todo = [p for p, u in units.items() if not wanted <= store.done(u)]
        if todo:
            prefix = prefix_config(path, todo, prefix_cache)
            requests = [Request(p, task, shots, limit) for p in todo]
            _score(path, store, sha, threads, jobs, cluster, requests, len(ids), prefix)
        correct = {p: stored_correct(store, u) for p, u in units.items()}
    grid = cells(correct["none"], {b: correct[p] for b, p in block_plans.items()}, ids)
    store.close()
    base = grid[0].base_acc
    variant = f"{mixed}" + ("" if decode == "full" else f"-{decode}") + (f"-{metric}" if task == gsm8k.TASK else "")
    stem = f"sweep-{path.stem}-{task}-x{count}-{variant}".replace(":", "_")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["start", "end", "count", "mix", "n", "acc", "baseline", "diff", "ci_low", "ci_high", "p_mcnemar", "p_holm"]
        )
        for c in grid:
            w.writerow(
                [
                    c.start,
                    c.end,
                    count,
                    str(mixed),
                    c.n,
                    f"{c.acc:.4f}",
                    f"{c.base_acc:.4f}",
                    f"{c.diff:+.4f}",
                    f"{c.ci_low:+.4f}",
                    f"{c.ci_high:+.4f}",
                    f"{c.p:.4g}",
                    f"{c.p_holm:.4g}",
                ]
            )
    plots.heatmap(
        {(c.start, c.end): c.acc for c in grid},
        base,
        n_layer,
        f"{path.stem}, {task} ({len(ids)} items, {shots_used}-shot), K={count}, mix {mixed}"
        + ("" if decode == "full" else f", @{decode}")
        + (f", {metric}" if task == gsm8k.TASK else ""),
        out / f"{stem}.png",
        significant={(c.start, c.end) for c in grid if c.p_holm < 0.05},
    )
    best = sorted(grid, key=lambda c: -c.acc)[:5]
    click.echo(
        f"baseline {base:.4f}; best blocks: "
        + ", ".join(f"{c.start}:{c.end} {c.acc:.4f} ({c.diff:+.4f}, p_holm {c.p_holm:.2g})" for c in best)
    )
    n_sig = sum(c.p_holm < 0.05 for c in grid)
    click.echo(f"{n_sig} of {len(grid)} blocks differ from the unlooped model (Holm-adjusted McNemar p < 0.05)")
    click.echo(f"wrote {out / stem}.csv and .png", err=True)


def _score(
    path: Path,
    store: Store,
    sha: str,
    threads: int | None,
    jobs: int,
    cluster: str | None,
    requests: list[Request],
    n_items: int,
    prefix: PrefixConfig | None = None,
) -> None:
    """Every unit's missing rows into the store: on the Ray cluster, in --jobs worker processes, or here."""
    from ..eval.executors import open_executor
    from ..eval.ray_executor import ClusterConfig, RayExecutor

    config = ClusterConfig(cluster, threads or 1) if cluster else None
    executor = open_executor(path, store, sha, threads, config, jobs=jobs, prefix=prefix)
    try:
        with click.progressbar(
            length=len(requests) * n_items,
            label=f"{len(requests)} plans x {n_items} items",
            file=sys.stderr,
            show_eta=True,
        ) as bar:
            executor.run(requests, bar.update)
    finally:
        executor.close()
    if isinstance(executor, RayExecutor):
        click.echo(executor.summary(), err=True)
