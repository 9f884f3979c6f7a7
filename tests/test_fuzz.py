"""A standing guard in the spirit of the adversarial pass: generated plans and mixes, damaged GGUF
files and damaged results databases, each run through ggufloop in a child process. Every input must
end in a result or a one-line error: never a signal, a traceback or a hang.

The children report one JSON line per input before and after it runs, so an input that kills the
process is named in the failure. Counts are kept small enough for CI; raise FUZZ_SCALE to try more.
The second adversarial round's surfaces are fuzzed too: weight tables (.npy headers, JSON nesting and
sizes), results import files, hostile Hugging Face and ollama layouts, and server request bodies.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
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
        elif case["kind"] == "import":
            from ggufloop.eval.store import Store

            store = Store(case["db"])
            try:
                result = store.import_rows(case["path"])
            finally:
                store.close()
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


def run_child(cases: list[dict], timeout: int = 600, memory: int | None = None) -> list[dict]:
    """Run cases in one child process; fail naming the case that killed it, raised a traceback, or (with
    memory: an address-space limit in bytes) tried to allocate more than that."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD],
            input="".join(json.dumps(c) + "\n" for c in cases),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            preexec_fn=limit if memory else None,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        running = [json.loads(line)["running"] for line in out.splitlines() if '"running"' in line]
        pytest.fail(f"the child hung past {timeout} s on {running[-1] if running else None!r}")
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


# -- weight tables: .npy headers, JSON nesting and sizes ---------------------------------------------


def npy_bytes(shape: tuple, dtype: str, data: bytes) -> bytes:
    """A .npy file whose header claims shape and dtype, followed by data (of any length)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


shapes = st.lists(st.one_of(st.integers(0, 4), st.sampled_from([2, 3, 513, 10**5, 2**31, 2**40])), max_size=4)
npy_cases = st.tuples(
    shapes.map(tuple), st.sampled_from(["<f4", "<f8", "<i8", "|b1", "<c8", "|O", "<U3"]), st.binary(max_size=96)
)
json_cases = st.one_of(
    st.recursive(
        st.one_of(st.floats(), st.integers(), st.text(max_size=3), st.none()), lambda c: st.lists(c, max_size=4)
    ).map(json.dumps),
    st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: json.dumps([[[0.5] * n] * 2] * 2)),
)


@settings(max_examples=2 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(npy_cases, min_size=12, max_size=12), st.lists(json_cases, min_size=12, max_size=12))
def test_generated_weight_tables_end_in_a_result_or_one_line(tiny_models, tmp_path_factory, npys, jsons):
    tmp = tmp_path_factory.mktemp("weights")
    path = str(tiny_models["llama"][2])
    cases = []
    for i, (shape, dtype, data) in enumerate(npys):
        (tmp / f"w{i}.npy").write_bytes(npy_bytes(shape, dtype, data))
        cases.append({"kind": "plan", "path": path, "plan": f"1:3x2/weights:{tmp / f'w{i}.npy'}"})
    for i, text in enumerate(jsons):
        (tmp / f"w{i}.json").write_text(text)
        cases.append({"kind": "plan", "path": path, "plan": f"1:3x2/weights:{tmp / f'w{i}.json'}"})
    results = run_child(cases, memory=2 << 30)
    assert len(results) == len(cases)


# -- results import files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_file(tiny_models, tmp_path_factory) -> Path:
    """A real export: 4 piqa items scored by a tiny model, unlooped and under a plan."""
    tmp = tmp_path_factory.mktemp("export")
    args = ["eval", str(tiny_models["llama"][2]), "--tasks", "piqa", "--loop", "1:3x2", "--limit", "4", "-t", "1"]
    for argv in (
        [*args, "--db", str(tmp / "a.sqlite")],
        ["report", "--db", str(tmp / "a.sqlite"), "--export", str(tmp / "rows.csv")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "ggufloop", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
    return tmp / "rows.csv"


fields = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["0", "1", "-1", "2", "NaN", "1e999", "99999999999999999999", "[]", "[-1.0]", "[" * 5000, "none"]),
    st.lists(st.floats(), max_size=4).map(json.dumps),
)


@pytest.mark.data
@settings(max_examples=2 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 10), fields, st.booleans()), min_size=16, max_size=16))
def test_damaged_import_files_are_refused_whole_or_imported(export_file, tmp_path_factory, edits):
    """Every damaged file is refused with one line and adds nothing, or holds only rows the checks pass."""
    tmp = tmp_path_factory.mktemp("imports")
    lines = export_file.read_text().splitlines(keepends=True)
    cases = []
    for i, (row, column, value, gz) in enumerate(edits):
        rows = [line.rstrip("\r\n").split(",") for line in lines]
        if row < len(rows) and column < len(rows[row]):
            rows[row][column] = '"' + value.replace('"', '""') + '"'
        text = "".join(",".join(r) + "\n" for r in rows)
        name = tmp / (f"i{i}.csv.gz" if gz else f"i{i}.csv")
        data = gzip.compress(text.encode()) if gz else text.encode()
        if gz and i % 3 == 0:
            data = data[: len(data) // 2]
        name.write_bytes(data)
        cases.append({"kind": "import", "db": str(tmp / f"d{i}.sqlite"), "path": str(name)})
    results = run_child(cases)
    for case, res in zip(cases, results):
        with sqlite3.connect(case["db"]) as con:
            n = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        assert n == (res["result"] if res["ok"] else 0), (case, res)  # never half-imported


# -- hostile model stores ----------------------------------------------------------------------------

HOSTILE = ["fifo-ref", "root-link", "loop-link", "deep-json", "int-layers", "long-name", "nl-name", "fifo-blob"]


def hostile_layout(root: Path, kinds: list[str], gguf: bytes) -> None:
    """A Hugging Face cache and an ollama store, each holding one good model and the hostile entries named."""
    hub, ollama = root / "hub", root / "ollama"
    good = hub / "models--org--good" / "snapshots" / ("a" * 40)
    good.mkdir(parents=True)
    (good / "m.gguf").write_bytes(gguf)
    (hub / "models--org--good" / "refs").mkdir()
    (hub / "models--org--good" / "refs" / "main").write_text("a" * 40)
    (ollama / "blobs").mkdir(parents=True)
    manifests = ollama / "manifests" / "registry.ollama.ai" / "library"
    for i, kind in enumerate(kinds):
        repo = hub / f"models--org--h{i}"
        (repo / "snapshots").mkdir(parents=True)
        (repo / "refs").mkdir()
        tag = manifests / f"h{i}" / "latest"
        tag.parent.mkdir(parents=True, exist_ok=True)
        if kind == "fifo-ref":
            os.mkfifo(repo / "refs" / "main")
        elif kind == "root-link":
            (repo / "snapshots" / "r").symlink_to("/")
        elif kind == "loop-link":
            (repo / "snapshots" / "r").mkdir()
            (repo / "snapshots" / "r" / "up").symlink_to("..")
        elif kind == "deep-json":
            tag.write_text("[" * 100_000)
        elif kind == "int-layers":
            tag.write_text('{"layers": 5}')
        elif kind == "long-name":
            (manifests / ("a" * 255)).mkdir(exist_ok=True)
        elif kind == "nl-name":
            (manifests / "nl\nname").mkdir(exist_ok=True)
            (manifests / "nl\nname" / "latest").write_text('{"layers": []}')
        elif kind == "fifo-blob":
            digest = "sha256-" + "c" * 64
            os.mkfifo(ollama / "blobs" / digest)
            media = "application/vnd.ollama.image.model"
            tag.write_text(json.dumps({"layers": [{"mediaType": media, "digest": digest.replace("-", ":")}]}))


@settings(max_examples=3 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=5, unique=True))
def test_hostile_model_stores_are_listed_in_bounded_time(tiny_models, tmp_path_factory, kinds):
    root = tmp_path_factory.mktemp("stores")
    hostile_layout(root, kinds, tiny_models["llama"][2].read_bytes())
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_HUB_OFFLINE": "1",
        "OLLAMA_MODELS": str(root / "ollama"),
    }
    for argv in (["models", "list"], *(["info", f"hf:org/h{i}"] for i in range(len(kinds))), ["info", "hf:org/good"]):
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "ggufloop", *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{argv} hung on the layout {kinds}")
        assert "Traceback" not in proc.stderr and proc.returncode in (0, 1), (argv, kinds, proc.stderr[-2000:])
        if argv[0] == "models":
            assert proc.returncode == 0 and "hf:org/good" in proc.stdout, (kinds, proc.stdout, proc.stderr)
    assert "hf:org/good" in proc.stdout or proc.returncode == 0


# -- server request bodies ---------------------------------------------------------------------------

values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["\ud800", "w1 w2", "", "none", "u", "tiny@u"]),
    ),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)),
    max_leaves=8,
)
KEYS = [
    "prompt",
    "messages",
    "max_tokens",
    "logprobs",
    "echo",
    "stream",
    "stop",
    "temperature",
    "model",
    "n",
    "logit_bias",
    "seed",
    "top_logprobs",
    "input",
    "tokens",
    "add_special_tokens",
    "loop",
    "grammar",
    "response_format",
]
bodies = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@settings(max_examples=2 * SCALE, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "/completions",
                    "/chat/completions",
                    "/extras/tokenize",
                    "/extras/detokenize",
                    "/tokenize",
                    "/detokenize",
                ]
            ),
            bodies,
        ),
        min_size=30,
        max_size=30,
    )
)
def test_server_request_bodies_never_get_500(tiny_models, batch):
    from test_serve import Server

    srv = Server(tiny_models["llama"][2], "--plan=u=2:4x3/uniform", "-c", "128")
    try:
        for path, body in batch:
            base = "/" if path.startswith(("/extras", "/tokenize", "/detokenize")) else ""  # at the root
            if "max_tokens" in body and isinstance(body["max_tokens"], int):
                body["max_tokens"] = min(body["max_tokens"], 8)
            status, answer = srv.post(path, body, base)
            assert status != 500 and srv.alive(), (path, body, status, answer)
        status, answer = srv.post("/completions", {"prompt": "w1 w2", "max_tokens": 2, "temperature": 0})
        assert status == 200, answer
    finally:
        log = srv.close()
    assert "Traceback" not in log, log[-3000:]
