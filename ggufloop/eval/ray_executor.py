"""Units of evaluation on a Ray cluster: ``RayExecutor``, one of ``executors``' three executors.

``RayExecutor`` sends every chunk of items that the results store lacks to a Ray cluster as a Ray
task reserving as many CPUs as the threads it scores with; each worker process loads the model
once and keeps it across tasks, scores (``units.score_rows``, the local run's chunks) and returns
the rows. The driver is the only writer of the store: it writes rows as they arrive, so a stopped
run resumes and no item is scored twice, as on one machine. A worker that dies loses only its
chunk, which Ray runs again (``ClusterConfig.max_retries``).

Workers find the model by its packaged name (each node fetches it) or by its path, which must
exist on every node (checked before anything is scored, naming the node that lacks it); every
worker checks its file's sha256 and the prompt format against the driver's before scoring, so a
node with another file or another ggufloop cannot put wrong rows into the store.

Ray is an optional extra (``pip install 'ggufloop[cluster]'``), imported only when a
``RayExecutor`` starts. bench/cluster_overhead.py measures the cluster's overhead against local
worker processes (docs/cluster.md).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..plan import LoopPlan
from .store import Row, Store, Unit
from .tasks import TASKS
from .units import CHUNK_ITEMS, Progress, Request, Rows, request_items, score_rows, unit_for


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot be used (extra missing, unreachable, a node lacks the model) or a unit failed."""


@dataclass(frozen=True)
class ClusterConfig:
    """A Ray cluster to score on: its address (``auto``: the cluster this machine has joined), the
    threads (Ray CPUs) of every unit, and how often a unit whose worker died is run again."""

    address: str
    threads: int = 1
    max_retries: int = 3


@dataclass(frozen=True)
class WorkerModel:
    """The model as a worker finds it: a packaged name (fetched on the node) or a path; its sha256."""

    name: str
    sha256: str
    size: int


def worker_model(path: Path, sha256: str) -> WorkerModel:
    """The packaged name of the model at path if it is one (every node fetches it), else its absolute path."""
    from ..models import CATALOG

    path = path.resolve()
    name = next((n for n, m in CATALOG.items() if Path(m.path).resolve() == path), str(path))
    return WorkerModel(name, sha256, path.stat().st_size)


@dataclass
class _Loaded:
    model: str
    threads: int
    sha256: str
    scorer: Any  # a Scorer


_loaded: list[_Loaded] = []  # a worker process's model load, kept across Ray tasks


def _node() -> str:
    return f"{socket.gethostname()} ({_node_ip()})"


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def probe_model(model: WorkerModel) -> str | None:
    """On a node: why it cannot load model (a one-line reason), or None when it can."""
    from ..models import CATALOG

    if model.name in CATALOG:
        return None  # fetched on first use, and checked like any other file
    path = Path(model.name)
    if not path.is_file():
        return f"{path} is not on node {_node()}: a model given by path must exist on every node"
    if path.stat().st_size != model.size:
        return f"{path} on node {_node()} is another file ({path.stat().st_size} bytes, not {model.size})"
    return None


def score_chunk(model: WorkerModel, threads: int, unit: Unit, request: Request, ids: list[str]) -> list[Row]:
    """On a worker: score the items ids of unit, on this process's model load (made once, then kept).

    Refuses, naming the node, a model file or a prompt format that differs from the driver's."""
    from .._lib import quiet_logs
    from ..models import resolve, sha256_file
    from .scoring import Scorer

    if not _loaded or (_loaded[0].model, _loaded[0].threads) != (model.name, threads):
        while _loaded:
            _loaded.pop().scorer.close()
        quiet_logs()
        path = resolve(model.name)
        if not path.is_file():
            raise ClusterError(f"{path} is not on node {_node()}")
        _loaded.append(_Loaded(model.name, threads, sha256_file(path), Scorer(str(path), None, threads=threads)))
    loaded = _loaded[0]
    if loaded.sha256 != unit.model:
        raise ClusterError(
            f"{model.name} on node {_node()} is another file (sha256 {loaded.sha256[:12]}, the driver's "
            f"{unit.model[:12]}): nothing was scored"
        )
    task = TASKS[unit.task]
    if unit_for(unit.model, task, unit.shots, unit.plan, request.pool) != unit:
        raise ClusterError(f"node {_node()} renders {unit.task}'s prompts differently: install the same ggufloop")
    if LoopPlan.parse(unit.plan) != loaded.scorer.plan:
        loaded.scorer.set_plan(unit.plan)
    chunk = Request(unit.plan, unit.task, unit.shots, request.limit, tuple(ids), request.pool)
    return score_rows(loaded.scorer, request_items(task, unit, chunk))


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ClusterError("--cluster needs Ray: pip install 'ggufloop[cluster]'") from None
    return ray


@dataclass
class RayExecutor:
    """Units as Ray tasks on a cluster; this process (the driver) writes every row to the store."""

    config: ClusterConfig
    model: WorkerModel
    store: Store
    scored: int = 0  # items scored on the cluster by this executor
    units: int = 0  # Ray tasks that returned
    _claimed: set[tuple[tuple, str]] = field(default_factory=set)  # (unit key, item) of this run

    def __post_init__(self) -> None:
        ray = self._ray = _import_ray()
        _check_reachable(self.config.address)
        try:
            ray.init(address=self.config.address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ClusterError(f"cannot reach the Ray cluster at {self.config.address}: {err}") from None
        self.nodes = [n for n in ray.nodes() if n["Alive"]]
        self._score = ray.remote(score_chunk).options(
            num_cpus=self.config.threads, max_retries=self.config.max_retries, retry_exceptions=False
        )
        try:
            self._check_nodes()
        except BaseException:
            ray.shutdown()
            raise

    def _check_nodes(self) -> None:
        """Every node can load the model: its packaged name, or its path there."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not any(n["Resources"].get("CPU", 0) >= self.config.threads for n in self.nodes):
            raise ClusterError(f"no node of the Ray cluster has the {self.config.threads} CPUs a unit needs")
        probe = self._ray.remote(probe_model)
        refs = {
            n["NodeManagerAddress"]: probe.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(self.model)
            for n in self.nodes
        }
        for address, ref in refs.items():
            try:
                reason = self._ray.get(ref)
            except self._ray.exceptions.RayError as err:
                raise ClusterError(f"node {address} cannot run ggufloop: {_first_line(err)}") from None
            if reason:
                raise ClusterError(reason)

    def run(self, requests: Sequence[Request], progress: Progress | None = None) -> list[Rows]:
        """Every request's missing chunks at once; rows written as they arrive. Each item of the run
        reaches progress once, even when several requests ask for it."""
        ray = self._ray
        pending: dict[Any, Unit] = {}
        asked: list[tuple[Unit, list[str]]] = []
        try:
            for r in requests:
                task = TASKS[r.task]
                unit = unit_for(self.model.sha256, task, r.shots, r.plan, r.pool)
                shots = unit.shots
                ids = list(r.ids) if r.ids is not None else [it.id for it in task.items(shots, r.limit, pool=r.pool)]
                asked.append((unit, ids))
                new = [i for i in dict.fromkeys(ids) if (unit.key(), i) not in self._claimed]
                self._claimed.update((unit.key(), i) for i in new)
                done = self.store.done(unit)
                todo = [i for i in new if i not in done]
                if progress and len(new) > len(todo):
                    progress(len(new) - len(todo))
                request = Request(r.plan, r.task, shots, r.limit, None, r.pool)
                for k in range(0, len(todo), CHUNK_ITEMS):
                    chunk = todo[k : k + CHUNK_ITEMS]
                    pending[self._score.remote(self.model, self.config.threads, unit, request, chunk)] = unit
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(ready[0])
                rows = self._result(ready[0], unit)
                self.store.add(unit, rows)
                self.scored, self.units = self.scored + len(rows), self.units + 1
                if progress:
                    progress(len(rows))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        out = []
        for unit, ids in asked:
            rows = self.store.rows(unit)
            out.append({i: rows[i] for i in ids})
        return out

    def _result(self, ref: Any, unit: Unit) -> list[Row]:
        try:
            return self._ray.get(ref)
        except UserError as err:  # a worker's refusal, as the driver would have said it
            raise ClusterError(str(getattr(err, "cause", err))) from None
        except self._ray.exceptions.RayError as err:
            raise ClusterError(
                f"a unit of plan {unit.plan} on {unit.task} failed {self.config.max_retries + 1} times "
                f"({_first_line(err)}); run the same command again to resume"
            ) from None

    def summary(self) -> str:
        return f"cluster: {self.scored} items scored in {self.units} units on {len(self.nodes)} nodes"

    def close(self) -> None:
        self._ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when a HOST:PORT address does not answer."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # auto, ray://..., or what Ray itself will judge
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(err).__name__
