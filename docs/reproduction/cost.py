"""The cost comparison of docs/reproduction.md: successive halving against the full grid of the same
candidates on the same search items, from the two runs of ``run.sh cost``.

    .venv/bin/python docs/reproduction/cost.py --db results/study.sqlite > docs/reproduction/cost/summary.md

Reads the runs' tune-{halving,grid}.json from --runs (default docs/reproduction/cost, the timed runs;
``run.sh choice`` writes the same searches with the exact scorer to cost/choice) and the times from
docs/reproduction/cost/time-{halving,grid}.txt (GNU time's report of each timed run, from a database
of its own). The item evaluations of a search do not depend on which rows a database already holds.
Says whether halving chose the grid's best candidate, and if not, how its choice compares with it:
paired on the search items (where the grid chose) and on the held-out items (where neither chose).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ggufloop.eval.stats import compare
from ggufloop.eval.store import Store, Unit
from ggufloop.eval.tasks import PROMPT_VERSION
from ggufloop.models import resolve

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--scorer", default=PROMPT_VERSION, help="scorer version of the rows (v1: before 2026-11-29)")
    parser.add_argument("--runs", type=Path, default=HERE, help="folder of tune-{halving,grid}.json")
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
