"""The cost comparison of docs/reproduction.md: successive halving against the full grid of the same
candidates on the same search items, from the two runs of ``run.sh cost``.

    .venv/bin/python docs/reproduction/cost.py --db results/study.sqlite > docs/reproduction/cost/summary.md

Reads the runs' tune-{halving,grid}.json from --runs (default docs/reproduction/cost, the timed runs;
``run.sh choice`` writes the same searches with the exact scorer to cost/choice) and the times from
docs/reproduction/cost/time-{halving,grid}.txt (GNU time's report of each timed run, from a database
of its own). The item evaluations of a search do not depend on which rows a database already holds.
Says whether halving chose the grid's best candidate, and if not, how its choice compares with it:
paired on the search items (where the grid chose) and on the held-out items (where neither chose).

With --cheaper DIR (``run.sh cheaper`` writes docs/reproduction/cost/cheaper), it also prints a table of the
cheaper searches there (each tune-NAME.json: margin ranking, a smaller n0, a budget) against the grid: item
evaluations and layer-item evaluations (each item evaluation weighed by the virtual depth of its plan, the
layers it runs; items are not weighed by their token counts), the same with prefix reuse (``--prefix-cache``:
a block plan s:e xK runs its virtual layers from s on, and every item any such candidate scores costs one
capture pass of the deepest start + 1 layers; a plan prefix.refusal turns down runs in full), the choice, its rank in the grid, and the
choice against the grid's best, paired, on the search and the held-out items.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ggufloop.eval.stats import compare
from ggufloop.eval.store import Store, Unit
from ggufloop.eval.tasks import PROMPT_VERSION
from ggufloop.gguf_io import model_info
from ggufloop.models import resolve
from ggufloop.plan import LoopPlan

HERE = Path(__file__).resolve().parent / "cost"


def gnu_time(path: Path) -> dict[str, float]:
    """Wall clock and CPU seconds from `/usr/bin/time -v`'s report. A line "Stopped (seconds): N", added
    by hand when the run was stopped (SIGSTOP) while other work used the machine, is taken off the clock."""
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    if stopped := re.search(r"Stopped \(seconds\): ([\d.]+)", text):
        seconds -= float(stopped.group(1))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", text).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", text).group(1))
    return {"wall": seconds, "cpu": user + system}


def final_scores(run: dict) -> dict[str, float]:
    """Each candidate's paired difference from the unlooped model on the most items it was scored on."""
    return {plan: rungs[-1]["diff"] for plan, rungs in run["search"]["scores"].items()}


def layer_evaluations(run: dict, n_layer: int, prefix: str | None = None) -> int:
    """The search's item evaluations, each weighed by the virtual depth of its plan: a candidate scored on n items
    (rungs reuse the earlier rungs' items) runs n x depth layer-items; the unlooped model, on the most items any
    candidate was scored on, n_layer each. With ``prefix`` (the model's architecture), as prefix reuse runs them
    (ggufloop/eval/prefix.py)."""
    from ggufloop.eval.prefix import refusal

    scores = run["search"]["scores"]
    total, reused, deepest = 0, 0, 0
    for plan, rungs in scores.items():
        p, n = LoopPlan.parse(plan), rungs[-1]["n"]
        skip = p.start if prefix and refusal(p, prefix) is None else 0
        total += n * (p.virtual_depth(n_layer) - skip)
        if skip:
            reused, deepest = max(reused, n), max(deepest, p.start)
    return total + reused * (deepest + 1) + max(rungs[-1]["n"] for rungs in scores.values()) * n_layer


def cheaper_table(runs: Path, grid: dict, halving_run: dict, correct, n_layer: int, arch: str) -> None:
    """The cheaper searches of ``runs`` against the grid (see the module's docstring)."""
    scores = final_scores(grid)
    ranked = sorted(scores, key=lambda p: -scores[p])
    best = ranked[0]
    grid_layers = layer_evaluations(grid, n_layer)
    print(
        "| search | rank by | n0 | item evaluations | share of the grid | layer-item evaluations | share | "
        "with prefix reuse | share | choice | its rank in the grid | vs grid's best, search [95% CI] | "
        "vs grid's best, held-out [95% CI] | held-out p |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(runs.glob("tune-*.json")):
        run = json.loads(path.read_text())
        search, chosen = run["search"], run["search"]["finalists"][0]
        layers, reused = layer_evaluations(run, n_layer), layer_evaluations(run, n_layer, prefix=arch)
        cells = [
            path.stem.removeprefix("tune-"),
            search.get("rank") or "accuracy",
            str(search["n0"]),
            f"{search['evaluations']:,}",
            f"1/{grid['search']['evaluations'] / search['evaluations']:.1f}",
            f"{layers:,}",
            f"1/{grid_layers / layers:.1f}",
            f"{reused:,}",
            f"1/{grid_layers / reused:.1f}",
            f"`{chosen}`",
            f"{ranked.index(chosen) + 1} of {len(ranked)}",
        ]
        for part in ("search", "heldout"):
            c = compare(correct(best, part), correct(chosen, part))
            cells.append(f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]")
        cells.append(f"{c.p_value:.3g}")
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        f"The grid: {grid['search']['evaluations']:,} item evaluations, {grid_layers:,} layer-item evaluations "
        f"({layer_evaluations(grid, n_layer, prefix=arch):,} with prefix reuse); its best on the search items `{best}`."
    )
    print()
    print(
        f"Today's halving (n0 32, accuracy; {runs.parent / 'choice'}): "
        f"{layer_evaluations(halving_run, n_layer):,} layer-item evaluations, "
        f"{layer_evaluations(halving_run, n_layer, prefix=arch):,} with prefix reuse "
        f"(1/{grid_layers / layer_evaluations(halving_run, n_layer, prefix=arch):.1f} of the grid's)."
    )


def replays(store: Store, unit, grid: dict, task: str, trials: int) -> None:
    """Successive halving replayed from the grid's stored rows in ``trials`` seeded item orders (the grid scored
    every candidate on every search item, so a replay costs no model evaluation): how often each search finds
    the grid's best, or one of its best 3 / 5, and how far its choice's score falls short of the best's."""
    from ggufloop.eval.search import HalvingConfig, successive_halving

    items = grid["split"]["items"][task]["search"]
    plans = ["none", *grid["search"]["scores"]]
    correct = {p: {task: {i: store.rows(unit(p))[i][0] for i in items}} for p in plans}
    margins = {p: {task: store.margins(unit(p), items)} for p in plans}
    scores = final_scores(grid)
    ranked = sorted(scores, key=lambda p: -scores[p])

    def table(source):
        return lambda key, t, ids: {i: source[key][t][i] for i in ids}

    print(f"Successive halving replayed from the grid's rows, {trials} item orders (eta 3):")
    print()
    print(
        "| n0 | rank by | item evaluations | P(grid's best) | P(its top 3) | P(its top 5) | shortfall, points (mean) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n0 in (8, 32):
        for rank in ("accuracy", "margin"):
            hits, evals, gaps = [], [], []
            for seed in range(trials):
                config = HalvingConfig(n0=n0, eta=3, seed=seed, rank=rank)
                result = successive_halving(
                    ranked, {task: items}, table(correct), config, baseline="none", margin=table(margins)
                )
                chosen = result.finalists[0]
                hits.append(ranked.index(chosen))
                evals.append(result.evaluations)
                gaps.append(100 * (scores[ranked[0]] - scores[chosen]))
            share = lambda k, hits=hits: sum(h < k for h in hits) / trials  # noqa: E731
            print(
                f"| {n0} | {rank} | {sum(evals) / trials:,.0f} | {share(1):.2f} | {share(3):.2f} | {share(5):.2f} | "
                f"{sum(gaps) / trials:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--scorer", default=PROMPT_VERSION, help="scorer version of the rows (v1: before 2026-11-29)")
    parser.add_argument("--runs", type=Path, default=HERE, help="folder of tune-{halving,grid}.json")
    parser.add_argument("--cheaper", type=Path, help="folder of cheaper searches' tune-NAME.json: their table only")
    parser.add_argument("--replays", type=int, default=0, help="with --cheaper: also replay halving in N orders")
    args = parser.parse_args()
    halving = json.loads((args.runs / "tune-halving.json").read_text())
    grid = json.loads((args.runs / "tune-grid.json").read_text())
    task = halving["tasks"][0]
    store = Store(args.db)
    sha = store.model_sha(resolve(Path(halving["model"]).stem))
    unit = lambda plan: Unit(sha, task, 0, args.scorer, plan)  # noqa: E731

    def correct(plan: str, part: str) -> list[int]:
        rows = store.rows(unit(plan))
        return [rows[i][0] for i in halving["split"]["items"][task][part]]

    if args.cheaper:
        info = model_info(resolve(Path(halving["model"]).stem))
        cheaper_table(args.cheaper, grid, halving, correct, info.n_layer, info.arch)
        if args.replays:
            print()
            replays(store, unit, grid, task, args.replays)
        return
    scores = final_scores(grid)
    ranked = sorted(scores, key=lambda p: -scores[p])
    best, chosen = ranked[0], halving["search"]["finalists"][0]
    times = {name: gnu_time(HERE / f"time-{name}.txt") for name in ("halving", "grid")}
    evals = {name: run["search"]["evaluations"] for name, run in (("halving", halving), ("grid", grid))}

    print("| method | item evaluations | share | wall clock | CPU time | share of the grid's CPU |")
    print("|---|---|---|---|---|---|")
    for name in ("halving", "grid"):
        t = times[name]
        print(
            f"| {name} | {evals[name]:,} | {evals[name] / evals['grid']:.1%} | {t['wall'] / 60:.1f} min | "
            f"{t['cpu'] / 60:.1f} min | {t['cpu'] / times['grid']['cpu']:.1%} |"
        )
    print()
    print(f"Grid's best candidate on all search items: `{best}` ({scores[best]:+.4f} over the unlooped model); ")
    print(f"halving's choice: `{chosen}`, rank {ranked.index(chosen) + 1} of {len(ranked)} in the grid ")
    print(f"({scores[chosen]:+.4f}).")
    if chosen == best:
        print("\nHalving chose the grid's best candidate.")
        return
    print()
    print("| comparison | items | n | grid's best | halving's choice | difference [95% CI] | McNemar p |")
    print("|---|---|---|---|---|---|---|")
    for part in ("search", "heldout"):
        c = compare(correct(best, part), correct(chosen, part))
        print(
            f"| halving's choice vs grid's best | {part} | {c.n} | {c.base_acc:.4f} | {c.plan_acc:.4f} | "
            f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | {c.p_value:.3g} |"
        )


if __name__ == "__main__":
    main()
