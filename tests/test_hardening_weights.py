"""Round 2 of the adversarial pass (issue 23), weight tables, trace, RPC addresses and bake: hostile input
is one `error:` line in bounded memory and time, and never ends a chat session.

Every case runs the real command line in a child process; the weight-file cases run it under an address
space limit (``RLIMIT_AS``), so a table read before its shape is checked fails the test instead of the
machine."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy

from ggufloop import LoopPlan, PlanError

from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 2 * 2**30  # address space of a child: far below what reading any of the hostile tables takes


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def ggufloop(
    *args: str, stdin: str = "", timeout: int = 120, memory_limit: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ggufloop", *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        preexec_fn=limit_memory if memory_limit else None,
    )
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    return proc


def one_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def npy_header_only(path: Path, shape: tuple[int, ...], data: bytes = bytes(64), size: int | None = None) -> Path:
    """A .npy file whose header declares shape (float64) but that holds only data; size: make the file
    that long instead, sparse (zeros that take no disk)."""
    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
        f.write(data)
        if size is not None:
            f.truncate(size)
    return path


def generate_with_table(tiny_models, table: str, loop: str = "1:4x3") -> subprocess.CompletedProcess:
    model = str(tiny_models["llama"][2])
    return ggufloop("generate", model, "hi", "--loop", loop, "--mix", f"weights:{table}", "-n", "2", "-t", "1",
                    memory_limit=True)  # fmt: skip


# -- F4: weight tables are checked before they are read ------------------------------------------


def test_npy_header_with_a_huge_shape_is_refused_before_any_data(tiny_models, tmp_path):
    """(1, 100000, 100000) with 64 bytes of data asked numpy for 74.5 GiB before the shape was checked."""
    path = npy_header_only(tmp_path / "hugeshape.npy", (1, 100000, 100000))
    t0 = time.monotonic()
    proc = generate_with_table(tiny_models, str(path))
    one_error(proc, "1 x 100000 x 100000 is too large")
    assert time.monotonic() - t0 < 60


def test_a_large_npy_is_refused_from_its_header(tiny_models, tmp_path):
    """A 1 GB table of zeros (sparse here) took 7.5 GB and a minute before its row 0 was refused."""
    shape = (1, 11585, 11585)
    path = npy_header_only(tmp_path / "big.npy", shape, b"", size=128 + 8 * 11585 * 11585)
    assert path.stat().st_size > 10**9
    proc = generate_with_table(tiny_models, str(path))
    one_error(proc, "1 x 11585 x 11585 is too large")


def test_npy_tables_beyond_the_plan_limits_and_truncated_ones(tiny_models, tmp_path):
    np.save(tmp_path / "k2000.npy", np.zeros((2000, 2000), dtype=np.float32))  # 16 MB
    np.save(tmp_path / "m300.npy", np.zeros((300, 2, 2)))  # 300 block layers x 2 passes: 600 virtual layers
    np.save(tmp_path / "flat.npy", np.zeros(9))
    npy_header_only(tmp_path / "short.npy", (3, 3), bytes(16))
    np.save(tmp_path / "words.npy", np.array([["a", "b"], ["c", "d"]]))
    for name, message in [
        ("k2000.npy", "1 x 2000 x 2000 is too large"),
        ("m300.npy", "600 virtual layers"),
        ("flat.npy", "got shape (9,)"),
        ("short.npy", "is truncated"),
        ("words.npy", "not numbers"),
    ]:
        one_error(generate_with_table(tiny_models, str(tmp_path / name)), message)


def test_json_tables_too_deep_too_large_or_too_big_for_any_plan(tiny_models, tmp_path):
    (tmp_path / "deep.json").write_text("[" * 50000 + "]" * 50000)
    (tmp_path / "padded.json").write_text("[[1,0],[0.5,0.5]]" + " " * (9 * 2**20))
    (tmp_path / "k600.json").write_text(json.dumps([[0] * 600 for _ in range(600)]))
    (tmp_path / "huge-int.json").write_text("[[1" + "0" * 400 + ",0],[0.5,0.5]]")
    for table, message in [
        (str(tmp_path / "deep.json"), "nested too deeply"),
        ("[" * 30000, "nested too deeply"),
        ("[[[[[1]]]]]", "more than 3 levels"),
        (str(tmp_path / "padded.json"), "larger than"),
        (str(tmp_path / "k600.json"), "1 x 600 x 600 is too large"),
        (str(tmp_path / "huge-int.json"), "not finite"),
    ]:
        loop = "1:4x2" if "huge-int" in table else "1:4x3"
        one_error(generate_with_table(tiny_models, table, loop), message)


def test_a_weight_file_that_is_not_a_regular_file(tiny_models, tmp_path):
    """A FIFO is refused at once (never waited on), as are a folder and a device: they exist, so the
    message is not "not found"."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    (tmp_path / "folder.npy").mkdir()
    for path, kind in [(fifo, "FIFO"), (tmp_path / "folder.npy", "folder"), (Path("/dev/zero"), "device")]:
        one_error(generate_with_table(tiny_models, str(path)), f"is not a regular file (it is a {kind}")
    one_error(generate_with_table(tiny_models, "a" * 5000 + ".json"), "File name too long")
    one_error(generate_with_table(tiny_models, str(tmp_path / "missing.json")), "not found")


def test_the_table_limits_in_process():
    """The codec itself: limits from the plan (K <= 512, m * K <= 512), and no RecursionError."""
    with pytest.raises(PlanError, match="nested too deeply"):
        LoopPlan.parse("1:4x3/weights:" + "[" * 100000)
    with pytest.raises(PlanError, match="1 x 513 x 513 is too large"):
        LoopPlan.parse("1:4x3/weights:" + json.dumps([[0] * 513] * 513))
    with pytest.raises(PlanError, match="more than 8388608"):
        LoopPlan.parse("1:4x3/weights:[" + " " * (8 * 2**20) + "]")
    ok = "[[1,0],[0.5,0.5]]"
    assert str(LoopPlan.parse(f"1:4x2/weights:{ok}")) == "1:4x2/weights:[[1.0,0.0],[0.5,0.5]]"


def test_hostile_tables_do_not_end_a_chat(tiny_models, tmp_path):
    """`/mix weights:...` with each hostile table prints one error line; the chat goes on and answers."""
    huge = npy_header_only(tmp_path / "hugeshape.npy", (1, 100000, 100000))
    (tmp_path / "deep.json").write_text("[" * 50000 + "]" * 50000)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    lines = [f"/mix weights:{huge}", f"/mix weights:{tmp_path / 'deep.json'}", "/mix weights:" + "[" * 30000,
             f"/mix weights:{fifo}", "/mix uniform", "w1 w2", "/quit"]  # fmt: skip
    model = str(tiny_models["llama"][2])
    proc = ggufloop("chat", model, "--loop", "1:4x3", "-n", "3", "-t", "1", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 4, proc.stdout
    assert "too large" in errors[0] and "nested too deeply" in errors[1] and "nested too deeply" in errors[2]
    assert "not a regular file" in errors[3]
    assert "plan 1:4x3/uniform" in proc.stdout and "tokens," in proc.stderr  # /mix worked, then an answer


# -- F4b, F9: trace's prompt is bounded, and not empty ---------------------------------------------


def test_trace_refuses_a_prompt_over_its_bound_and_an_empty_one(tiny_models, tmp_path):
    limit = 256
    model = str(tiny_models["llama"][2])
    long_prompt = "a" * (limit + 40)  # a token a byte: more than the limit, less than the tiny model's context, 512
    proc = ggufloop("trace", model, long_prompt, "--loop", "1:4x3", "-t", "1", "-o", str(tmp_path / "t"))
    one_error(proc, "tokens, more than trace's limit of 256")
    proc = ggufloop("trace", model, "", "--loop", "1:4x3", "-t", "1", "-o", str(tmp_path / "t"))
    one_error(proc, "the prompt is empty")
    help_text = ggufloop("trace", "--help").stdout
    assert f"at most {limit} tokens" in " ".join(help_text.split())

    from ggufloop.cli.trace import MAX_PROMPT_TOKENS
    from ggufloop.trajectory import MAX_TRACE_TOKENS

    assert MAX_PROMPT_TOKENS == MAX_TRACE_TOKENS == limit


# -- F5, F9: RPC addresses and a lost server -------------------------------------------------------


@pytest.mark.parametrize(
    "rpc, message",
    [
        ("a" * 3000 + ":1", "is not a host name"),
        ("a." * 200 + "b:1", "is not a host name"),
        ("http://127.0.0.1:50052", "expected HOST:PORT, e.g. 192.168.1.10:50052, not a URL"),
        ("127.0.0.1:" + "5" * 5000, "expected HOST:PORT"),
    ],
)
def test_rpc_addresses_that_are_not_host_port(tiny_models, rpc, message):
    one_error(ggufloop("generate", str(tiny_models["llama"][2]), "hi", "--rpc", rpc, "-n", "2", "-t", "1"), message)


@pytest.mark.rpc
def test_a_lost_rpc_server_error_is_on_its_own_line(tiny_models, tmp_path):
    """generate streams its answer without a newline; the lost server's error must not be glued to it."""
    from ggufloop import rpc
    from ggufloop.errors import RpcError

    port = free_port()
    log = open(tmp_path / "rpc.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "ggufloop", "rpc-server", "--port", str(port), "--threads", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2)
                break
            except RpcError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "rpc.log").read_text()
                time.sleep(0.1)
        model = str(tiny_models["llama"][2])
        args = ["generate", model, "w1 w2 w3", "--rpc", f"127.0.0.1:{port}", "-n", "400", "-t", "1"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "ggufloop", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT
        )
        first = proc.stdout.read(1)  # the first byte of the answer: the server is in use now
        server.send_signal(signal.SIGKILL)
        out = (first + proc.stdout.read()).decode("utf-8", "replace")
        proc.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "tokens," not in out, out  # it ended mid-answer
    assert re.search(r"(^|\n)error: lost the RPC server 127\.0\.0\.1:\d+ ", out), out
    assert len(re.findall("error:", out)) == 1, out


# -- F7: bake refuses what generate would refuse ---------------------------------------------------


def test_bake_refuses_freeze_on_a_dense_model(tiny_models, tmp_path):
    out = tmp_path / "fz.gguf"
    proc = ggufloop("bake", str(tiny_models["llama"][2]), "--loop", "1:4x3@freeze", "-o", str(out))
    one_error(proc, "MoE routing freeze needs a mixture-of-experts model; this llama model has no experts")
    assert not out.exists()
    proc = ggufloop("bake", str(tiny_models["llama"][2]), "--loop", "1:4x3", "--moe", "freeze", "-o", str(out))
    one_error(proc, "has no experts")
    assert not out.exists()
