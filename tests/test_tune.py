"""`ggufloop tune` end to end on a tiny model: held-out verdict, no leaks, resume after a kill."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ggufloop.eval.search import SplitConfig, split_task
from ggufloop.eval.tasks import TASKS, FewshotPool, _solved

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.data


def tune_args(model: Path, db: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ggufloop",
        "tune",
        str(model),
        "--tasks",
        "piqa,arc_easy",
        "--limit",
        "48",
        "--starts",
        "1:4",
        "--sizes",
        "2:3",
        "--counts",
        "2,3",
        "--mixes",
        "none,uniform",
        "--n0",
        "4",
        "--finalists",
        "2",
        "--split-seed",
        "7",
        "--db",
        str(db),
        "--json",
        str(out),
        "-t",
        "2",
    ]


def rows(db: Path) -> list[tuple]:
    return sorted(sqlite3.connect(db).execute("SELECT task, prompt, plan, item, lls FROM results").fetchall())


def test_fewshot_examples_come_from_the_pool_only():
    task = TASKS["winogrande"]
    ids = [ex.id for ex in task.examples()[:60]]
    split = split_task(task.name, ids, SplitConfig(seed=3))
    pool = FewshotPool("test", split.fewshot_pool)
    items = task.items(shots=3, limit=60, pool=pool)
    examples = {ex.id: ex for ex in task.examples()}
    used = set()
    for it in items:
        for ex_id, ex in examples.items():
            if _solved("winogrande", ex) in it.contexts[0]:
                used.add(ex_id)
    assert used and used <= set(split.search)  # held-out items never appear as examples
    assert task.prompt_key(pool, 3) != task.prompt_key()  # and such prompts are stored apart
    assert task.prompt_key(pool, 0) == task.prompt_key()  # unless no example is drawn
    mmlu = TASKS["mmlu:anatomy"]  # a task with its own few-shot split keeps the standard prompts
    assert mmlu.prompt_key(pool) == mmlu.prompt_key()


def test_tune_end_to_end_and_resume_after_kill(tiny_models, tmp_path):
    model = tiny_models["llama"][2]
    db, out = tmp_path / "r.sqlite", tmp_path / "tune.json"
    args = tune_args(model, db, out)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = 0
    for _ in range(1200):
        time.sleep(0.05)
        if db.exists():
            try:
                n = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.Error:
                n = 0
            if n >= 40:
                break
    proc.kill()
    proc.wait()
    assert n >= 40 and not out.exists(), "the run should have been killed part way"
    before = rows(db)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    after = rows(db)
    assert set(before) <= set(after)  # nothing lost, nothing rescored
    assert len({r[:4] for r in after}) == len(after)

    res = json.loads(out.read_text())
    # the split is recorded, disjoint and covering, and the same as the library's
    for task in ("piqa", "arc_easy"):
        items = res["split"]["items"][task]
        assert not set(items["search"]) & set(items["heldout"])
        ids = [ex.id for ex in TASKS[task].examples()[:48]]
        assert set(items["search"]) | set(items["heldout"]) == set(ids)
        assert tuple(items["search"]) == split_task(task, ids, SplitConfig(seed=7)).search
    # the verdict compares on held-out items only: n equals the held-out sizes
    heldout = {t: len(res["split"]["items"][t]["heldout"]) for t in ("piqa", "arc_easy")}
    for c in res["verdict"]["comparisons"]:
        assert c["n"] == (sum(heldout.values()) if c["task"] == "(all tasks)" else heldout[c["task"]])
        assert c["p_holm"] >= c["p_mcnemar"]
    assert len(res["search"]["finalists"]) == 2
    assert res["search"]["evaluations"] < res["search"]["grid_evaluations"]
    assert "verdict:" in done.stdout
    # the held-out rows in the store are exactly the verdict's numbers
    con = sqlite3.connect(db)
    base = dict(con.execute("SELECT item, correct FROM results WHERE task='piqa' AND plan='none'").fetchall())
    held = res["split"]["items"]["piqa"]["heldout"]
    row = next(c for c in res["verdict"]["comparisons"] if c["task"] == "piqa")
    assert row["base_acc"] == pytest.approx(sum(base[i] for i in held) / len(held))

    # a third run scores nothing and reaches the same verdict
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert rows(db) == after
    assert json.loads(out.read_text())["verdict"] == res["verdict"]

    # a time limit already spent when rung 0 ends: the search stops there, its best 2 are judged
    quick = tmp_path / "quick.json"
    args[args.index(str(out))] = str(quick)
    limited = subprocess.run([*args, "--time-limit", "0.001s"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert limited.returncode == 0, limited.stderr
    q = json.loads(quick.read_text())["search"]
    assert q["stop_reason"] == "time" and len(q["rungs"]) == 1 and q["time_limit_s"] == 0.001
    assert q["finalists"] == q["rungs"][0]["kept"] == q["ranking"][:2]
    assert "stopped: time" in limited.stdout


def test_tune_says_when_the_budget_cuts_the_search_short(tiny_models, tmp_path):
    """12 candidates (3 blocks x 2 counts x 2 mixes) and the baseline on 4 items of each of 2 tasks at
    rung 0: 13 x 8 = 104 evaluations; a budget of 110 pays for that rung only (the next needs 10
    more), and tune says so before it starts."""
    args = tune_args(tiny_models["llama"][2], tmp_path / "b.sqlite", tmp_path / "b.json")
    args[args.index("--limit") + 1] = "16"
    proc = subprocess.run([*args, "--budget", "110"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (
        "note: the budget pays for 1 rung(s): the finalists are chosen among 12 plans on 4 search items" in proc.stderr
    )
    res = json.loads((tmp_path / "b.json").read_text())["search"]
    assert res["stop_reason"] == "budget" and len(res["rungs"]) == 1 and res["evaluations"] == 104


def test_tune_refuses_bad_settings_with_one_line(tiny_models, tmp_path):
    model = str(tiny_models["llama"][2])
    for extra, message in [
        (["--counts", "x"], "bad counts"),
        (["--counts", "1"], "must be >= 2"),
        (["--mixes", "blend"], "unknown mix"),
        (["--starts", "40:50"], "no candidate plan"),
        (["--budget", "3"], "cannot pay for rung 0"),
        (["--tasks", "bogus"], "unknown task"),
        (["--time-limit", "soon"], "bad duration"),
        (["--time-limit", "0s"], "must be positive"),
        (["--time-limit", "1m", "--grid"], "applies to successive halving"),
        (["--tasks", "gsm8k", "--rank", "margin"], "no log-likelihood margin"),
        (["--tasks", "gsm8k", "--prefix-cache", "64"], "--prefix-cache applies to multiple-choice scoring"),
        (["--prefix-cache", "64", "--cluster", "127.0.0.1:1"], "does not go with --cluster"),
    ]:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ggufloop",
                "tune",
                model,
                "--limit",
                "20",
                "--db",
                str(tmp_path / "x.sqlite"),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (extra, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (extra, proc.stderr)


def test_tune_ranks_by_margin_as_the_stored_rows_give(tiny_models, tmp_path):
    """--rank margin --grid: the ranking is the candidates sorted by their paired margin difference
    against the unlooped model (correct choice's log-likelihood minus the best wrong one's), macro-averaged
    over the tasks' search items, recomputed here from the rows in the database (ties: candidate order)."""
    db, out = tmp_path / "m.sqlite", tmp_path / "m.json"
    args = tune_args(tiny_models["llama"][2], db, out)
    args[args.index("--limit") + 1] = "16"
    proc = subprocess.run([*args, "--grid", "--rank", "margin"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["search"]["rank"] == "margin"
    con = sqlite3.connect(db)

    def margins(task: str, plan: str) -> dict[str, float]:
        got = {}
        for item, lls, gold in con.execute("SELECT item, lls, gold FROM results WHERE task=? AND plan=?", (task, plan)):
            values = json.loads(lls)
            got[item] = values[gold] - max(v for k, v in enumerate(values) if k != gold)
        return got

    tasks = ("piqa", "arc_easy")
    search = {t: res["split"]["items"][t]["search"] for t in tasks}
    base = {t: margins(t, "none") for t in tasks}
    cands = list(res["search"]["scores"])  # in the order the candidates were given

    def diff(plan: str) -> float:
        mine = {t: margins(t, plan) for t in tasks}
        return sum(sum(mine[t][i] - base[t][i] for i in search[t]) / len(search[t]) for t in tasks) / len(tasks)

    want = sorted(cands, key=lambda p: (-round(diff(p), 9), cands.index(p)))
    assert res["search"]["ranking"] == want
    assert [res["search"]["scores"][p][0]["margin_diff"] for p in cands] == pytest.approx([diff(p) for p in cands])
    assert len({round(diff(p), 6) for p in cands}) > 3  # the ranking is decided by the margins, not by ties


def test_tune_with_prefix_reuse_stores_the_same_rows_and_verdict(tiny_models, tmp_path):
    """--prefix-cache: the naive and uniform candidates are scored from their block's first layer on, on stored
    states; every row in the store and the verdict are those of the run without it (the noise ones run in full)."""
    model = tiny_models["qwen3"][2]
    runs = {}
    for name, extra in (("full", []), ("reuse", ["--prefix-cache", "64"])):
        db, out = tmp_path / f"{name}.sqlite", tmp_path / f"{name}.json"
        args = tune_args(model, db, out)
        args[args.index("--limit") + 1] = "24"
        args[args.index("--mixes") + 1] = "none,uniform,noise:1"
        proc = subprocess.run([*args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        runs[name] = (rows(db), json.loads(out.read_text()))
        if extra:  # 3 blocks x 2 counts x 3 mixes: naive and uniform from their first layer on, noise in full
            assert "prefix reuse: 12 of 18 plans from their block's first layer on (the others: the noise mix" in (
                proc.stderr
            )
    assert runs["reuse"][0] == runs["full"][0] and len(runs["full"][0]) > 100
    assert runs["reuse"][1]["verdict"] == runs["full"][1]["verdict"]
    assert runs["reuse"][1]["search"]["ranking"] == runs["full"][1]["search"]["ranking"]
