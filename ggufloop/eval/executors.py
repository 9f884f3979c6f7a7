"""Where units of evaluation run, behind one interface: ``Executor.run(requests, progress)``.

- ``LocalExecutor``: this process, one model load whose plan is switched as needed.
- ``ProcessExecutor``: ``jobs`` worker processes on this machine (``sweep --jobs``), each with its own
  model load, writing its share of the requests to the results store itself; this process follows the
  store for progress. A worker is ``python -m ggufloop.eval.executors SPEC``, a ``LocalExecutor``.
- ``RayExecutor`` (``ray_executor``): chunks of items as Ray tasks on a cluster (``--cluster``).

All three key units with ``units.unit_for`` and score with ``units.score_rows``, CHUNK_ITEMS items per
call, so their rows are the same, bit for bit; all three skip what the store has, so a stopped run
resumes and nothing is scored twice. ``open_executor`` picks one from the options.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from ..errors import OptionError, TaskError
from ..plan import LoopPlan
from ..rpc import Placement
from .prefix import PrefixConfig
from .ray_executor import ClusterConfig, RayExecutor, worker_model
from .store import Store
from .tasks import TASKS, FewshotPool
from .units import Progress, Request, Rows, request_items, run_unit, unit_for


class Executor(Protocol):
    def run(self, requests: Sequence[Request], progress: Progress | None = None) -> list[Rows]:
        """Score every request's items the store lacks; per request, item -> (correct, correct_norm).

        progress(n) is called as items are scored or found in the store."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Units in this process, on one model load whose plan is switched as needed."""

    def __init__(
        self,
        model: str | Path,
        store: Store,
        model_sha: str,
        threads: int | None = None,
        placement: Placement | None = None,
        prefix: PrefixConfig | None = None,
    ) -> None:
        from .scoring import Scorer

        self.store, self.model_sha = store, model_sha
        self.scorer = Scorer(str(model), None, threads=threads, placement=placement, prefix=prefix)

    def run(self, requests: Sequence[Request], progress: Progress | None = None) -> list[Rows]:
        out = []
        for r in requests:
            if LoopPlan.parse(r.plan) != self.scorer.plan:
                self.scorer.set_plan(r.plan)
            ids = list(r.ids) if r.ids is not None else None
            task = TASKS[r.task]
            out.append(run_unit(self.scorer, self.store, self.model_sha, task, r.shots, r.limit, progress, ids, r.pool))
        return out

    def close(self) -> None:
        self.scorer.close()


def _request_json(r: Request) -> dict:
    d = asdict(r)
    d["pool"] = None if r.pool is None else {"name": r.pool.name, "ids": sorted(r.pool.ids)}
    return d


def _request_from_json(d: dict) -> Request:
    pool = d["pool"]
    return Request(
        d["plan"],
        d["task"],
        d["shots"],
        d["limit"],
        None if d["ids"] is None else tuple(d["ids"]),
        None if pool is None else FewshotPool(pool["name"], frozenset(pool["ids"])),
    )


class ProcessExecutor:
    """Requests in ``jobs`` worker processes on this machine, each with its own model load and ``threads //
    jobs`` threads; request i goes to worker i % jobs. The workers write the store; this process follows it
    for progress (counting only the requested items) and stops the workers when it is stopped."""

    def __init__(
        self,
        model: str | Path,
        store: Store,
        model_sha: str,
        threads: int | None,
        jobs: int,
        prefix: PrefixConfig | None = None,
    ) -> None:
        self.model, self.store, self.model_sha, self.jobs = str(model), store, model_sha, jobs
        # the bound is for the machine
        self.prefix = None if prefix is None else PrefixConfig(prefix.bound // jobs, prefix.starts)
        self.threads = max(1, (threads or os.cpu_count() or 1) // jobs)

    def run(self, requests: Sequence[Request], progress: Progress | None = None) -> list[Rows]:
        asked = []
        for r in requests:
            task = TASKS[r.task]
            unit = unit_for(self.model_sha, task, r.shots, r.plan, r.pool)
            asked.append((unit, [it.id for it in request_items(task, unit, r)]))
        todo = [r for r, (unit, ids) in zip(requests, asked) if not set(ids) <= self.store.done(unit)]
        if todo:
            self._spawn(todo, asked, progress)
        elif progress:
            progress(sum(len(ids) for _, ids in asked))
        out = []
        for unit, ids in asked:
            rows = self.store.rows(unit)
            out.append({i: rows[i] for i in ids})
        return out

    def _spawn(self, todo: list[Request], asked: list, progress: Progress | None) -> None:
        jobs = min(self.jobs, len(todo))
        specs = [
            {
                "model": self.model,
                "db": str(self.store.path),
                "threads": self.threads,
                "prefix": None if self.prefix is None else asdict(self.prefix),
                "parent": os.getpid(),
                "requests": [_request_json(r) for r in todo[j::jobs]],
            }
            for j in range(jobs)
        ]
        cmd = [sys.executable, "-m", "ggufloop.eval.executors"]
        workers = [subprocess.Popen([*cmd, json.dumps(spec)]) for spec in specs]
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the workers are stopped below
        try:
            last = 0
            while True:
                running = any(w.poll() is None for w in workers)
                now = sum(len(self.store.done(unit) & set(ids)) for unit, ids in asked)
                if progress:
                    progress(now - last)
                last = now
                if not running:
                    break
                time.sleep(2)
        finally:
            signal.signal(signal.SIGTERM, previous)
            for w in workers:
                if w.poll() is None:
                    w.terminate()
            for w in workers:
                w.wait()
        if any(w.returncode for w in workers):
            raise TaskError("a worker process failed; run the same command again to resume")

    def close(self) -> None:
        pass


def open_executor(
    model: str | Path,
    store: Store,
    model_sha: str,
    threads: int | None,
    cluster: ClusterConfig | None = None,
    placement: Placement | None = None,
    jobs: int = 1,
    prefix: PrefixConfig | None = None,
) -> Executor:
    """The executor the options ask for: Ray's with ``cluster``, ``jobs`` worker processes, else this process
    (with the model's layers where ``placement`` puts them). ``prefix``: prefix reuse's settings, on this
    machine (``eval.prefix``; None: off)."""
    if prefix is not None and (cluster is not None or placement is not None):
        raise OptionError("--prefix-cache keeps states on this machine: it does not go with --cluster or --rpc")
    if cluster is not None:
        if placement is not None:
            raise OptionError("--rpc and --cluster do not go together: a cluster's workers load the model locally")
        return RayExecutor(cluster, worker_model(Path(model), model_sha), store)
    if jobs > 1:
        return ProcessExecutor(model, store, model_sha, threads, jobs, prefix)
    return LocalExecutor(model, store, model_sha, threads, placement, prefix)


def _exit_with_parent(parent: int) -> None:
    """End this worker when the process that started it is gone (killed, interrupted), not hours later."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> None:
    """A ProcessExecutor's worker: score the requests of the JSON spec in argv[0] into its store."""
    from .._lib import quiet_logs

    spec = json.loads(argv[0])
    _exit_with_parent(spec["parent"])
    quiet_logs()
    store = Store(spec["db"])
    sha = store.model_sha(spec["model"])
    prefix = None if spec["prefix"] is None else PrefixConfig(spec["prefix"]["bound"], tuple(spec["prefix"]["starts"]))
    executor = LocalExecutor(spec["model"], store, sha, spec["threads"], prefix=prefix)
    try:
        executor.run([_request_from_json(r) for r in spec["requests"]])
    finally:
        executor.close()
        store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
