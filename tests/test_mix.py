"""Regularized looping: the backend's mixes against the numpy reference, and their properties."""

from __future__ import annotations

import numpy as np
import pytest

from ggufloop import BackendError, LoopPlan, PlanError

from conftest import PROMPT, TOL, eval_logits, logits, open_model, rel_err
from reference import forward

MIXES = ["none", "uniform", "ema:0.3", "autoalign", "autoalign:0.05", "noise:7"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_unlooped_model_matches_numpy(tiny_models, arch):
    spec, weights, path = tiny_models[arch]
    assert rel_err(logits(path), forward(spec, weights, PROMPT)) < TOL[arch]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("mix", MIXES)
def test_mix_matches_numpy(tiny_models, arch, count, mix):
    spec, weights, path = tiny_models[arch]
    plan = LoopPlan.parse(f"1:4x{count}/{mix}")
    m = plan.mix
    ref = forward(spec, weights, PROMPT, plan.start, plan.end, plan.count, m.name, m.beta, m.temperature, m.seed)
    assert rel_err(logits(path, plan), ref) < TOL[arch]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mix", MIXES)
def test_mix_with_block_at_the_last_layer(tiny_models, arch, mix):
    """The block ends at the last layer: llama.cpp prunes the rows to the outputs there."""
    spec, weights, path = tiny_models[arch]
    plan = LoopPlan.parse(f"3:6x3/{mix}")
    m = plan.mix
    ref = forward(spec, weights, PROMPT, 3, 6, 3, m.name, m.beta, m.temperature, m.seed)
    assert rel_err(logits(path, plan), ref) < TOL[arch]
    # only the last position's logits: the pruned path
    llm = open_model(path, plan)
    llm.reset()
    llm.eval(PROMPT)
    last = np.array(llm.scores[len(PROMPT) - 1])
    llm.close()
    assert rel_err(last, ref[-1]) < TOL[arch]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_mixing_properties(tiny_models, arch):
    _, _, path = tiny_models[arch]
    base = logits(path)
    naive = logits(path, "1:4x3")
    assert rel_err(logits(path, "1:4x3/ema:0"), base) < 1e-5
    assert rel_err(logits(path, "1:4x3/autoalign:1e-6"), base) < 1e-5
    assert rel_err(logits(path, "1:4x3/ema:1"), naive) < 1e-6
    assert np.array_equal(logits(path, "1:4x1/uniform"), base)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mix", MIXES)
def test_incremental_decoding_matches_full_prompt(tiny_models, arch, mix):
    _, _, path = tiny_models[arch]
    llm = open_model(path, f"1:4x3/{mix}")
    full = eval_logits(llm, PROMPT)
    assert rel_err(eval_logits(llm, PROMPT, step=1), full) < TOL[arch]
    assert rel_err(eval_logits(llm, PROMPT, step=6), full) < TOL[arch]
    llm.close()


def test_mix_changes_without_reloading(tiny_models):
    _, _, path = tiny_models["qwen2"]
    llm = open_model(path, "1:4x3")
    for mix in ("uniform", "ema:0.3", "none", "autoalign"):
        llm.set_mix(mix)
        assert str(llm.mix) == mix
        assert np.array_equal(eval_logits(llm, PROMPT), logits(path, f"1:4x3/{mix}"))
    llm.close()


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("1:4x3/average", "unknown mix"),
        ("1:4x3/ema:1.5", r"beta must be in \[0, 1\]"),
        ("1:4x3/autoalign:0", "temperature must be > 0"),
        ("0:3,2:6/uniform", "needs a start:end xcount plan"),
    ],
)
def test_bad_mixes_are_refused_in_python(bad, reason):
    with pytest.raises(PlanError, match=reason):
        LoopPlan.parse(bad)


def test_bad_mixes_are_refused_by_the_backend(tiny_models):
    _, _, path = tiny_models["llama"]
    from ggufloop import LoopedLlama

    for kv, reason in [
        ({"ggufloop.loop.mix": "average"}, "unknown mix 'average'"),
        ({"ggufloop.loop.beta": 2.0}, r"beta must be in \[0, 1\]"),
        ({"ggufloop.loop.temperature": 0.0}, "temperature must be > 0"),
        ({"ggufloop.loop.mix": "uniform"}, "needs a loop plan"),
        ({"ggufloop.layers": "0:4,2:6", "ggufloop.loop.mix": "ema"}, "needs a loop plan"),
    ]:
        with pytest.raises(BackendError, match=reason):
            LoopedLlama(str(path), kv_overrides=kv, verbose=False)
    llm = open_model(path, "0:3,2:6")
    with pytest.raises(BackendError, match="general layer schedule"):
        llm.set_mix("uniform")
    llm.close()
