"""Which way of looping does best on held-out items? Each family's plan, chosen by ``ggufloop tune`` on
the search items only, against the uniform family's plan on the same held-out items
(docs/reproduction.md, "Ways of looping compared").

    .venv/bin/python docs/reproduction/families.py --db results/study.sqlite \\
        docs/reproduction/families/tune-*.json > docs/reproduction/families/compare.md

Every tune run must use the same model, tasks, shots and split seed (they then share held-out items).
A family is named by its file, ``tune-<family>.json``. Comparisons are paired (same items): accuracy
difference, 95 % paired bootstrap interval, exact McNemar p, and Holm's adjustment over all families
and tasks compared with uniform.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ggufloop.eval.stats import compare, holm
from ggufloop.eval.store import Store, Unit
from ggufloop.eval.tasks import PROMPT_VERSION
from ggufloop.models import resolve

REFERENCE = "uniform"


def load_runs(paths: list[str]) -> dict[str, dict]:
    runs = {}
    for path in paths:
        family = Path(path).stem.removeprefix("tune-")
        runs[family] = json.loads(Path(path).read_text())
    keys = {
        (Path(r["model"]).name, tuple(r["tasks"]), json.dumps(r["shots"]), r["split"]["seed"]) for r in runs.values()
    }
    if len(keys) != 1:
        sys.exit(f"error: the tune runs differ in model, tasks, shots or split seed: {sorted(keys)}")
    if REFERENCE not in runs:
        sys.exit(f"error: no tune-{REFERENCE}.json among the runs: it is the reference of the comparison")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--scorer", default=PROMPT_VERSION, help="scorer version of the rows (v1: before 2026-11-29)")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    ref = runs[REFERENCE]
    store = Store(args.db)
    sha = store.model_sha(resolve(Path(ref["model"]).stem))
    chosen = {family: run["verdict"]["comparisons"][0]["plan"] for family, run in runs.items()}

    def held_out(task: str, plan: str) -> dict[str, int]:
        items = ref["split"]["items"][task]["heldout"]
        shots = ref["shots"][task]
        prompt = args.scorer  # 0-shot, or examples from a separate split: the pool does not matter
        rows = store.rows(Unit(sha, task, shots, prompt, plan))
        missing = [i for i in items if i not in rows]
        if missing:
            sys.exit(f"error: {len(missing)} held-out {task} items of {plan} are not in {args.db}")
        return {i: rows[i][0] for i in items}

    table = []
    for family in sorted(runs, key=lambda f: (f != "none", f)):
        for task in ref["tasks"]:
            base = held_out(task, "none")
            mine = held_out(task, chosen[family])
            versus_base = compare(list(base.values()), list(mine.values()))
            versus_ref = None
            if family != REFERENCE:
                uniform = held_out(task, chosen[REFERENCE])
                versus_ref = compare(list(uniform.values()), list(mine.values()))
            table.append((family, task, chosen[family], versus_base, versus_ref))
    adjusted = iter(holm([r[4].p_value for r in table if r[4] is not None]))
    p_holm = [next(adjusted) if r[4] is not None else None for r in table]
    n_ref = sum(p is not None for p in p_holm)

    print(f"# Ways of looping compared on held-out items ({Path(ref['model']).stem})\n")
    print(
        f"Each family's plan was chosen by `ggufloop tune` on the search items; below, held-out items only "
        f"(split seed {ref['split']['seed']}). 95 % paired bootstrap intervals, exact McNemar p; the last "
        f"column is Holm-adjusted over the {n_ref} comparisons with {REFERENCE}.\n"
    )
    print(
        "| family | task | chosen plan | n | accuracy | vs unlooped [95% CI] | p | "
        f"vs {REFERENCE} [95% CI] | p | p (Holm) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (family, task, plan, vb, vr), ph in zip(table, p_holm, strict=True):
        ref_cells = (
            f"{vr.diff:+.4f} [{vr.ci_low:+.4f}, {vr.ci_high:+.4f}] | {vr.p_value:.3g} | {ph:.3g}"
            if vr is not None
            else "(reference) | | "
        )
        print(
            f"| {family} | {task} | {plan} | {vb.n} | {vb.plan_acc:.4f} | "
            f"{vb.diff:+.4f} [{vb.ci_low:+.4f}, {vb.ci_high:+.4f}] | {vb.p_value:.3g} | {ref_cells} |"
        )
    print()
    differ = [(r, ph) for r, ph in zip(table, p_holm, strict=True) if ph is not None and ph < 0.05]
    if not differ:
        print(
            f"No family's plan differs from {REFERENCE}'s on the held-out items after Holm's adjustment (alpha 0.05)."
        )
    for (family, task, _, _, vr), ph in differ:
        word = "beats" if vr.diff > 0 else "loses to"
        print(f"- {family} {word} {REFERENCE} on {task}: {vr.diff:+.4f}, Holm-adjusted p {ph:.3g}.")


if __name__ == "__main__":
    main()
