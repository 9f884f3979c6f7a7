"""The loop on a GPU: a CUDA (or Metal) build's logits under every kind of plan against the same build on the
CPU, with every layer offloaded and with a block that crosses the CPU/GPU boundary, and no op of a plan left
to the CPU. Deselected unless `-m gpu` asks (tools/gpu-check does, on a GPU machine); the backend tests
themselves run there too, offloaded through GGUFLOOP_TEST_NGL (tests/conftest.py).

With GGUFLOOP_GPU_REPORT=FILE every comparison appends a JSON line (test, arch, plan, layers offloaded,
max relative error, tolerance, graph splits) for docs/gpu.md's table.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from conftest import PROMPT, eval_logits, logits, open_model, rel_err

pytestmark = pytest.mark.gpu

# CPU against GPU, F32 weights and KV: different kernels (cuBLAS, the MMQ/MMF paths, other reduction orders)
# round differently; 1e-3 of the largest logit is a hundred times float32's error over these depths and
# far below what a wrong schedule moves (a pass more or less changes logits by tens of percent)
GPU_TOL = 1e-3
ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
PLANS = (
    "1:5x3",
    "1:5x3/uniform",
    "2:4x4/ema",
    "1:5x2/autoalign",
    "1:5x3/noise",
    "1:5x3/euler",
    "2:5x3/anchored",
    "1:4x3/inputanchor",
    "1:5x3/paper-ema",
    "0:6x2",
    "0:3,1:6",
)


@pytest.fixture(scope="module", autouse=True)
def _a_gpu():
    from ggufloop import _lib

    # GGUFLOOP_GPU_CHECK_CPU=1: the GPU check's dry run on a CPU build (tools/gpu-check --cpu), which proves
    # these tests run (plans, logs, report) where "GPU" and CPU are the same device
    gpus = [
        _lib.ggml_backend_dev_get(i)
        for i in range(_lib.ggml_backend_dev_count())
        if _lib.ggml_backend_dev_type(_lib.ggml_backend_dev_get(i)) == _lib.GGML_BACKEND_DEVICE_TYPE_GPU
    ]
    if not (gpus or os.environ.get("GGUFLOOP_GPU_CHECK_CPU") == "1"):
        pytest.skip("no GPU: this build has no GPU backend, or the machine has no device it can use")


def _report(**row) -> None:
    path = os.environ.get("GGUFLOOP_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _cpu(path, plan) -> np.ndarray:
    """The same build, everything on the CPU (no layer offloaded, no op offloaded)."""
    return logits(path, loop=plan, n_gpu_layers=0, op_offload=False)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_on_the_gpu_equals_the_cpu(tiny_models, arch, plan):
    _, _, path = tiny_models[arch]
    gpu = logits(path, loop=plan, n_gpu_layers=-1)
    err = rel_err(gpu, _cpu(path, plan))
    _report(test="all layers on the GPU", arch=arch, plan=plan, ngl=-1, rel_err=err, tol=GPU_TOL)
    assert err < GPU_TOL, f"{arch} {plan}: GPU against CPU {err:.2e}"


@pytest.mark.parametrize("plan", ("1:5x3@kv=first", "1:5x3/uniform@kv=last", "2:5x3/anchored@bypass@kv=first"))
@pytest.mark.parametrize("arch", ("llama", "gemma3"))
def test_kv_modes_over_ubatches_on_the_gpu_equal_the_cpu(tiny_models, arch, plan):
    """One KV slot per block layer (the KV cache's layer reuse, and first's second write of pass 0's K/V) on
    the GPU: the prompt in ubatches of 5, where the modes differ from exact."""
    _, _, path = tiny_models[arch]
    gpu = logits(path, loop=plan, step=5, n_gpu_layers=-1)
    err = rel_err(gpu, logits(path, loop=plan, step=5, n_gpu_layers=0, op_offload=False))
    _report(test="KV modes over ubatches", arch=arch, plan=plan, ngl=-1, rel_err=err, tol=GPU_TOL)
    assert err < GPU_TOL, f"{arch} {plan}: GPU against CPU {err:.2e}"


@pytest.mark.parametrize("plan", ("1:5x3", "1:5x3/uniform", "2:5x3/anchored", "0:3,1:6"))
@pytest.mark.parametrize("ngl", (2, 3, 4))
def test_a_block_across_the_cpu_gpu_boundary_equals_the_cpu(tiny_models, plan, ngl):
    """The last ngl physical layers of 6 on the GPU: each plan's block has layers on both sides."""
    _, _, path = tiny_models["llama"]
    split = logits(path, loop=plan, n_gpu_layers=ngl)
    err = rel_err(split, _cpu(path, plan))
    _report(test="block across the boundary", arch="llama", plan=plan, ngl=ngl, rel_err=err, tol=GPU_TOL)
    assert err < GPU_TOL, f"{plan} with {ngl} layers on the GPU: {err:.2e}"


def _graph_splits(path, plan, capfd) -> int:
    """llama.cpp's count of graph splits (backend changes) with every layer on the GPU, from its log."""
    capfd.readouterr()
    llm = open_model(path, loop=plan, n_gpu_layers=-1, verbose=True)
    eval_logits(llm, PROMPT)
    llm.close()
    # "graph: nodes = N, splits = S, ..." or, where prompt and generation graphs differ, "splits = S_pp / S_tg"
    found = re.findall(r"graph.*: nodes = [0-9 /]+, splits = (\d+)(?: / (\d+))?", capfd.readouterr().err)
    assert found, "llama.cpp printed no graph split count"
    return max(int(n) for n in found[-1] if n)


@pytest.mark.parametrize("plan", PLANS)
def test_no_op_of_a_plan_falls_back_to_the_cpu(tiny_models, plan, capfd):
    """An op the GPU backend lacks runs on the CPU and adds splits: a plan must split the graph no more than
    the unlooped model does."""
    _, _, path = tiny_models["llama"]
    base, looped = _graph_splits(path, None, capfd), _graph_splits(path, plan, capfd)
    _report(test="graph splits", arch="llama", plan=plan, ngl=-1, splits=looped, unlooped_splits=base)
    assert looped <= base, f"{plan}: {looped} graph splits against {base} unlooped"
