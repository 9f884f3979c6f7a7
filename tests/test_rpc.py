"""A model split over llama.cpp RPC servers on loopback (ggufloop.rpc, `--rpc`, `ggufloop rpc-server`).

Two rpc-server processes, started through `ggufloop rpc-server` on free loopback ports, take the
last layers of a tiny F32 model; the local CPU keeps the first. A looped block that crosses both
device boundaries must give the all-local logits, its KV cache must sit with each physical
layer's device (read from llama.cpp's own load log), and a server killed mid-generation must end
the run with one `error:` line, not a hang or SIGABRT.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggufloop import rpc
from ggufloop.cli import main
from ggufloop.errors import OptionError, RpcError

from conftest import PROMPT, eval_logits, open_model
from ports import free_port

pytestmark = pytest.mark.rpc

ROOT = Path(__file__).resolve().parent.parent

# tiny llama (6 layers) with n_gpu_layers 4 and an even split: layers 0-2 stay on the CPU,
# 3-4 go to the first server, 5 and the output layer to the second
NGL, SPLIT = 4, [1.0, 1.0]
DEVICE_OF_LAYER = ["CPU", "CPU", "CPU", "server 0", "server 0", "server 1"]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_server(log: Path) -> Server:
    """`ggufloop rpc-server` on a free loopback port, ready when it answers the protocol's HELLO."""
    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ggufloop", "rpc-server", "--port", str(port), "--threads", "1"],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    server = Server(proc, port, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2)
            return server
        except RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"rpc-server did not start: {log.read_text()}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def servers(tmp_path: Path, n: int = 2) -> Iterator[list[Server]]:
    started = []
    try:
        for i in range(n):
            started.append(start_server(tmp_path / f"rpc-{i}.log"))
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory) -> Iterator[list[Server]]:
    with servers(tmp_path_factory.mktemp("rpc")) as pair:
        yield pair


@contextlib.contextmanager
def llama_log() -> Iterator[list[str]]:
    """llama.cpp's log lines while the block runs (quiet again afterwards)."""
    import llama_cpp

    from ggufloop import _lib

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, None)
    try:
        yield lines
    finally:
        _lib.quiet_logs()


def buffer_sizes(log: list[str], kind: str, endpoints: list[str]) -> dict[str, float]:
    """MiB per device of llama.cpp's "<buffer> <kind> buffer size = X MiB" lines: "CPU", or "server i"
    (an RPC buffer is named after the device's index on its server and the server's address)."""
    out: dict[str, float] = {}
    for line in "".join(log).splitlines():
        m = re.search(rf"(\S+) {kind} buffer size =\s*([\d.]+) MiB", line)
        if m:
            name = m.group(1)
            where = next((f"server {i}" for i, e in enumerate(endpoints) if f"[{e}]" in name), name)
            where = "CPU" if where.startswith("CPU") else where
            out[where] = out.get(where, 0.0) + float(m.group(2))
    return out


def kv_devices(log: list[str]) -> list[str]:
    """The device of every virtual layer's KV cache, from llama.cpp's "layer N: dev = X" lines."""
    return [m.group(1) for m in re.finditer(r"layer +\d+: dev = (\S+)", "".join(log))]


# -- the option's parsing, without servers ------------------------------------------------------


def test_endpoints_and_shares_are_parsed_and_checked():
    assert rpc.parse_servers("10.0.0.2:50052, 10.0.0.3:50053") == (
        rpc.Endpoint("10.0.0.2", 50052),
        rpc.Endpoint("10.0.0.3", 50053),
    )
    for bad in ("", "host", "host:", ":50052", "host:0", "host:70000", "host:port", "[::1]:50052", "a:1,a:1"):
        with pytest.raises(OptionError):
            rpc.parse_servers(bad)
    assert rpc.parse_tensor_split("3,1") == (3.0, 1.0)
    for bad in ("", "a,b", "-1,2", "0,0", "inf,1", "nan"):
        with pytest.raises(OptionError):
            rpc.parse_tensor_split(bad)
    assert rpc.Placement.from_options(None, None, None).n_gpu_layers == 0
    assert rpc.Placement.from_options("h:1", None, None).n_gpu_layers == -1  # with servers: all layers off the CPU
    assert rpc.Placement.from_options("h:1", "1,2", 5).llama_kwargs() == {
        "n_gpu_layers": 5,
        "rpc": "h:1",
        "tensor_split": [1.0, 2.0],
    }


def test_probe_refuses_what_is_not_a_server():
    """A closed port, a port that never answers and a port that answers something else are one-line
    errors, before llama.cpp's client (which would abort the process) gets to them."""
    port = free_port()
    with pytest.raises(RpcError, match="cannot reach the RPC server"):
        rpc.probe(rpc.Endpoint("127.0.0.1", port))

    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(RpcError, match="did not answer within"):
            rpc.probe(rpc.Endpoint("127.0.0.1", silent.getsockname()[1]), timeout=0.5)

    with socket.socket() as other:  # answers like something else
        other.bind(("127.0.0.1", 0))
        other.listen()

        def answer() -> None:
            conn, _ = other.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(RpcError, match="not an rpc-server"):
            rpc.probe(rpc.Endpoint("127.0.0.1", other.getsockname()[1]), timeout=5)


def test_a_dying_server_that_still_accepts_for_a_moment_is_named():
    """A killed server's process closes the client's connection before its listening socket, so the
    client's abort can find it still accepting (CI named "one of" the servers for this reason). The
    lost server must be named once its listener goes too; a live one never is."""
    dying, alive = socket.socket(), socket.socket()
    for s in (dying, alive):
        s.bind(("127.0.0.1", 0))
        s.listen()
    names = [f"127.0.0.1:{s.getsockname()[1]}" for s in (dying, alive)]
    threading.Timer(0.3, dying.close).start()
    try:
        assert rpc.lost_servers(names) == names[:1]
        assert rpc.lost_servers(names[1:], settle=0.2) == []  # none can be named: the caller says "one of"
    finally:
        dying.close()
        alive.close()


def test_generate_with_a_stopped_server_is_one_error_line(tiny_models):
    port = free_port()
    res = CliRunner().invoke(
        main, ["generate", str(tiny_models["llama"][2]), "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}"]
    )
    assert res.exit_code == 1
    assert f"error: cannot reach the RPC server 127.0.0.1:{port}" in res.output


# -- with two servers ---------------------------------------------------------------------------


def test_rpc_server_command_warns(two_servers):
    for server in two_servers:
        text = server.log.read_text()
        assert "no authentication" in text and "Never expose it to an open network" in text
        assert f"127.0.0.1:{server.port}" in text  # the server's own banner: bound to loopback


@pytest.mark.parametrize("plan", ["2:6x3/uniform", "1:5x2", "2:6x2/autoalign:0.5"])
def test_split_logits_equal_local(tiny_models, two_servers, plan):
    """A block that crosses the CPU | server 1 | server 2 boundaries gives the all-local logits, and
    every virtual layer's KV cache sits with its physical layer's device."""
    path = tiny_models["llama"][2]
    local = open_model(path, loop=plan)
    try:
        want = eval_logits(local, PROMPT)
        schedule = local.schedule
    finally:
        local.close()
    endpoints = ",".join(s.endpoint for s in two_servers)
    with llama_log() as log:
        split = open_model(path, loop=plan, rpc=endpoints, n_gpu_layers=NGL, tensor_split=SPLIT)
    try:
        assert [d.endpoint for d in split.devices] == [s.endpoint for s in two_servers]
        if sys.platform.startswith("linux"):  # a vanished server machine is found by TCP, not waited for
            watched = [
                (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                )
                for sock in rpc._peer_sockets([rpc.Endpoint.parse(s.endpoint) for s in two_servers])
            ]
            assert watched == [(1, rpc.USER_TIMEOUT_MS)] * 2, watched
        got = eval_logits(split, PROMPT)
        stepwise = eval_logits(split, PROMPT, step=3)  # incremental decoding: the remote KV caches grow
    finally:
        split.close()
    assert np.array_equal(got, want), f"max |diff| {np.max(np.abs(got - want)):.3g}"
    assert np.allclose(stepwise, want, rtol=0, atol=1e-4 * np.max(np.abs(want)))

    endpoints = [s.endpoint for s in two_servers]
    server_of = {d.name: f"server {endpoints.index(d.endpoint)}" for d in split.devices}  # RPCn: numbered per process
    assert [server_of.get(dev, dev) for dev in kv_devices(log)] == [DEVICE_OF_LAYER[il] for il in schedule]
    weights = buffer_sizes(log, "model", endpoints)
    assert weights.get("server 0", 0) > 0 and weights.get("server 1", 0) > 0, weights
    kv = buffer_sizes(log, "KV", endpoints)
    per_device = {dev: sum(DEVICE_OF_LAYER[il] == dev for il in schedule) for dev in ("CPU", "server 0", "server 1")}
    unit = sum(kv.values()) / len(schedule)  # MiB per virtual layer
    for dev, n in per_device.items():
        assert kv.get(dev, 0) == pytest.approx(n * unit, abs=0.01), (kv, per_device)  # the log rounds to 0.01 MiB
    for server in two_servers:
        assert "Accepted client connection" in server.log.read_text()


def test_benchmark_scoring_split_equals_local(tiny_models, two_servers):
    """eval's scorer (a side context with several sequences sharing their items' contexts by
    sequence copies) gives the same log-likelihoods when the model is split."""
    from ggufloop.eval.scoring import Scorer
    from ggufloop.eval.tasks import Item

    items = [Item(f"q{i}", (f"Question {i}: is it so?",), (" yes", " no", " perhaps not"), 0) for i in range(5)]
    path = str(tiny_models["llama"][2])
    scores = {}
    for name, placement in (
        ("local", None),
        ("split", rpc.Placement(tuple(s.endpoint for s in two_servers), NGL, tuple(SPLIT))),
    ):
        scorer = Scorer(path, "2:6x3/uniform", n_ctx=512, n_batch=128, n_seq=8, kv_type=0, placement=placement)
        try:
            scores[name] = scorer.score(items)
        finally:
            scorer.close()
    assert np.allclose(scores["split"], scores["local"], rtol=1e-6, atol=0)


def test_serve_with_a_stopped_server_is_one_error_line(tiny_models):
    port = free_port()
    res = CliRunner().invoke(main, ["serve", str(tiny_models["llama"][2]), "-c", "256", "--rpc", f"127.0.0.1:{port}"])
    assert res.exit_code == 1
    assert f"error: cannot reach the RPC server 127.0.0.1:{port}" in res.output


def test_plan_switch_on_a_split_model(tiny_models, two_servers):
    """set_loop on a split model (a new context: KV caches and compute buffers on the servers
    again) gives the new plan's all-local logits; n_gpu_layers defaults to all with rpc."""
    path = tiny_models["llama"][2]
    want = {plan: None for plan in ("1:5x2/ema:0.3", "0:6,2:5")}
    for plan in want:
        local = open_model(path, loop=plan)
        try:
            want[plan] = eval_logits(local, PROMPT)
        finally:
            local.close()
    split = open_model(path, loop="2:6x3/uniform", rpc=",".join(s.endpoint for s in two_servers))
    try:
        assert split.model_params.n_gpu_layers > split.n_layer_phys  # every layer and the output on the servers
        for plan, logits in want.items():
            split.set_loop(plan)
            assert np.array_equal(eval_logits(split, PROMPT), logits), plan
    finally:
        split.close()


def test_tensor_split_needs_one_share_per_device(tiny_models, two_servers):
    endpoints = ",".join(s.endpoint for s in two_servers)
    with pytest.raises(OptionError, match="3 values for 2 devices"):
        open_model(tiny_models["llama"][2], rpc=endpoints, n_gpu_layers=NGL, tensor_split=[1, 1, 1])


CHILD = """
import os, signal, sys
from ggufloop import LoopedLlama
path, endpoints, victim = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = LoopedLlama(path, loop="2:6x3/uniform", rpc=endpoints, n_gpu_layers=-1, n_ctx=256, n_threads=1)
for i, token in enumerate(llm.generate([1, 17, 5, 42], temp=0.0)):
    print("token", i, flush=True)
    if i == 3:
        os.kill(victim, signal.SIGKILL)
    if i == 60:
        break
print("finished", flush=True)
"""


def test_server_killed_mid_generation_is_one_error_line(tiny_models, tmp_path):
    """llama.cpp's RPC client aborts the process when a server stops answering; the run ends with
    one `error:` line naming that server and exit status 1, within seconds."""
    with servers(tmp_path) as pair:
        victim = pair[1]
        endpoints = ",".join(s.endpoint for s in pair)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(tiny_models["llama"][2]), endpoints, str(victim.proc.pid)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.monotonic() - t0
    assert "token 3" in proc.stdout and "finished" not in proc.stdout
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"lost the RPC server {victim.endpoint} " in errors[0], proc.stderr
    assert proc.returncode != -signal.SIGABRT and seconds < 60
