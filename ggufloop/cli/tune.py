"""`ggufloop tune`: find a plan that helps a model, and say on held-out items whether it does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import OptionError
from .options import (
    parse_counts,
    parse_duration,
    parse_mixes,
    prefix_cache_option,
    prefix_config,
    quiet_llama_logs,
    store_options,
    writable_file,
)


def report(res) -> str:
    """The run as text: the search in numbers, the finalists' search scores, the held-out verdict."""
    from ..eval import search

    r, v = res.result, res.verdict
    lines = [
        f"{Path(res.model).name}: {len(res.candidates)} candidate plans on {', '.join(res.tasks)}; "
        f"split seed {res.split.seed}, {res.split.search_fraction:.0%} of each task's items for the search",
        *(
            [
                f"prefilter on {', '.join(res.prefilter.tasks)}"
                + (f" ({res.prefilter.setup.shots}-shot)" if res.prefilter.setup.shots is not None else "")
                + f": {res.prefilter.result.evaluations} item evaluations, "
                f"kept {len(res.prefilter.result.finalists)} of {len(res.candidates)} plans: "
                + ", ".join(res.prefilter.result.finalists)
            ]
            if res.prefilter
            else []
        ),
        f"search ({r.method}): {len(r.rungs)} rungs, {r.evaluations} item evaluations "
        f"({r.evaluations / res.grid_evaluations:.1%} of the full grid's {res.grid_evaluations}); "
        f"stopped: {r.stop_reason}",
        "",
        "finalists on the search items (paired against the unlooped model, accuracy, macro over tasks):",
    ]
    for p in r.finalists:
        s = r.final_score(p)
        lines.append(f"  {p:<28} n={s.n:<5} acc {s.acc:.4f}  unlooped {s.base_acc:.4f}  diff {s.diff:+.4f}")
    lines += [
        "",
        f"held-out items only; 95% paired bootstrap interval, exact McNemar p, {v.correction.title()}-adjusted "
        f"over {v.family_size} comparisons (alpha {v.alpha}):",
        "",
        "| plan | task | n | unlooped | plan | diff [95% CI] | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in v.rows:
        c = row.comparison
        mark = " (gain)" if row.gain else " (loss)" if row.loss else ""
        lines.append(
            f"| {row.plan} | {row.task} | {c.n} | {c.base_acc:.4f} | {c.plan_acc:.4f} | "
            f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | {c.p_value:.3g} | {row.p_adjusted:.3g}{mark} |"
        )
    lines.append("")
    if v.winner is None:
        lines.append("verdict: no plan beats the unlooped model on the held-out items.")
    else:
        row = v.row(v.winner, search.POOLED)
        lines.append(
            f"verdict: {v.winner} beats the unlooped model on the held-out items "
            f"({row.comparison.diff:+.4f}, Holm-adjusted p = {row.p_adjusted:.3g})."
        )
    return "\n".join(lines)


@click.command("tune")
@click.argument("model")
@click.option(
    "--tasks",
    default="winogrande",
    show_default=True,
    help="Comma-separated tasks (as eval): the search ranks plans by their mean gain over them.",
)
@click.option(
    "--starts",
    default=None,
    metavar="S0:S1",
    help="Window of the blocks' first layers (default: the middle half of the stack).",
)
@click.option("--sizes", default=None, metavar="M0:M1", help="Window of block sizes (default: 2 to L/6, at least 2:4).")
@click.option("--counts", default="2,3", show_default=True, help="Pass counts K to try.")
@click.option(
    "--mixes",
    default="none,uniform,ema,autoalign",
    show_default=True,
    help="Mixes to try, with parameters if wanted (e.g. none,uniform,ema:0.3).",
)
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the search/held-out split.")
@click.option(
    "--search-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="Share of each task's items the search may see; the rest is held out.",
)
@click.option(
    "--n0",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Search items per task at the first rung of successive halving.",
)
@click.option(
    "--eta",
    type=click.IntRange(2),
    default=3,
    show_default=True,
    help="Each rung keeps the best 1/eta of the plans and gives them eta times more items.",
)
@click.option(
    "--rank",
    type=click.Choice(["accuracy", "margin"]),
    default="accuracy",
    show_default=True,
    help="What the search rungs rank plans by, paired against the unlooped model: accuracy, or each item's "
    "margin (the correct choice's log-likelihood minus the best wrong one's), which on simulated "
    "benchmarks finds the best plan with a third to a half of the items, and is undecided on real rows "
    "(docs/search/margin.md). Multiple-choice tasks only (a gsm8k search ranks by accuracy; its --prefilter "
    "by this); the verdict is on accuracy.",
)
@click.option(
    "--finalists",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Plans judged on the held-out items (Holm-adjusted together).",
)
@click.option(
    "--budget",
    type=click.IntRange(1),
    default=None,
    metavar="ITEMS",
    help="Most item evaluations the search may use (a rung that would exceed it is not started).",
)
@click.option(
    "--time-limit",
    default=None,
    metavar="DURATION",
    help="End the search in time (90s, 30m, 1.5h): a rung that would not finish within it at the pace "
    "so far is not started, and the best of the last rung are judged. The held-out scoring comes after.",
)
@click.option("--grid", is_flag=True, help="Score every candidate on every search item (the cost reference).")
@click.option("--limit", type=click.IntRange(2), default=None, help="Use only the first N items of each task.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the split, every candidate's search scores and the verdict here.",
)
@click.option(
    "--bake",
    "bake_out",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="OUT.gguf",
    help="Write the winning plan into a copy of the model (nothing when no plan wins).",
)
@click.option(
    "--prefilter",
    default=None,
    metavar="TASKS",
    help="A first stage on cheap tasks (multiple-choice, as --tasks): successive halving over every candidate "
    "on their search items keeps the best --prefilter-keep, and only those are searched on --tasks.",
)
@click.option("--prefilter-keep", type=click.IntRange(1), default=8, show_default=True, metavar="N")
@click.option(
    "--prefilter-shots",
    type=click.IntRange(0),
    default=None,
    metavar="N",
    help="Few-shot examples of the --prefilter tasks (default: --shots), so that a gsm8k search can keep its own "
    "8-shot prompt while the prefilter reuses rows scored 0-shot.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1),
    default=None,
    help="gsm8k: most tokens per answer (default 256, lm-eval's).",
)
@click.option(
    "--gsm8k-format",
    type=click.Choice(["chat", "plain"]),
    default=None,
    help="gsm8k's prompt (default: chat where the model has a chat template, else plain; see eval --help).",
)
@click.option(
    "--metric",
    type=click.Choice(["flexible", "strict"]),
    default="flexible",
    show_default=True,
    help="gsm8k: the filter that decides an answer's correctness in the search and the verdict "
    "(flexible-extract or strict-match; both are stored).",
)
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@prefix_cache_option
@store_options
def command(
    model: str,
    tasks: str,
    starts: str | None,
    sizes: str | None,
    counts: str,
    mixes: str,
    split_seed: int,
    search_fraction: float,
    n0: int,
    eta: int,
    rank: str,
    finalists: int,
    budget: int | None,
    time_limit: str | None,
    grid: bool,
    limit: int | None,
    shots: int | None,
    db: str,
    json_out: str | None,
    bake_out: str | None,
    threads: int | None,
    cluster: str | None,
    prefilter: str | None,
    prefilter_keep: int,
    prefilter_shots: int | None,
    max_new_tokens: int | None,
    gsm8k_format: str | None,
    metric: str,
    prefix_cache: int,
) -> None:
    """Search for a loop plan that helps MODEL on the tasks, and judge it on held-out items.

    Every task's items are split (by a stable hash of the item id and --split-seed) into a
    search part and a held-out part. Successive halving scores every candidate plan on a few
    search items, keeps the best 1/eta, gives them more items, and repeats; every comparison is
    paired against the unlooped model on the same items. The finalists are then scored on the
    held-out items only: the verdict, with Holm-adjusted p-values, may well be that no plan helps.
    Scored items are kept in the results database, so a stopped run resumes where it stopped.

    gsm8k (generative, searched alone) costs hundreds of times more per item than a multiple-choice
    task: give it a small --n0, a --time-limit, and a --prefilter of cheap tasks; its verdict is on
    held-out GSM8K items only.
    """
    from ..eval import gsm8k, search
    from ..eval.evaluate import GenerativeExecutor
    from ..eval.ray_executor import ClusterConfig
    from ..eval.store import Store
    from ..eval.tasks import resolve_tasks
    from ..eval.tune import Candidates, Prefilter, prepare, tune
    from ..gguf_io import write_plan
    from ..models import resolve

    quiet_llama_logs()
    for out in (json_out, bake_out):
        if out:
            writable_file(out)
    seconds = parse_duration(time_limit) if time_limit else None
    if seconds and grid:
        raise OptionError("--time-limit applies to successive halving; the full grid (--grid) has one rung")
    path = resolve(model)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    generative = gsm8k.TASK in names
    if generative and rank == "margin" and not prefilter:
        raise OptionError(
            "gsm8k answers have no log-likelihood margin: --rank margin needs a multiple-choice --prefilter"
        )
    if generative and len(names) > 1:
        raise OptionError("gsm8k is searched alone: give the multiple-choice tasks as --prefilter")
    if generative and cluster:
        raise OptionError(
            "--cluster scores multiple-choice tasks; gsm8k generates in this process (--prefilter may use it)"
        )
    if generative and prefix_cache:
        raise OptionError("--prefix-cache applies to multiple-choice scoring: gsm8k generates from the first layer on")
    if not generative and (max_new_tokens is not None or gsm8k_format is not None):
        raise OptionError("--max-new-tokens and --gsm8k-format apply to --tasks gsm8k")
    if prefilter_shots is not None and not prefilter:
        raise OptionError("--prefilter-shots applies with --prefilter")
    task_list = [gsm8k.GSM8K] if generative else resolve_tasks(tasks)
    first = None
    if prefilter:
        first_tasks = resolve_tasks(prefilter)
        halving_first = search.HalvingConfig(n0=32, eta=eta, rank=rank)
        first = Prefilter(tuple(first_tasks), prefilter_keep, halving_first, prefilter_shots)
    cands = Candidates(starts, sizes, parse_counts(counts), parse_mixes(mixes))
    split = search.SplitConfig(split_seed, search_fraction)
    main_rank = "accuracy" if generative else rank  # a generated answer has no margin
    halving = search.HalvingConfig(n0=n0, eta=eta, top_k=finalists, budget=budget, rank=main_rank)
    setup = prepare(path, task_list, cands, limit=limit, split=split, halving=halving, grid=grid, prefilter=first)
    click.echo(
        f"{len(setup.plans)} candidate plans; {setup.search_evaluations} item evaluations for the search "
        f"(the full grid: {setup.grid_evaluations}), {setup.evaluations} in all",
        err=True,
    )
    if setup.schedule and setup.schedule.stop_reason == "budget":
        last = setup.schedule.rungs[-1]
        low, high = min(last.items.values()), max(last.items.values())
        click.echo(
            f"note: the budget pays for {len(setup.schedule.rungs)} rung(s): the finalists are chosen among "
            f"{last.candidates} plans on {low if low == high else f'{low}-{high}'} search items per task",
            err=True,
        )
    prefix = prefix_config(path, setup.plans, prefix_cache)
    executor = None
    if generative:
        store = Store(db)
        executor = GenerativeExecutor(
            path, store, store.model_sha(path), threads, gsm8k_format, max_new_tokens, metric, shots
        )
    with click.progressbar(length=setup.evaluations, label="tune", file=sys.stderr, show_eta=True) as bar:
        res = tune(
            path,
            task_list,
            setup,
            shots=shots,
            limit=limit,
            halving=halving,
            split=split,
            grid=grid,
            db=db,
            threads=threads,
            progress=bar.update,
            cluster=ClusterConfig(cluster, threads or 1) if cluster else None,
            time_limit=seconds,
            executor=executor,
            prefix=prefix,
        )
    if generative:
        store.close()
    click.echo(report(res))
    out = Path(json_out) if json_out else Path(db).parent / f"tune-{path.stem}-{'_'.join(res.tasks)}.json"
    out.write_text(json.dumps(res.to_json(), indent=1))
    click.echo(f"wrote {out}", err=True)
    if bake_out and res.verdict.winner is not None:
        from ..plan import LoopPlan

        write_plan(path, bake_out, LoopPlan.parse(str(res.verdict.winner)))
        click.echo(f"wrote {bake_out} with plan {res.verdict.winner}", err=True)
    elif bake_out:
        click.echo(f"no plan won, so {bake_out} was not written", err=True)
