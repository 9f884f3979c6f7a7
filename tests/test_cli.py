"""The command line, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from ggufloop import LoopedLlama, model_info
from ggufloop.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def ggufloop(*args: str, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ggufloop", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _commands() -> list[list[str]]:
    """Every command line of the CLI, subcommands of groups included (the group's table, not a list here)."""
    from ggufloop.cli import COMMANDS, main

    out = [[]]
    for name in COMMANDS:
        out.append([name])
        command = main.get_command(None, name)
        for sub in getattr(command, "commands", {}):
            out.append([name, sub])
    return out


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: " ".join(c) or "ggufloop")
def test_help_on_every_command(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Usage:" in res.output, cmd


def test_info(tiny_models):
    res = run("info", str(tiny_models["gemma3"][2]))
    assert res.exit_code == 0, res.output
    assert "architecture: gemma3" in res.output and "layers: 6" in res.output and "looping supported: yes" in res.output


def test_generate_with_compare(tiny_models):
    res = run(
        "generate",
        str(tiny_models["llama"][2]),
        "t1 t2 t3",
        "--loop",
        "2:4x3",
        "--mix",
        "uniform",
        "-n",
        "5",
        "--compare",
    )
    assert res.exit_code == 0, res.output
    assert "plan 2:4x3/uniform, virtual depth 10 of 6 layers" in res.output
    assert "plan none, virtual depth 6 of 6 layers" in res.output


def test_bake_stores_the_plan(tiny_models, tmp_path):
    src = tiny_models["qwen2"][2]
    out = tmp_path / "baked.gguf"
    res = run("bake", str(src), "--loop", "1:4x2", "--mix", "ema:0.25", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert str(model_info(out).stored_plan) == "1:4x2/ema:0.25"
    llm = LoopedLlama(str(out), n_ctx=64, verbose=False)  # runs looped by default
    assert str(llm.plan) == "1:4x2/ema:0.25" and llm.virtual_depth == 9
    llm.close()
    # the tensors are byte for byte the same (review T1: this compared the layer count and the type only)
    a, b = model_info(src), model_info(out)
    assert (a.n_layer, a.quant) == (b.n_layer, b.quant)
    ta, tb = ({t.name: t.data.tobytes() for t in gguf.GGUFReader(p).tensors} for p in (src, out))
    assert ta == tb and len(ta) > 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "/no/such/file.gguf"], "no such model file"),
        (["generate", "{notgguf}", "hi"], "is not a GGUF file"),
        (["generate", "{truncated}", "hi"], "truncated"),
        (["generate", "{unsupported}", "hi", "--loop", "1:3x2"], "does not support layer schedules"),
        (["generate", "{llama}", "hi", "--loop", "4:9x2"], "out of range"),
        (["generate", "{llama}", "hi", "--loop", "4-9x2"], "cannot parse plan"),
        (["generate", "{llama}", "hi", "--loop", "1:3x2", "--mix", "blend"], "unknown mix"),
        (["bake", "{llama}", "--loop", "2:9x2", "-o", "{tmp}/x.gguf"], "out of range"),
        (["chat", "no-such-model"], "no such model file"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tiny_models, tmp_path, args, message):
    from tiny import Spec, make_weights, write_model

    llama = tiny_models["llama"][2]
    (tmp_path / "notgguf").write_text("hello")
    (tmp_path / "truncated").write_bytes(llama.read_bytes()[: llama.stat().st_size // 2])
    unsupported = write_model(tmp_path / "refact.gguf", Spec("refact"), make_weights(Spec("llama")))
    paths = {
        "notgguf": tmp_path / "notgguf",
        "truncated": tmp_path / "truncated",
        "unsupported": unsupported,
        "llama": llama,
        "tmp": tmp_path,
    }
    proc = ggufloop(*(a.format(**paths) for a in args), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_unpatched_backend_is_a_clear_error(tiny_models):
    code = (
        "import ggufloop._lib as l; l.PATCHED = False\n"
        "from ggufloop.cli import main; main(['generate', {!r}, 'hi'])".format(str(tiny_models["llama"][2]))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "make backend" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_through_stdin(tiny_models):
    proc = ggufloop(
        "chat",
        str(tiny_models["llama"][2]),
        "--loop",
        "2:4x2",
        "-n",
        "4",
        "--ctx-size",
        "256",
        stdin="t5 t6\n/mix uniform\nt7\n/loop 1:5x3\n/loop 9:12x2\nt8\n/reset\n/quit\n",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan 2:4x2, virtual depth 8 of 6 layers" in out
    assert "(plan 2:4x2/uniform" in out and "(plan 1:5x3/uniform, virtual depth 14" in out  # /loop keeps the mix
    assert "error: block 9:12 is out of range" in out  # a bad /loop keeps the session going
    assert "(conversation cleared)" in out
    assert proc.stderr.count("tok/s") == 3


@pytest.mark.models
def test_chat_on_the_default_model():
    proc = ggufloop(
        "chat",
        "--loop",
        "10:15x3",
        "--mix",
        "uniform",
        "-n",
        "24",
        "--temp",
        "0",
        stdin="What is the capital of France?\n/quit\n",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "plan 10:15x3/uniform, virtual depth 40 of 30 layers" in proc.stdout
    assert "tok/s" in proc.stderr
    answer = proc.stdout.split("> ", 2)[1]
    assert len(answer.strip()) > 10


@pytest.mark.models
def test_serve_answers_with_the_plan(tmp_path):
    from ggufloop import models

    path = models.fetch("smollm2-135m-instruct", quiet=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ggufloop",
            "serve",
            str(path),
            "--loop",
            "10:15x2",
            "--mix",
            "uniform",
            "--port",
            str(port),
            "-c",
            "512",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        body = json.dumps(
            {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "repeat_penalty": 1.0}
        ).encode()  # the server defaults to 1.1
        for _ in range(120):
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
                )
                reply = json.load(urllib.request.urlopen(req, timeout=60))
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not answer")
        llm = LoopedLlama(str(path), loop="10:15x2/uniform", n_ctx=512, verbose=False)
        expected = llm.create_completion("The capital of France is", max_tokens=8, temperature=0, repeat_penalty=1.0)
        llm.close()
        assert reply["choices"][0]["text"] == expected["choices"][0]["text"]
    finally:
        proc.terminate()
        stderr = proc.communicate(timeout=30)[1]
    assert "with plan 10:15x2/uniform" in stderr


def test_help_and_the_plan_codec_do_not_load_llama_cpp():
    code = (
        "import sys\n"
        "import ggufloop.plan, ggufloop.gguf_io\n"
        "from ggufloop.cli import main\n"
        "for args in (['--help'], ['chat', '--help'], ['eval', '--help'], ['sweep', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, args\n"
        "print('llama_cpp' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_chat_compare_answers_again_without_the_plan(tiny_models):
    path = str(tiny_models["llama"][2])
    proc = ggufloop(
        "chat",
        path,
        "--loop",
        "2:4x3",
        "-n",
        "6",
        "--temp",
        "0",
        "-c",
        "256",
        stdin="/compare\nt5 t6\n/compare\nt7\n/quit\n",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "error: /compare needs a message to answer first" in out
    assert "--- without the plan (plan none, virtual depth 6 of 6 layers):" in out
    assert "--- back to plan 2:4x3, virtual depth 10 of 6 layers" in out
    # the unlooped answer is what the unlooped model answers
    llm = LoopedLlama(path, n_ctx=256, verbose=False)
    want = llm.create_chat_completion([{"role": "user", "content": "t5 t6"}], max_tokens=6, temperature=0)
    llm.close()
    unlooped = out.split("--- without the plan (plan none, virtual depth 6 of 6 layers):\n", 1)[1].split("\n", 1)[0]
    assert unlooped == want["choices"][0]["message"]["content"]


@pytest.mark.models
def test_models_path_prints_the_files(tiny_models):
    from ggufloop.models import CATALOG

    res = run("models", "path", "smollm2-135m-instruct", str(tiny_models["llama"][2]))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [str(CATALOG["smollm2-135m-instruct"].path), str(tiny_models["llama"][2])]
    bad = run("models", "path", "no-such-model")
    assert bad.exit_code == 1 and bad.output.startswith("error: ") and bad.output.count("\n") == 1


@pytest.mark.parametrize("kind", ["dangling link", "file"])
def test_models_fetch_into_a_models_folder_that_is_not_one_is_one_error_line(tmp_path, kind):
    """A models folder that is a dangling symlink (its target moved or deleted) or a plain file: `models fetch`
    says so in one line, before any download (a FileExistsError traceback before)."""
    where = tmp_path / "models"
    if kind == "file":
        where.write_text("")
    else:
        where.symlink_to(tmp_path / "moved")
    env = {**os.environ, "GGUFLOOP_MODELS": str(where)}
    proc = subprocess.run(
        [sys.executable, "-m", "ggufloop", "models", "fetch", "smollm2-135m-instruct"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(where) in lines[0], proc.stderr
    assert ("moved" in lines[0]) == (kind == "dangling link"), lines[0]
