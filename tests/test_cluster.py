"""Units of evaluation on a real Ray cluster: a head and a second node, each its own `ray start` on loopback.

The cluster's results must be the local run's, row for row, even when a worker is killed mid-run,
and a second run must score nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ggufloop.eval.ray_executor import ClusterConfig, ClusterError, RayExecutor, WorkerModel
from ggufloop.eval.store import Store
from ggufloop.eval.units import Request

from ray_cluster import LoopbackCluster

pytest.importorskip("ray")
pytestmark = [pytest.mark.cluster, pytest.mark.data]

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster():
    """Two one-CPU nodes; a short temporary folder (Ray's socket paths must stay under 108 bytes)."""
    tmp = Path(tempfile.mkdtemp(prefix="gl-ray-"))
    nodes = LoopbackCluster(tmp / "ray", (1, 1))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def sweep(model: Path, db: Path, out: Path, *extra: str, limit: int = 20, task: str = "piqa") -> subprocess.Popen:
    args = ["sweep", str(model), "--task", task, "--count", "2", "--starts", "1:3", "--sizes", "1:3"]
    args += ["--limit", str(limit), "--db", str(db), "-o", str(out), *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "ggufloop", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT * FROM results ORDER BY model, task, shots, prompt, plan, item").fetchall()


def test_sweep_on_the_cluster_equals_the_local_run_and_never_scores_twice(cluster, tiny_models, tmp_path):
    model = tiny_models["gemma3"][2]
    finish(sweep(model, tmp_path / "local.sqlite", tmp_path / "local", "--jobs", "1", "--threads", "1"))
    err = finish(sweep(model, tmp_path / "ray.sqlite", tmp_path / "ray", "--cluster", cluster.address))
    assert "cluster: 100 items scored in 10 units on 2 nodes" in err
    expected = rows(tmp_path / "local.sqlite")
    assert len(expected) == 5 * 20 and rows(tmp_path / "ray.sqlite") == expected
    csv = next((tmp_path / "local").glob("*.csv"))
    assert (tmp_path / "ray" / csv.name).read_text() == csv.read_text()
    # a second driver finds everything in the store: it redraws the map without starting the cluster
    err = finish(sweep(model, tmp_path / "ray.sqlite", tmp_path / "ray", "--cluster", cluster.address))
    assert "cluster:" not in err and rows(tmp_path / "ray.sqlite") == expected
    # one plan's rows lost: only they are scored again
    with sqlite3.connect(tmp_path / "ray.sqlite") as con:
        con.execute("DELETE FROM results WHERE plan = '1:3x2'")
    err = finish(sweep(model, tmp_path / "ray.sqlite", tmp_path / "ray", "--cluster", cluster.address))
    assert "cluster: 20 items scored in" in err and rows(tmp_path / "ray.sqlite") == expected


def test_a_worker_killed_mid_run_loses_only_its_unit(cluster, tiny_models, tmp_path):
    model = tiny_models["llama"][2]
    run = sweep(model, tmp_path / "ray.sqlite", tmp_path, "--cluster", cluster.address, limit=96)
    killed = None
    for _ in range(1200):
        busy = cluster.busy_workers()
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert killed is not None, "no worker was seen scoring"
    finish(run)
    finish(sweep(model, tmp_path / "local.sqlite", tmp_path, "--jobs", "1", "--threads", "1", limit=96))
    assert rows(tmp_path / "ray.sqlite") == rows(tmp_path / "local.sqlite")
    assert len(rows(tmp_path / "local.sqlite")) == 5 * 96


def test_a_node_without_the_model_or_with_another_file_is_refused(cluster, tiny_models, tmp_path):
    path = tiny_models["qwen3"][2]
    store = Store(tmp_path / "r.sqlite")
    sha = store.model_sha(path)
    config = ClusterConfig(cluster.address)
    with pytest.raises(ClusterError, match=r"missing\.gguf is not on node .*127\.0\.0\.\d.*must exist on every node"):
        RayExecutor(config, WorkerModel(str(tmp_path / "missing.gguf"), sha, 1), store)
    other = RayExecutor(config, WorkerModel(str(path), "0" * 64, path.stat().st_size), store)
    try:
        with pytest.raises(ClusterError, match="is another file .*nothing was scored"):
            other.run([Request("none", "piqa", 0, 4)])
    finally:
        other.close()
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0


def test_a_missing_ray_is_one_line(monkeypatch):
    from ggufloop.eval import ray_executor as cluster

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ClusterError, match=r"pip install 'ggufloop\[cluster\]'"):
        cluster._import_ray()


@pytest.mark.parametrize("task, shots", [("winogrande", 0), ("arc_easy", 3)])
def test_few_shot_requests_from_a_split_pool_on_the_cluster_equal_the_local_run(
    cluster, tiny_models, tmp_path, task, shots
):
    """B1: the driver keyed a unit without its shot count, so with a search's few-shot pool and --shots whose
    zero-ness differs from the task's default (tune --cluster --shots 0 on WinoGrande, or 3 on ARC-Easy) every
    worker refused the unit ("renders prompts differently"). The rows must be the local run's, bit for bit."""
    from ggufloop.eval.executors import LocalExecutor
    from ggufloop.eval.tasks import TASKS, FewshotPool

    path = tiny_models["llama"][2]
    ids = [it.id for it in TASKS[task].items(0, 12)]
    pool = FewshotPool("split:0:0.5", frozenset(ids[6:]))
    requests = [Request(plan, task, shots, 12, tuple(ids[:6]), pool) for plan in ("none", "1:3x2/uniform")]
    got = {}
    for name in ("local", "ray"):
        store = Store(tmp_path / f"{name}.sqlite")
        sha = store.model_sha(path)
        if name == "local":
            executor = LocalExecutor(path, store, sha, threads=1)
        else:
            executor = RayExecutor(
                ClusterConfig(cluster.address), WorkerModel(str(path), sha, path.stat().st_size), store
            )
        try:
            got[name] = executor.run(requests)
        finally:
            executor.close()
            store.close()
    assert got["ray"] == got["local"] and all(len(r) == 6 for r in got["local"])
    assert rows(tmp_path / "ray.sqlite") == rows(tmp_path / "local.sqlite")


def _requests(kind: str) -> list[Request]:
    """What eval, sweep and tune ask an executor for: the unlooped model and a plan on two tasks (eval), the
    blocks of a window (sweep), and item subsets of a search with shots from a split few-shot pool (tune)."""
    from ggufloop.eval.tasks import TASKS, FewshotPool

    if kind == "eval":
        return [Request(p, t, 0, 8) for p in ("none", "1:3x2/uniform") for t in ("piqa", "winogrande")]
    if kind == "sweep":
        return [Request(p, "piqa", 0, 8) for p in ("none", "1:2x2", "1:3x2", "2:3x2", "2:4x2")]
    ids = [it.id for it in TASKS["arc_easy"].items(0, 12)]
    pool = FewshotPool("split:0:0.5", frozenset(ids[6:]))
    return [Request(p, "arc_easy", 3, 12, tuple(ids[:6]), pool) for p in ("none", "1:3x2", "2:4x3/ema")]


@pytest.mark.parametrize("kind", ["eval", "sweep", "tune"])
def test_every_executor_scores_the_same_rows(cluster, tiny_models, tmp_path, kind):
    """The three executors (this process, worker processes, Ray) on eval's, sweep's and tune's requests: the
    same results and the same rows in the store, bit for bit."""
    from ggufloop.eval.executors import open_executor

    path = tiny_models["llama"][2]
    requests = _requests(kind)
    got = {}
    for name in ("local", "process", "ray"):
        store = Store(tmp_path / f"{name}.sqlite")
        sha = store.model_sha(path)
        config = ClusterConfig(cluster.address) if name == "ray" else None
        executor = open_executor(path, store, sha, 2, config, jobs=2 if name == "process" else 1)
        assert type(executor).__name__ == {"local": "LocalExecutor", "process": "ProcessExecutor"}.get(
            name, "RayExecutor"
        )
        seen = []
        try:
            got[name] = executor.run(requests, seen.append)
        finally:
            executor.close()
            store.close()
        assert sum(seen) == sum(len(r) for r in got[name])
    assert got["process"] == got["local"] == got["ray"]
    assert len(got["local"]) == len(requests) and all(got["local"])
    assert rows(tmp_path / "process.sqlite") == rows(tmp_path / "local.sqlite") == rows(tmp_path / "ray.sqlite")
