"""llama.cpp's own programs from the patched tree (issue 26, item 4), each run with a plan as a user runs it:
llama-completion with the plan as --override-kv against a greedy decode of LoopedLlama, llama-bench on a
file with the plan baked in (it takes no overrides; one KV slot per pass shows that the plan ran),
llama-quantize requantizing a model that then loops; and test-loop, the series' own C test, against a
duplicated file. llama-perplexity's test is in test_perplexity."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner

from ggufloop import LoopedLlama, LoopPlan, tools
from ggufloop.cli import main
from ggufloop.gguf_io import write_duplicated

from conftest import PROMPT, eval_logits, open_model
from tiny import ARCHS


def overrides(plan: str) -> list[str]:
    """The plan as the programs' arguments, as `ggufloop tools --loop PLAN` prints them."""
    run = CliRunner().invoke(main, ["tools", "--loop", plan])
    assert run.exit_code == 0, run.output
    args = run.output.split()
    assert args == [a for kv in LoopPlan.parse(plan).override_strings() for a in ("--override-kv", kv)]
    return args


def test_every_program_is_built_and_listed():
    run = CliRunner().invoke(main, ["tools"])
    assert run.exit_code == 0, run.output
    for name in tools.PROGRAMS:
        line = next(line for line in run.output.splitlines() if line.startswith(name + " "))
        path = Path(line.split()[1])
        assert path.is_file() and path == tools.program(name), line
        proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
        assert "usage" in (proc.stdout + proc.stderr).lower(), (name, proc.stderr[-500:])
    one = CliRunner().invoke(main, ["tools", "llama-bench"])
    assert one.exit_code == 0 and one.output.strip() == str(tools.program("llama-bench"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "unknown program 'nope'"),
        (["llama-bench", "--loop", "1:3x2"], "not both"),
        (["--loop", "1:3x2", "--mix", "weights:[[1,0],[0,1]]"], "bake it into the file"),
    ],
)
def test_tools_refusals_are_one_line(args, message):
    run = CliRunner().invoke(main, ["tools", *args])
    assert run.exit_code == 1 and run.output.count("error:") == 1 and message in run.output, run.output


def greedy(path: Path, plan: str | None, prompt: str, n: int) -> str:
    """A greedy continuation decoded token by token by LoopedLlama (its F16 KV cache, as llama.cpp's)."""
    llm = LoopedLlama(str(path), loop=LoopPlan.parse(plan), n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.eval(tokens)
        out: list[int] = []
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        for _ in range(n):
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            token = int(np.argmax(row))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            out.append(token)
            llm.eval([token])
        return llm.detokenize(out).decode("utf-8", "replace")
    finally:
        llm.close()


@pytest.mark.models
@pytest.mark.parametrize("plan", [None, "10:15x3/uniform", "8:14x2"])
def test_llama_completion_runs_a_plan_as_looped_llama_does(plan):
    """Greedy, with flash attention off as llama-cpp-python has it (llama.cpp's programs turn it on where
    the backend has it, which moves logits by rounding: under 8:14x2 that flips a 0.03 margin)."""
    from ggufloop.models import resolve

    path, prompt, n = resolve("smollm2-135m-instruct"), "The capital of France is", 24
    cmd = [str(tools.program("llama-completion")), "-m", str(path), "-no-cnv", "--no-display-prompt", "-n", str(n)]
    cmd += ["--temp", "0", "-t", "2", "-c", "256", "-fa", "off", "-p", prompt, *(overrides(plan) if plan else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = re.sub(r" \[end of text\]\s*$", "", proc.stdout).rstrip("\n")  # how it marks an end-of-generation token
    want = greedy(path, plan, prompt, n)
    assert got == want and len(want) > 20, (got, want)
    if plan:
        assert want != greedy(path, None, prompt, n)  # the plan changes the answer: the overrides took effect


def kv_layers(log: str) -> int:
    """How many KV slots llama.cpp allocated, from its verbose log."""
    return len(set(re.findall(r"llama_kv_cache: layer +(\d+):", log)))


def test_llama_bench_reports_a_baked_plan(tiny_models, tmp_path):
    """llama-bench takes no metadata overrides: the plan is baked into a copy of the file. Both files in
    one run give pp and tg rows; the baked one allocates one KV slot per pass (6 layers + 2 x 2)."""
    path = tiny_models["llama"][2]
    baked = tmp_path / "baked.gguf"
    run = CliRunner().invoke(main, ["bake", str(path), "--loop", "2:4x3/uniform", "-o", str(baked)])
    assert run.exit_code == 0, run.output
    bench = str(tools.program("llama-bench"))
    proc = subprocess.run(
        [bench, "-m", str(path), "-m", str(baked), "-p", "16", "-n", "4", "-r", "1", "-t", "1", "-o", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    got = {(Path(r["model_filename"]).name, r["n_prompt"], r["n_gen"]) for r in rows if r["avg_ts"] > 0}
    assert got == {(f, p, g) for f in (path.name, "baked.gguf") for p, g in ((16, 0), (0, 4))}, rows
    logs = [
        subprocess.run([bench, "-m", str(m), "-p", "8", "-n", "0", "-r", "1", "-t", "1", "-v"],
                       capture_output=True, text=True, timeout=300).stderr
        for m in (path, baked)
    ]  # fmt: skip
    assert [kv_layers(log) for log in logs] == [6, 6 + 2 * 2], [log[-2000:] for log in logs]


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_test_loop_finds_a_schedule_equal_to_the_duplicated_file(arch, tiny_models, tmp_path):
    """tests/test-loop.cpp (patch 0009), the mechanism's test in llama.cpp's own style and language: the schedule
    0:4,2:6 (layers 2-3 twice) against the file with those layers physically copied, every logit bit for bit, as
    one batch and then token by token. The oracle can fail: another schedule against the same file differs (exit
    1), and a schedule the model cannot run is refused with the backend's reason (exit 2)."""
    path = tiny_models[arch][2]
    program = tools.lib_dir() / "test-loop"
    assert program.is_file(), f"{program}: the backend was built without patches/tools.cmake's test-loop"
    dup = write_duplicated(path, tmp_path / "dup.gguf", [0, 1, 2, 3, 2, 3, 4, 5])

    def run(layers: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(program), str(path), layers, str(dup)], capture_output=True, text=True, timeout=120)

    same = run("0:4,2:6")
    assert same.returncode == 0 and "logits equal bit for bit" in same.stdout, same.stderr[-2000:]
    other = run("0:3,1:6")  # layers 1-2 twice: the same depth, another model
    assert other.returncode == 1 and "under the schedule" in other.stderr, other.stderr[-2000:]
    refused = run("0:9")
    assert refused.returncode == 2 and "refused" in refused.stderr, refused.stderr[-2000:]


def test_llama_quantize_requantizes_a_model_that_then_loops(tiny_models, tmp_path):
    """The tiny F32 model to Q8_0: the file is smaller, its weights Q8_0, and under a plan its logits are
    those of the F32 file within Q8_0's rounding (and not equal: it was quantized)."""
    import gguf

    path = tiny_models["llama"][2]
    q8 = tmp_path / "q8.gguf"
    proc = subprocess.run(
        [str(tools.program("llama-quantize")), "--allow-requantize", str(path), str(q8), "Q8_0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = {
        t.tensor_type.name for t in gguf.GGUFReader(q8).tensors if len(t.shape) == 2 and "token_embd" not in t.name
    }
    assert "Q8_0" in kinds and q8.stat().st_size < path.stat().st_size / 2, kinds
    plan = "2:4x3/uniform"
    ref, got = (eval_logits(llm, PROMPT) for llm in (open_model(path, plan), open_model(q8, plan)))
    scale = np.abs(ref).max()
    assert 0 < np.abs(got - ref).max() < 0.05 * scale, np.abs(got - ref).max() / scale


def _serve(path: Path, plan: str | None, port: int) -> subprocess.Popen:
    """llama-server on loopback with the plan as --override-kv, once it answers /health."""
    import time
    import urllib.request

    cmd = [str(tools.program("llama-server")), "-m", str(path), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-c", "256", "-t", "2", "-fa", "off", "-np", "1", *(overrides(plan) if plan else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"llama-server exited: {proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("llama-server did not come up in 120 s")


def _post(port: int, route: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.mark.models
def test_llama_server_completes_and_chats_under_a_plan():
    """The patched llama-server with a plan as --override-kv: its greedy /completion is LoopedLlama's greedy
    decode under the plan, token for token, and its chat answer differs from the unlooped server's."""
    from ggufloop.models import resolve

    from ports import free_port

    path, prompt, n = resolve("smollm2-135m-instruct"), "The capital of France is", 24
    chat = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 32, "temperature": 0}
    answers = {}
    for plan in ("10:15x3/uniform", None):
        port = free_port()
        server = _serve(path, plan, port)
        try:
            done = _post(port, "/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1})
            assert done["content"] == greedy(path, plan, prompt, n), (plan, done["content"])
            reply = _post(port, "/v1/chat/completions", chat)
            answers[plan] = reply["choices"][0]["message"]["content"]
            assert len(answers[plan]) > 10, reply
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert answers["10:15x3/uniform"] != answers[None]  # the plan ran: another answer


@pytest.mark.models
def test_llama_cli_runs_one_prompt_under_a_plan():
    """llama-cli, non-interactively (one turn, -st): under the plan its answer is not the unlooped model's."""
    from ggufloop.models import resolve

    path = resolve("smollm2-135m-instruct")

    def answer(plan: str | None) -> str:
        cmd = [str(tools.program("llama-cli")), "-m", str(path), "-p", "Name three colours.", "-st", "-n", "32"]
        cmd += ["--temp", "0", "-t", "2", "-c", "256", "-fa", "off", *(overrides(plan) if plan else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    looped, plain = answer("10:15x3/uniform"), answer(None)
    assert len(looped.strip()) > 10 and looped != plain, (looped, plain)
