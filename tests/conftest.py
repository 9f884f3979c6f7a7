"""Shared fixtures: tiny F32 models written once per session, and logits helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks)
from tiny import ARCHS, Spec, make_weights, write_model  # tests/support, on pytest's pythonpath (pyproject.toml)

# tolerance between two F32 computations of one model (batch shapes, numpy): 1e-4; gemma3's GELU
# goes through llama.cpp's fp16 lookup table, whose rounding flips with tiny input differences and
# already puts ~5e-5 between batch shapes of the unlooped model
TOL = {"llama": 1e-4, "qwen2": 1e-4, "qwen3": 1e-4, "gemma3": 3e-4}

PROMPT = [1, 17, 5, 42, 8, 33, 60, 12, 9, 71, 23, 4, 55, 38, 14, 90, 27, 3, 66, 11]  # longer than the gemma3 window


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_models(tiny_dir) -> dict[str, tuple[Spec, dict, Path]]:
    """arch -> (spec, weights, path of the F32 GGUF)."""
    out = {}
    for arch in ARCHS:
        spec = Spec(arch)
        weights = make_weights(spec, seed=ARCHS.index(arch))
        out[arch] = (spec, weights, write_model(tiny_dir / f"{arch}.gguf", spec, weights))
    return out


# layers offloaded by open_model: 0 (the CPU) unless the GPU check (tools/gpu-check) runs the backend tests
# with GGUFLOOP_TEST_NGL=-1 (every layer on the GPU) or N (the last N, a block crossing the CPU/GPU boundary)
TEST_NGL = os.environ.get("GGUFLOOP_TEST_NGL")


def open_model(path, loop=None, n_batch=64, **kw):
    """A LoopedLlama (on the CPU unless GGUFLOOP_TEST_NGL says otherwise) with every position's logits kept
    and an F32 KV cache (an F16 cache alone puts ~3e-4 between batch shapes, looped or not)."""
    from ggufloop import LoopedLlama

    if TEST_NGL is not None:  # else the library's own default (0, or -1 on RPC devices)
        kw.setdefault("n_gpu_layers", int(TEST_NGL))
    kw.setdefault("n_ctx", 128)
    kw.setdefault("logits_all", True)
    kw.setdefault("type_k", 0)  # GGML_TYPE_F32
    kw.setdefault("type_v", 0)
    return LoopedLlama(
        str(path),
        loop=loop,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=2,
        n_threads_batch=2,
        seed=0,
        **kw,
    )


def eval_logits(llm, tokens, step: int | None = None) -> np.ndarray:
    """Logits of every position: the whole prompt at once, or step tokens per call."""
    llm.reset()
    step = step or len(tokens)
    for i in range(0, len(tokens), step):
        llm.eval(tokens[i : i + step])
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def logits(path, loop=None, tokens=PROMPT, step=None, **kw) -> np.ndarray:
    llm = open_model(path, loop=loop, **kw)
    try:
        return eval_logits(llm, tokens, step)
    finally:
        llm.close()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -- test tiers (markers unit, backend, system): `make test-fast` runs unit and backend -----------------------
# every test module is in one tier here; a test of another tier in a module says so with its own marker
TIERS = {
    "unit": ("test_layout", "test_plan", "test_search", "test_stores"),  # pure Python: no llama.cpp
    "backend": (  # llama.cpp in this process, on tiny models (and the packaged ones where marked models)
        "test_archs",
        "test_backend",
        "test_backend_keys",
        "test_eval",
        "test_gpu",
        "test_gsm8k",
        "test_hardening_results",
        "test_kv",
        "test_mix",
        "test_moe",
        "test_perplexity",
        "test_prefix",
        "test_real_models",
        "test_rules",
        "test_trace",
    ),
    "system": (  # other processes: the CLI as users run it, serve, rpc-server, Ray, lm-eval, the builds
        "test_bench",
        "test_cli",
        "test_cluster",
        "test_fuzz",
        "test_gpu_check",
        "test_hardening_server",
        "test_hardening_stores",
        "test_hardening_weights",
        "test_lm_eval",
        "test_models_large",
        "test_robustness",
        "test_rpc",
        "test_serve",
        "test_tools",
        "test_tune",
    ),
}
TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(name) for name in TIERS):
            continue
        module = item.module.__name__.rpartition(".")[2]
        if module not in TIER_OF:
            raise pytest.UsageError(f"{module} is in no test tier: add it to TIERS in tests/conftest.py")
        item.add_marker(TIER_OF[module])
