"""The GPU check's preparation (`make gpu-check-prep`): the patched tree trimmed to what a build needs, small
enough to travel, with every file the builds and the tests need, and the same patched sources as the wheel
this suite runs on. The check itself runs on a GPU machine (tools/gpu-check; its dry run on the CPU is
`make gpu-check-cpu`, docs/gpu.md)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "patches"))

import build  # noqa: E402


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check") / "src.tar.gz"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "patches" / "build.py"), "--source-archive", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_trimmed_tree_has_what_the_builds_need_and_travels(archive):
    top = f"llama_cpp_python-{build.VERSION}"
    names = set(tarfile.open(archive).getnames())
    llama = f"{top}/vendor/llama.cpp"
    needed = [
        f"{top}/CMakeLists.txt",
        f"{top}/pyproject.toml",
        f"{top}/llama_cpp/llama.py",
        f"{llama}/CMakeLists.txt",
        f"{llama}/convert_hf_to_gguf.py",  # llama.cpp's CMake installs it
        f"{llama}/src/llama-loop.cpp",  # the patch series' files
        f"{llama}/ggml/src/ggml-cuda/ggml-cuda.cu",
        f"{llama}/ggml/src/ggml-cpu/ggml-cpu.c",
        f"{llama}/ggml/src/ggml-rpc/ggml-rpc.cpp",
        f"{llama}/common/common.cpp",
        f"{llama}/tests/test-llama-archs.cpp",  # tests/support/archs.py's generator
        f"{llama}/scripts/ui-assets.cmake",  # the server's (empty) web UI table
        f"{llama}/tools/ui/ui.cpp.in",
        f"{llama}/tools/server/server-context.cpp",
    ] + [f"{llama}/tools/{tool}/CMakeLists.txt" for tool in ("rpc", "perplexity", "quantize", "server", "cli", "mtmd")]
    assert not [n for n in needed if n not in names]
    dropped = ("models", "docs", "examples", "tools/ui/src", "ggml/src/ggml-vulkan", "ggml/src/ggml-metal")
    assert not [d for d in dropped if any(n.startswith(f"{llama}/{d}/") for n in names)]
    assert archive.stat().st_size < 16 * 2**20  # the device's working tree is 64 MiB, the whole repo included


def test_the_trimmed_tree_holds_the_patched_sources(archive, tmp_path):
    """Its patched files are the patch series applied to the sdist, byte for byte: the file a patch adds and
    one it edits, against a fresh application."""
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "trimmed", filter="data")
    patches = [(p.name, p.read_bytes()) for p in build.series()]
    fresh = build.patched_source(build.fetch_sdist(build.default_cache()), patches, tmp_path / "fresh")
    trimmed = tmp_path / "trimmed" / fresh.name
    for rel in ("vendor/llama.cpp/src/llama-loop.cpp", "vendor/llama.cpp/src/llama-graph.cpp"):
        assert (trimmed / rel).read_bytes() == (fresh / rel).read_bytes(), rel


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_CACHE_HOME": "/tmp/xdg-abs"},
        {"XDG_CACHE_HOME": "relative/cache"},  # the XDG spec: a relative path is invalid, ignored
        {"XDG_CACHE_HOME": ""},
        {"GGUFLOOP_CACHE": "/tmp/gl-cache", "XDG_CACHE_HOME": "relative"},
    ],
)
def test_the_build_finds_the_cache_where_the_library_does(monkeypatch, env):
    """patches/build.py keeps its own copy of the cache's location (it runs before ggufloop's dependencies
    exist): the two agree on every setting of the variables."""
    from ggufloop import paths

    for name in ("XDG_CACHE_HOME", "GGUFLOOP_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert build.default_cache() == paths.cache_dir()
