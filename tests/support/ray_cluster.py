"""A Ray cluster on this machine's loopback addresses, for the tests (tests/test_cluster.py) and the
overhead measurement (bench/cluster_overhead.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
