"""The overhead of scoring on a Ray cluster (docs/cluster.md): `sweep --jobs` against `sweep --cluster` on a
loopback cluster, and the round trip of an empty Ray task.

    .venv/bin/python bench/cluster_overhead.py smollm2-135m-instruct piqa 32 2 10:12 2:4
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from ggufloop.eval.ray_executor import _import_ray  # noqa: E402

from ray_cluster import LoopbackCluster  # noqa: E402


def _noop() -> None:
    """A Ray task that does nothing: its round trip is the scheduling overhead of a unit."""


def main(argv: list[str]) -> None:
    """python bench/cluster_overhead.py MODEL TASK LIMIT JOBS STARTS SIZES: `sweep --jobs JOBS` against
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
    main(sys.argv[1:])
