"""Benchmark tasks, scoring, the results store, statistics and the eval/sweep commands."""

from __future__ import annotations

import csv
import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggufloop.cli import main
from ggufloop.eval.evaluate import evaluate
from ggufloop.eval.scoring import Scorer, accuracy
from ggufloop.eval.stats import compare, mcnemar_exact, paired_bootstrap
from ggufloop.eval.store import Store
from ggufloop.eval.tasks import TASKS, Item, resolve_tasks
from ggufloop.eval.units import run_unit

from conftest import open_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.data
@pytest.mark.parametrize(
    "task, n, choices",
    [
        ("winogrande", 1267, 2),
        ("arc_easy", 570, None),
        ("arc_challenge", 299, None),
        ("hellaswag", 10042, 4),
        ("piqa", 1838, 2),
        ("boolq", 3270, 2),
        ("openbookqa", 500, 4),
    ],
)
def test_task_counts(task, n, choices):
    items = TASKS[task].items(limit=None)
    assert len(items) == n and len({it.id for it in items}) == n
    if choices:
        assert all(len(it.requests()) == choices for it in items)
    assert all(0 <= it.gold < len(it.requests()) for it in items)


@pytest.mark.data
def test_mmlu_has_57_subjects_and_1531_questions():
    tasks = resolve_tasks("mmlu")
    assert len(tasks) == 57
    assert sum(len(t.items(shots=0)) for t in tasks) == 1531


@pytest.mark.data
def test_known_items_render_exactly():
    arc = TASKS["arc_easy"].items(shots=0)[0]
    assert arc.requests()[0] == (
        "Question: Which technology was developed most recently?\nAnswer:",
        " cellular telephone",
    )
    assert arc.gold == 0
    wino = TASKS["winogrande"].items(shots=0)[0]
    assert wino.requests() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert wino.gold == 1
    hs = TASKS["hellaswag"].items(shots=0)[0]
    assert hs.requests()[3] == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " starts pulling up roofing on a roof.",
    )
    mmlu = TASKS["mmlu:anatomy"].items(shots=0)[0]
    assert mmlu.requests()[0][0].startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
    )
    assert mmlu.requests()[0][0].endswith("\nD. ") is False and mmlu.requests()[0][0].endswith("Answer:")
    assert [c for _, c in mmlu.requests()] == [" A", " B", " C", " D"]
    boolq = TASKS["boolq"].items(shots=0)[0]
    assert [c for _, c in boolq.requests()] == [" no", " yes"] and boolq.gold == 0


@pytest.mark.data
def test_fewshot_is_deterministic_and_excludes_the_item():
    a = TASKS["winogrande"].items(shots=5, limit=20)
    b = TASKS["winogrande"].items(shots=5, limit=20)
    assert a == b
    for it in a:
        ctx = it.requests()[0][0]
        assert ctx.count("\n\n") == 5
        own = TASKS["winogrande"].items(shots=0, limit=20)[a.index(it)].requests()[0][0]
        assert own not in ctx[: -len(own)]


def _logsoftmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


@pytest.mark.data
def test_scoring_matches_brute_force(tiny_models):
    path = str(tiny_models["llama"][2])
    items = TASKS["arc_easy"].items(shots=1, limit=6) + TASKS["winogrande"].items(shots=1, limit=4)
    scorer = Scorer(path, "2:4x2/uniform", n_ctx=1024, n_batch=256, n_seq=8, kv_type=0)
    fast, naive = scorer.score(items), scorer.score_naive(items)
    prepared = [scorer.prepare(it) for it in items]
    scorer.close()
    # brute force: every full sequence through the high-level API, log-softmax in numpy
    llm = open_model(path, "2:4x2/uniform", n_ctx=1024, n_batch=512)
    for p, f, nv in zip(prepared, fast, naive):
        for c, toks in enumerate(p.tokens):
            llm.reset()
            llm.eval(toks)
            logp = _logsoftmax(np.array(llm.scores[: len(toks)], dtype=np.float64))
            ref = sum(logp[k - 1, toks[k]] for k in range(p.starts[c], len(toks)))
            assert f[c] == pytest.approx(ref, rel=1e-5)
            assert nv[c] == pytest.approx(ref, rel=1e-5)
    llm.close()


def test_accuracy_and_acc_norm():
    item = Item("x", ("Q:",), (" a", " bbbbbbbbbb"), 1)
    assert accuracy(item, [-2.0, -5.0]) == (False, True)  # -2/2 = -1.0 < -5/11
    assert accuracy(item, [-2.0, -30.0]) == (False, False)
    assert accuracy(item, [-9.0, -5.0]) == (True, True)


def test_statistics_on_known_inputs():
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(2, 8) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 1024)
    same = np.array([1, 0, 1, 1, 0] * 20)
    assert paired_bootstrap(same, same) == (0.0, 0.0)
    base = np.zeros(200, dtype=int)
    plan = np.zeros(200, dtype=int)
    plan[:20] = 1  # +10 points, every item paired
    c = compare(base, plan)
    assert c.diff == pytest.approx(0.10) and c.only_plan == 20 and c.only_base == 0
    assert c.ci_low < 0.10 < c.ci_high and c.ci_low > 0.05
    assert c.p_value == pytest.approx(2 / 2**20)


@pytest.mark.data
def test_store_never_scores_twice(tiny_models, tmp_path):
    path = str(tiny_models["qwen3"][2])
    store = Store(tmp_path / "r.sqlite")
    sha = store.model_sha(path)
    scorer = Scorer(path, None, n_ctx=1024, n_batch=256)
    calls = []
    real_score = scorer.score
    scorer.score = lambda items: calls.append(len(items)) or real_score(items)
    first = run_unit(scorer, store, sha, TASKS["piqa"], 0, 10)
    second = run_unit(scorer, store, sha, TASKS["piqa"], 0, 10)
    scorer.close()
    assert first == second and sum(calls) == 10
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 10


@pytest.mark.system
@pytest.mark.data
def test_killed_run_resumes(tiny_models, tmp_path):
    db = tmp_path / "r.sqlite"
    args = [
        sys.executable,
        "-m",
        "ggufloop",
        "eval",
        str(tiny_models["llama"][2]),
        "--tasks",
        "arc_easy",
        "--loop",
        "2:4x3",
        "--limit",
        "64",
        "--db",
        str(db),
        "--json",
        str(tmp_path / "out.json"),
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = 0
    for _ in range(600):
        time.sleep(0.05)
        if db.exists():
            try:
                n = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.Error:
                n = 0
            if n >= 16:
                break
    proc.kill()
    proc.wait()
    assert 16 <= n < 128, "the run should have been killed part way"
    before = sqlite3.connect(db).execute("SELECT plan, item, lls FROM results").fetchall()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = sqlite3.connect(db).execute("SELECT plan, item, lls FROM results").fetchall()
    assert len(after) == 128 and set(before) <= set(after)  # nothing lost, nothing scored twice
    fresh = evaluate(
        tiny_models["llama"][2], resolve_tasks("arc_easy"), "2:4x3", limit=64, db=tmp_path / "fresh.sqlite"
    )
    assert "arc_easy" in done.stdout and f"{fresh[0]['plan']['acc']:.4f}" in done.stdout


@pytest.mark.system
@pytest.mark.data
def test_sweep_writes_heatmap_and_csv(tiny_models, tmp_path, monkeypatch):
    args = [
        "sweep",
        str(tiny_models["gemma3"][2]),
        "--task",
        "piqa",
        "--count",
        "2",
        "--starts",
        "1:3",
        "--sizes",
        "1:3",
        "--limit",
        "6",
        "--jobs",
        "2",
        "--db",
        str(tmp_path / "s.sqlite"),
        "-o",
        str(tmp_path),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(next(tmp_path.glob("sweep-*.csv")))))
    assert {(r["start"], r["end"]) for r in rows} == {("1", "2"), ("1", "3"), ("2", "3"), ("2", "4")}
    assert next(tmp_path.glob("sweep-*.png")).stat().st_size > 1000
    # a cell is the same number eval gives for that plan, scored afresh (its own database, not the sweep's rows)
    one = evaluate(tiny_models["gemma3"][2], resolve_tasks("piqa"), "1:3x2", limit=6, db=tmp_path / "e.sqlite")
    cell = next(r for r in rows if (r["start"], r["end"]) == ("1", "3"))
    assert float(cell["acc"]) == pytest.approx(one[0]["plan"]["acc"], abs=1e-4)
    # run again: everything is scored, so the map is redrawn from the database without starting a worker
    before = next(tmp_path.glob("sweep-*.csv")).read_text()

    def no_worker(*args, **kwargs):
        raise AssertionError("a finished sweep started a worker")

    monkeypatch.setattr("ggufloop.eval.executors.subprocess.Popen", no_worker)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert next(tmp_path.glob("sweep-*.csv")).read_text() == before
