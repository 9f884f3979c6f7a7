"""The held-out table of docs/reproduction.md (§2): every model's tune run, in one table.

    .venv/bin/python docs/reproduction/heldout.py docs/reproduction/heldout/tune-*.json \\
        > docs/reproduction/heldout/table.md

Reads only what ``ggufloop tune --json`` recorded (nothing is rescored): per model, the search (its
candidates, item evaluations and share of the full grid) and the verdict on the held-out items,
with the Holm adjustment tune applied within each model's run (over its finalists and tasks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(run: dict) -> list[str]:
    v = run["verdict"]
    model = Path(run["model"]).stem
    out = []
    for c in v["comparisons"]:
        mark = " (gain)" if c["gain"] else " (loss)" if c["loss"] else ""
        out.append(
            f"| {model} | {c['plan']} | {c['task']} | {c['n']} | {c['base_acc']:.3f} | {c['plan_acc']:.3f} | "
            f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['p_mcnemar']:.3g} | "
            f"{c['p_holm']:.3g}{mark} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="tune --json files, one per model")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    print("# Held-out table: the plan tune selects against the unlooped model\n")
    print(
        "Each model's two finalists, chosen by successive halving on the search half of each task, scored on "
        "the held-out half only. 95 % paired bootstrap interval, exact McNemar p; Holm-adjusted over the "
        "comparisons of that model's run. `(all tasks)` pools the held-out items of both tasks.\n"
    )
    print("| model | candidates | search evaluations | share of the grid | rungs | stopped | shots | winner |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        s = r["search"]
        print(
            f"| {Path(r['model']).stem} | {s['candidates']} | {s['evaluations']:,} | "
            f"{s['evaluations'] / s['grid_evaluations']:.1%} | {len(s['rungs'])} | {s['stop_reason']} | "
            f"{', '.join(f'{t} {k}' for t, k in r['shots'].items())} | {r['verdict']['winner'] or 'none'} |"
        )
    print("\n| model | plan | task | n | unlooped | plan | diff [95% CI] | p | p (Holm) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print("\n".join(rows(r)))
    winners = [Path(r["model"]).stem for r in runs if r["verdict"]["winner"]]
    print()
    print(
        f"A plan beats the unlooped model on held-out items for: {', '.join(winners)}."
        if winners
        else "No selected plan beats the unlooped model on the held-out items of any model."
    )


if __name__ == "__main__":
    main()
