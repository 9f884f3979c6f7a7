"""What a hostile or careless user does: each case ends in a result or one `error:` line, and never
loses a session, a file or a result (the findings of the adversarial pass, on the Python side)."""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggufloop import BackendError, LoopedLlama, LoopPlan, PlanError
from ggufloop.cli import main
from ggufloop.errors import StoreError
from ggufloop.eval.store import Store

from conftest import PROMPT, eval_logits, open_model
from tiny import Spec, make_weights, write_model

ROOT = Path(__file__).resolve().parent.parent


def ggufloop(*args: str, stdin: str | bytes = "", timeout: int = 300) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "ggufloop", *args], input=data, capture_output=True, timeout=timeout, cwd=ROOT
    )
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    return proc


def one_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


# -- silent wrong results ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan", ["10:15x4294967299", "4294967306:4294967311x3", "0:" + "9" * 5000 + "x2", "0:4,1:99999999999"]
)
def test_numbers_that_would_wrap_are_refused(tiny_models, plan):
    proc = ggufloop("generate", str(tiny_models["llama"][2]), "hi", "--loop", plan, "-n", "2")
    one_error(proc, "too large")


def test_mix_reads_back_exactly_as_set(tiny_models):
    path = tiny_models["llama"][2]
    llm = LoopedLlama(str(path), loop="1:4x2/ema:0.3333333", n_ctx=64)
    try:
        assert str(llm.plan) == "1:4x2/ema:0.3333333"
        llm.set_mix("autoalign:1e-7")
        assert str(llm.mix) == "autoalign:1e-07" and llm.mix.temperature > 0
    finally:
        llm.close()


def test_a_refused_plan_change_keeps_plan_mix_and_cache(tiny_models):
    path = tiny_models["llama"][2]
    llm = open_model(path, loop="1:3x2/ema:0.3")
    try:
        want = eval_logits(llm, PROMPT)
        llm.reset()
        llm.eval(PROMPT[:10])
        for bad in ("4:9x2", "0:6x100", "1:3x2/autoalign:1e-40"):
            with pytest.raises((PlanError, BackendError)):
                llm.set_loop(bad)
            assert str(llm.plan) == "1:3x2/ema:0.3" and llm.n_tokens == 10
        llm.eval(PROMPT[10:])  # continues on the kept cache
        assert np.array_equal(np.array(llm.scores[: len(PROMPT)]), want)
    finally:
        llm.close()


def test_no_plan_change_under_a_stream(tiny_models):
    llm = LoopedLlama(str(tiny_models["llama"][2]), loop="1:3x2", n_ctx=128)
    try:
        stream = llm.create_completion("t1 t2", max_tokens=6, temperature=0, stream=True)
        next(stream)
        with pytest.raises(BackendError, match="streaming"):
            llm.set_loop("2:4x3")
        with pytest.raises(BackendError, match="streaming"):
            llm.set_mix("uniform")
        list(stream)  # the stream finishes on the plan it started with
        llm.set_loop("2:4x3")
        assert str(llm.plan) == "2:4x3"
    finally:
        llm.close()


def test_plan_switches_do_not_leak_contexts(tiny_models):
    from llama_cpp import _internals

    llm = LoopedLlama(str(tiny_models["llama"][2]), n_ctx=64)
    try:
        gc.collect()
        before = sum(isinstance(o, _internals.LlamaContext) for o in gc.get_objects())
        for i in range(20):
            llm.set_loop(f"1:{2 + i % 3}x2")
        gc.collect()
        assert sum(isinstance(o, _internals.LlamaContext) for o in gc.get_objects()) == before
    finally:
        llm.close()


def test_non_finite_logits_are_an_error(tmp_path):
    spec = Spec("llama")
    weights = make_weights(spec, seed=1)
    weights["output.weight"] = weights.get("output.weight", weights["token_embd.weight"]).copy()
    weights["output.weight"][:, 3] = np.nan
    path = write_model(tmp_path / "nan.gguf", spec, weights)
    llm = LoopedLlama(str(path), n_ctx=64)
    try:
        with pytest.raises(BackendError, match="non-finite logits"):
            llm.create_completion("t1 t2", max_tokens=4)
    finally:
        llm.close()
    proc = ggufloop("generate", str(path), "t1 t2", "-n", "4")
    one_error(proc, "non-finite logits")


# -- tracebacks instead of one line --------------------------------------------------------------


def test_databases_that_are_not_ours(tiny_models, tmp_path):
    model = str(tiny_models["llama"][2])
    notdb = tmp_path / "notdb.sqlite"
    notdb.write_text("hello, I am not a database" * 100)
    truncated = tmp_path / "truncated.sqlite"
    good = Store(tmp_path / "good.sqlite")
    good.close()
    truncated.write_bytes((tmp_path / "good.sqlite").read_bytes()[:1000])
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE results (a, b)")
    con.commit()
    con.close()
    before = other.read_bytes()
    for db, message in [
        (notdb, "not a usable results database"),
        (truncated, "not a usable results database"),
        (other, "not a ggufloop results database"),
    ]:
        proc = ggufloop("eval", model, "--tasks", "piqa", "--loop", "1:3x2", "--limit", "4", "--db", str(db))
        one_error(proc, message)
    assert other.read_bytes() == before  # never altered
    con = sqlite3.connect(other)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["results"]


@pytest.mark.data
def test_a_read_only_database_is_refused_before_scoring(tiny_models, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through file permissions")
    db = tmp_path / "ro.sqlite"
    Store(db).close()
    db.chmod(0o444)
    proc = ggufloop(
        "eval", str(tiny_models["llama"][2]), "--tasks", "piqa", "--loop", "1:3x2", "--limit", "4", "--db", str(db)
    )
    one_error(proc, "read-only")


def test_a_read_only_store_refuses_writes_before_work(tmp_path):
    db = tmp_path / "r.sqlite"
    Store(db).close()
    store = Store(db)
    store.path = tmp_path / "missing-dir" / "r.sqlite"  # a path that cannot be written
    with pytest.raises(StoreError, match="read-only"):
        store.check_writable()
    store.close()


def test_first_schema_is_upgraded_and_kept(tmp_path):
    db = tmp_path / "v1.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE results (model TEXT NOT NULL, task TEXT NOT NULL, shots INTEGER NOT NULL, plan TEXT NOT NULL,"
        " item TEXT NOT NULL, lls TEXT NOT NULL, gold INTEGER NOT NULL, correct INTEGER NOT NULL,"
        " correct_norm INTEGER NOT NULL, PRIMARY KEY (model, task, shots, plan, item));"
        "CREATE TABLE models (path TEXT, size INTEGER, mtime REAL, sha256 TEXT, name TEXT,"
        " PRIMARY KEY (path, size, mtime));"
        "INSERT INTO results VALUES ('m', 'piqa', 0, 'none', '3', '[-1.0, -2.0]', 0, 1, 1);"
    )
    con.commit()
    con.close()
    store = Store(db)
    assert store.db.execute("SELECT prompt, plan, item FROM results").fetchall() == [("v1", "none", "3")]
    store.close()


def test_broken_chat_template(tmp_path):
    spec = Spec("llama")
    path = write_model(
        tmp_path / "tpl.gguf",
        spec,
        make_weights(spec, seed=2),
        extra_kv={"tokenizer.chat_template": "{% for m in messages %}{{ m.content "},
    )
    proc = ggufloop("generate", str(path), "t1 t2", "-n", "3")
    assert proc.returncode == 0, proc.stderr  # completion needs no template
    proc = ggufloop("chat", str(path), "-n", "3", stdin="hello\n/quit\n")
    one_error(proc, "chat template is broken")


def test_context_sizes_out_of_bounds(tiny_models):
    path = str(tiny_models["llama"][2])
    proc = ggufloop("generate", path, "hi", "-c", "4294967296")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--ctx-size" in proc.stderr
    one_error(ggufloop("generate", path, "hi", "-c", "4096"), "larger than the context")


def test_chat_survives_a_long_conversation_and_bad_bytes(tiny_models):
    path = str(tiny_models["llama"][2])
    lines = (
        b"".join(b"w%d " % i * 30 + b"\n" for i in range(12)) + b"bad \xff\xfe bytes\n" + b"w1 " * 400 + b"\n/quit\n"
    )
    proc = ggufloop("chat", path, "-n", "8", "-c", "256", "--temp", "0", stdin=lines, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "oldest exchange was dropped" in proc.stderr
    assert "does not fit in the context" in proc.stdout


# -- lost or stray work ----------------------------------------------------------------------------


def test_bake_never_destroys_its_source(tiny_models, tmp_path):
    src = tmp_path / "src.gguf"
    src.write_bytes(tiny_models["qwen2"][2].read_bytes())
    data = src.read_bytes()
    os.link(src, tmp_path / "hard.gguf")
    os.symlink(src, tmp_path / "soft.gguf")
    for out in ("hard.gguf", "soft.gguf", "src.gguf"):
        proc = ggufloop("bake", str(src), "--loop", "1:3x2", "-o", str(tmp_path / out))
        one_error(proc, "the model itself")
    assert src.read_bytes() == data
    target = tmp_path / "existing.gguf"
    target.write_bytes(b"keep me")
    one_error(ggufloop("bake", str(src), "--loop", "1:9x2", "-o", str(target)), "out of range")
    assert target.read_bytes() == b"keep me"  # a refused bake leaves the target alone
    assert ggufloop("bake", str(src), "--loop", "1:3x2", "-o", str(target)).returncode == 0
    assert target.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob(".*.tmp"))


def test_outputs_and_arguments_are_checked_before_work(tiny_models, tmp_path):
    path = str(tiny_models["llama"][2])
    blocked = tmp_path / "file"
    blocked.write_text("x")
    one_error(ggufloop("trace", path, "t1 t2", "--loop", "1:3x2", "-o", str(blocked / "sub")), "output folder")
    one_error(ggufloop("bench", path, "--no-stock", "--counts", "x", "-o", str(tmp_path / "b")), "bad counts")
    one_error(ggufloop("bench", path, "--no-stock", "--block", "0:99", "-o", str(tmp_path / "b")), "out of range")
    one_error(ggufloop("bench-scoring", path, "--tasks", "bogus"), "unknown task")
    one_error(ggufloop("bake", path, "--loop", "1:3x2", "-o", str(blocked / "x.gguf")), "cannot write")
    # folders that os.access calls writable but where no file can be made (even for root): a real attempt decides
    one_error(ggufloop("bake", path, "--loop", "1:3x2", "-o", "/proc/x.gguf"), "cannot write /proc/x.gguf")
    one_error(ggufloop("bench", path, "--no-stock", "-o", "/proc/bench"), "output folder /proc/bench")


@pytest.mark.data
def test_sweep_workers_stop_with_their_parent(tiny_models, tmp_path):
    db = tmp_path / "s.sqlite"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ggufloop",
            "sweep",
            str(tiny_models["llama"][2]),
            "--task",
            "piqa",
            "--limit",
            "200",
            "--jobs",
            "2",
            "-t",
            "2",
            "--db",
            str(db),
            "-o",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def workers() -> list[int]:
        out = []
        for p in Path("/proc").iterdir():
            try:
                cmd = (p / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if b"ggufloop.eval.executors" in cmd and str(db).encode() in cmd:
                out.append(int(p.name))
        return out

    for _ in range(200):
        time.sleep(0.1)
        if len(workers()) == 2:
            break
    assert len(workers()) == 2
    proc.send_signal(signal.SIGTERM)  # the parent only, not its process group
    proc.wait(timeout=30)
    for _ in range(100):
        if not workers():
            break
        time.sleep(0.1)
    assert workers() == []


def test_cli_runner_sees_one_line_for_a_bad_db(tmp_path):
    res = CliRunner().invoke(main, ["report", "--db", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.output  # click's own one-line usage error
    assert isinstance(res.exception, SystemExit)  # not an exception escaping the command


@pytest.mark.data
def test_results_export_and_import_round_trip(tmp_path):
    a = Store(tmp_path / "a.sqlite")
    from ggufloop.eval.store import Row, Unit

    # rows an import accepts: piqa's items 0 and 1 (gold 0 and 1; choices of 165/167 and 31/35 characters)
    unit = Unit("5" * 64, "piqa", 0, "v1", "1:3x2")
    a.add(unit, [Row("0", [-1.5, -1.505], 0, True, False), Row("1", [-3.0, -1.0], 1, True, True)])
    assert a.export_rows(tmp_path / "rows.csv.gz") == 2
    a.close()
    b = Store(tmp_path / "b.sqlite")
    assert b.import_rows(tmp_path / "rows.csv.gz") == 2
    assert b.import_rows(tmp_path / "rows.csv.gz") == 0  # nothing twice
    assert b.rows(unit) == {"0": (1, 0), "1": (1, 1)}
    assert b.db.execute("SELECT lls FROM results WHERE item='0'").fetchone()[0] == "[-1.5, -1.505]"
    (tmp_path / "bad.csv").write_text("not,an,export\n")
    with pytest.raises(StoreError, match="not a ggufloop results export"):
        b.import_rows(tmp_path / "bad.csv")
    b.close()


def test_a_general_schedule_overrides_a_plan_baked_into_the_file(tiny_models, tmp_path):
    from ggufloop.gguf_io import write_plan

    baked = write_plan(tiny_models["llama"][2], tmp_path / "baked.gguf", LoopPlan.parse("1:3x2/uniform"))
    llm = LoopedLlama(str(baked), loop="0:4,1:6", n_ctx=64)
    try:
        assert llm.schedule == [0, 1, 2, 3, 1, 2, 3, 4, 5] and str(llm.plan) == "0:4,1:6"
    finally:
        llm.close()
    llm = LoopedLlama(str(baked), loop="none", n_ctx=64)
    try:
        assert llm.schedule == list(range(6)) and str(llm.plan) == "none"
    finally:
        llm.close()


ABORT = """
from llama_cpp._utils import suppress_stdout_stderr
{imports}
with suppress_stdout_stderr(disable=False):  # as Llama does while it loads, with verbose=False
    llama_cpp.llama_cpp._lib.ggml_abort(b"ggml.c", 42, b"GGML_ASSERT(%s) failed", b"n_dims <= 4")
"""


def test_a_fatal_error_inside_llama_cpp_is_never_silent():
    """An abort inside llama.cpp while llama-cpp-python has stderr pointed at /dev/null: without ggufloop the
    process ends without a word (the first run shows it); with it, the user reads why."""
    for imports, shown in (("import llama_cpp", False), ("import llama_cpp\nimport ggufloop._lib", True)):
        code = ABORT.format(imports=imports)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGABRT
        message = "error: llama.cpp stopped the process: ggml.c:42: GGML_ASSERT(n_dims <= 4) failed"
        assert (message in proc.stderr) == shown, proc.stderr
        assert ("GGML_ASSERT" in proc.stderr) == shown, proc.stderr


def test_a_crash_is_never_silent():
    """A segmentation fault while llama-cpp-python has stderr pointed at /dev/null (the commands' set-up):
    silent without ggufloop's report (the first run), named with it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    for setup, shown in (("", False), ("from ggufloop.cli import report_crashes\nreport_crashes()\n", True)):
        code = (
            f"import ctypes\nfrom llama_cpp._utils import suppress_stdout_stderr\n{setup}"
            "with suppress_stdout_stderr(disable=False):\n    ctypes.string_at(0)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == -signal.SIGSEGV
        assert ("Fatal Python error: Segmentation fault" in proc.stderr) == shown, proc.stderr
