"""Where units of evaluation run: in this process, or spread over a Ray cluster, behind one interface.

A unit of work is one (plan, task, item chunk). ``LocalExecutor`` scores units in this process on
one model load, exactly as ``run_unit`` always has. ``RayExecutor`` sends every chunk that the
results store lacks to a Ray cluster as a Ray task reserving as many CPUs as the threads it
scores with; each worker process loads the model once and keeps it across tasks, scores, and
returns the rows. The driver is the only writer of the store: it writes rows as they arrive, so
a stopped run resumes and no item is scored twice, as on one machine. A worker that dies loses
only its chunk, which Ray runs again (``ClusterConfig.max_retries``).

Workers find the model by its packaged name (each node fetches it) or by its path, which must
exist on every node (checked before anything is scored, naming the node that lacks it); every
worker checks its file's sha256 and the prompt format against the driver's before scoring, so a
node with another file or another ggufloop cannot put wrong rows into the store.

Ray is an optional extra (``pip install 'ggufloop[cluster]'``), imported only by ``RayExecutor``.
``python -m ggufloop.eval.cluster`` measures the cluster's overhead against local worker processes
(docs/cluster.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import OptionError, UserError
from ..plan import LoopPlan
from ..rpc import Placement
from .store import Row, Store, Unit
from .tasks import TASKS, FewshotPool
from .units import unit_for

CHUNK_ITEMS = 16
"""Items per unit of work: run_unit's batches, so a chunk's log-likelihoods equal a local run's."""

Rows = dict[str, tuple[int, int]]
Progress = Callable[[int], None]


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
class Request:
    """Items of one (plan, task) to have scored: the task's first ``limit`` items (``ids``: only
    those, in that order), with ``shots`` few-shot examples drawn from ``pool`` (see Task.items)."""

    plan: str
    task: str
    shots: int | None = None
    limit: int | None = None
    ids: tuple[str, ...] | None = None
    pool: FewshotPool | None = None


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
    ) -> None:
        from .scoring import Scorer

        self.store, self.model_sha = store, model_sha
        self.scorer = Scorer(str(model), None, threads=threads, placement=placement)

    def run(self, requests: Sequence[Request], progress: Progress | None = None) -> list[Rows]:
        from .evaluate import run_unit

        out = []
        for r in requests:
            if LoopPlan.parse(r.plan) != self.scorer.plan:
                self.scorer.set_plan(r.plan)
            ids = list(r.ids) if r.ids is not None else None
            out.append(
                run_unit(
                    self.scorer,
                    self.store,
                    self.model_sha,
                    TASKS[r.task],
                    r.shots,
                    r.limit,
                    progress,
                    ids=ids,
                    pool=r.pool,
                )
            )
        return out

    def close(self) -> None:
        self.scorer.close()


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
    from .scoring import Scorer, accuracy

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
    by_id = {it.id: it for it in task.items(unit.shots, request.limit, pool=request.pool)}
    chunk = [by_id[i] for i in ids]
    lls = loaded.scorer.score(chunk)
    return [Row(it.id, ll, it.gold, *accuracy(it, ll)) for it, ll in zip(chunk, lls)]


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


def open_executor(
    model: str | Path,
    store: Store,
    model_sha: str,
    threads: int | None,
    cluster: ClusterConfig | None,
    placement: Placement | None = None,
) -> Executor:
    """The executor that --cluster asks for: Ray's when given, else this process (with the model's
    layers where ``placement`` puts them)."""
    if cluster is None:
        return LocalExecutor(model, store, model_sha, threads, placement)
    if placement is not None:
        raise OptionError("--rpc and --cluster do not go together: a cluster's workers load the model locally")
    return RayExecutor(cluster, worker_model(Path(model), model_sha), store)


# --- a cluster on this machine: the tests and the overhead measurement (docs/cluster.md) --------------


LOOPBACK_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class LoopbackCluster:
    """Ray nodes on loopback, each its own ``ray start`` (the first the head) with ``cpus[i]`` CPUs,
    under temp_dir; stop() ends exactly the processes of this cluster, never another's.

    Node k advertises 127.0.0.(k + 2): Ray swaps 127.0.0.1 itself for the machine's network address."""

    temp_dir: Path
    cpus: tuple[int, ...] = (1,)
    address: str = ""

    def start(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.2:{port}"
        for k, n in enumerate(self.cpus):
            head = ["--head", "--port", str(port), "--include-dashboard=false"]
            where = head if k == 0 else ["--address", self.address]
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "start",
                    *where,
                    "--node-ip-address",
                    f"127.0.0.{k + 2}",
                    "--num-cpus",
                    str(n),
                    "--temp-dir",
                    str(self.temp_dir),
                    "--disable-usage-stats",
                ],
                check=True,
                capture_output=True,
                env=LOOPBACK_ENV,
            )
        return self.address

    def _pids(self) -> dict[int, tuple[int, str]]:
        """pid -> (parent pid, command line) of every process."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out[int(entry.name)] = (ppid, cmd)
        return out

    def processes(self) -> dict[int, str]:
        """pid -> command line of this cluster's processes: those naming temp_dir, and their children."""
        procs = self._pids()
        ours = {pid for pid, (_, cmd) in procs.items() if str(self.temp_dir) in cmd and pid != os.getpid()}
        ours |= {pid for pid, (ppid, _) in procs.items() if ppid in ours}
        return {pid: procs[pid][1] for pid in ours}

    def busy_workers(self) -> list[int]:
        """PIDs of this cluster's worker processes that are scoring a chunk now."""
        return [pid for pid, cmd in self.processes().items() if cmd.startswith("ray::score_chunk")]

    def stop(self) -> None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1)


def _noop() -> None:
    """A Ray task that does nothing: its round trip is the scheduling overhead of a unit."""


def _bench(argv: list[str]) -> None:
    """python -m ggufloop.eval.cluster MODEL TASK LIMIT JOBS STARTS SIZES: `sweep --jobs JOBS` against
    `sweep --cluster` on a loopback Ray cluster of JOBS one-CPU nodes, each in a fresh database (wall
    times), then the round trip of an empty one-CPU Ray task, one at a time and JOBS at a time."""
    import tempfile

    model, task, limit, jobs, starts, sizes = argv
    common = ["sweep", model, "--task", task, "--limit", limit, "--starts", starts, "--sizes", sizes, "--count", "2"]
    with tempfile.TemporaryDirectory(prefix="ggufloop-ray-") as tmp:
        cluster = LoopbackCluster(Path(tmp) / "ray", (1,) * int(jobs))
        address = cluster.start()
        try:
            for label, extra in (
                ("local --jobs", ["--jobs", jobs, "--threads", jobs]),
                ("ray --cluster", ["--cluster", address, "--threads", "1"]),
            ):
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "ggufloop", *common, *extra, "--db", f"{tmp}/{label[:3]}.sqlite", "-o", tmp],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                last = [ln for ln in done.stderr.splitlines() if ln.startswith("cluster:")]
                print(f"{label}: {time.perf_counter() - t0:.1f} s {' '.join(last)}")
            ray = _import_ray()
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            noop = ray.remote(_noop).options(num_cpus=1)
            ray.get([noop.remote() for _ in range(int(jobs))])  # workers started
            t0 = time.perf_counter()
            for _ in range(100):
                ray.get(noop.remote())
            one = (time.perf_counter() - t0) / 100
            t0 = time.perf_counter()
            ray.get([noop.remote() for _ in range(400)])
            many = (time.perf_counter() - t0) / 400
            print(f"empty unit: {one * 1e3:.2f} ms round trip; {many * 1e3:.2f} ms each of 400 at once")
            ray.shutdown()
        finally:
            cluster.stop()


if __name__ == "__main__":
    _bench(sys.argv[1:])
