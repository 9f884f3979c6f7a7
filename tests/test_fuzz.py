"""A standing guard in the spirit of the adversarial pass: generated plans and mixes, damaged GGUF
files and damaged results databases, each run through ggufloop in a child process. Every input must
end in a result or a one-line error: never a signal, a traceback or a hang.

The children report one JSON line per input before and after it runs, so an input that kills the
process is named in the failure. Counts are kept small enough for CI; raise FUZZ_SCALE to try more.
(The server's bad requests are fuzzed in tests/test_serve.py's hardening tests.)
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
ROOT = Path(__file__).resolve().parent.parent

# one input per line on stdin: {"kind": ..., ...}; one JSON line out per input
CHILD = r"""
import json, sys
from ggufloop import LoopedLlama
from ggufloop._lib import quiet_logs
from ggufloop.errors import UserError
from ggufloop.gguf_io import model_info

quiet_logs()
for line in sys.stdin:
    case = json.loads(line)
    print(json.dumps({"running": case}), flush=True)
    try:
        if case["kind"] == "plan":
            llm = LoopedLlama(case["path"], loop=case["plan"], n_ctx=64, n_threads=1, n_threads_batch=1)
            try:
                llm.create_completion("t1 t2", max_tokens=2, temperature=0)
                result = str(llm.plan)
            finally:
                llm.close()
        elif case["kind"] == "switch":
            llm = LoopedLlama(case["path"], n_ctx=64, n_threads=1, n_threads_batch=1)
            try:
                for plan in case["plans"]:
                    try:
                        llm.set_loop(plan)
                    except UserError:
                        pass
                llm.create_completion("t1 t2", max_tokens=2, temperature=0)
                result = str(llm.plan)
            finally:
                llm.close()
        elif case["kind"] == "file":
            info = model_info(case["path"])
            llm = LoopedLlama(case["path"], n_ctx=64, n_threads=1, n_threads_batch=1)
            try:
                llm.create_completion("t1 t2", max_tokens=2, temperature=0)
            finally:
                llm.close()
            result = info.arch
        print(json.dumps({"ok": True, "result": result}), flush=True)
    except UserError as err:
        print(json.dumps({"ok": False, "error": str(err)}), flush=True)
"""


def run_child(cases: list[dict], timeout: int = 600) -> list[dict]:
    """Run cases in one child process; fail naming the case that killed it or raised a traceback."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input="".join(json.dumps(c) + "\n" for c in cases),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [r for r in lines if "running" not in r]
    if proc.returncode != 0 or len(results) != len(cases):
        last = next((r["running"] for r in reversed(lines) if "running" in r), None)
        pytest.fail(f"the child ended with {proc.returncode} on {last!r}:\n{proc.stderr[-3000:]}")
    for case, res in zip(cases, results):
        if not res["ok"]:
            assert "\n" not in res["error"] and res["error"], (case, res)
    return results


# -- plans and mixes, valid or not --------------------------------------------------------------

numbers = st.one_of(st.integers(0, 12), st.integers(-3, 2**33).map(abs), st.sampled_from([0, 1, 5, 6, 7, 512, 513]))
mixes = st.one_of(
    st.sampled_from(["", "/none", "/uniform", "/ema", "/autoalign", "/noise", "/blend", "/uniform:2", "/ema:", "/"]),
    st.tuples(
        st.sampled_from(["ema", "autoalign", "noise"]),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**40), 2**40)),
    ).map(lambda t: f"/{t[0]}:{t[1]}"),
)
plans = st.one_of(
    st.tuples(numbers, numbers, numbers, mixes).map(lambda t: f"{t[0]}:{t[1]}x{t[2]}{t[3]}"),
    st.lists(st.tuples(numbers, numbers), min_size=1, max_size=4).map(lambda r: ",".join(f"{a}:{b}" for a, b in r)),
    st.text(alphabet="0123456789:x,/ -.aeimnorsuwXE", max_size=24),
)


@settings(max_examples=2 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(plans, min_size=20, max_size=20))
def test_generated_plans_end_in_a_result_or_one_line(tiny_models, batch):
    path = str(tiny_models["gemma3"][2])
    results = run_child([{"kind": "plan", "path": path, "plan": p} for p in batch])
    assert len(results) == len(batch)


@settings(max_examples=2 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.lists(plans, min_size=3, max_size=6), min_size=5, max_size=5))
def test_plan_switches_end_in_a_working_model(tiny_models, batch):
    path = str(tiny_models["qwen3"][2])
    results = run_child([{"kind": "switch", "path": path, "plans": ps} for ps in batch])
    assert all(r["ok"] for r in results)  # refused switches never break the model


# -- damaged model files ------------------------------------------------------------------------


def corrupt(data: bytes, rng: random.Random) -> bytes:
    """One damage of the kind files suffer: flipped bytes in the header, a cut, a zeroed range."""
    b = bytearray(data)
    kind = rng.choice(["flip", "flip", "cut", "zero", "header-int"])
    header = min(len(b), 4096)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(4, header)] ^= 1 << rng.randrange(8)
    elif kind == "cut":
        del b[rng.randrange(8, len(b)) :]
    elif kind == "zero":
        at = rng.randrange(4, header)
        b[at : at + rng.randint(1, 64)] = bytes(min(64, len(b) - at))
    else:  # a large value where a count or length stands
        at = rng.randrange(4, header - 8)
        b[at : at + 8] = rng.choice([2**63 - 1, 2**32 + 3, 2**31, 10**12]).to_bytes(8, "little")
    return bytes(b)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_damaged_gguf_files(tiny_models, tmp_path, arch):
    data = tiny_models[arch][2].read_bytes()
    rng = random.Random(f"fuzz-{arch}")
    cases = []
    for i in range(20 * SCALE):
        path = tmp_path / f"d{i}.gguf"
        path.write_bytes(corrupt(data, rng))
        cases.append({"kind": "file", "path": str(path)})
    results = run_child(cases)
    assert len(results) == len(cases)


# -- damaged results databases ------------------------------------------------------------------


@pytest.mark.data
def test_damaged_databases(tiny_models, tmp_path):
    from ggufloop.eval.store import Row, Store, Unit

    good = tmp_path / "good.sqlite"
    store = Store(good)
    store.add(Unit("m", "piqa", 0, "v1", "none"), [Row(str(i), [-1.0, -2.0], 0, True, True) for i in range(200)])
    store.close()
    con = sqlite3.connect(good)
    con.execute("PRAGMA wal_checkpoint(FULL)")
    con.close()
    data = good.read_bytes()
    rng = random.Random("fuzz-db")
    model = str(tiny_models["llama"][2])
    for i in range(8 * SCALE):
        db = tmp_path / f"d{i}.sqlite"
        db.write_bytes(corrupt(data, rng))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ggufloop",
                "eval",
                model,
                "--tasks",
                "piqa",
                "--loop",
                "1:3x2",
                "--limit",
                "2",
                "--db",
                str(db),
                "-t",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert "Traceback" not in proc.stderr and proc.returncode in (0, 1), proc.stderr[-2000:]
        if proc.returncode:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, proc.stderr
