"""KV modes (@kv=first, @kv=last): one KV slot per block layer instead of one per pass. The backend against
the numpy reference (tests/support/reference.py), evaluated in several ubatches, where the modes differ
from exact; the KV cache's size; switching modes on a loaded model; and the refusals."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from ggufloop import BackendError, LoopPlan, PlanError

from conftest import PROMPT, TOL, eval_logits, logits, open_model, rel_err
from reference import forward

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


def reference(spec, weights, plan: LoopPlan, tokens=PROMPT, step=None, generated=None, kv=None) -> np.ndarray:
    m = plan.mix
    return forward(
        spec, weights, tokens, plan.start, plan.end, plan.count, m.name, m.beta, m.temperature, m.seed,
        param=m.param, generated=generated, kv=kv or plan.kv, step=step,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kv", ["first", "last"])
@pytest.mark.parametrize("mix", ["none", "uniform", "anchored"])
def test_kv_mode_over_ubatches_matches_numpy(tiny_models, arch, kv, mix):
    spec, weights, path = tiny_models[arch]
    plan = LoopPlan.parse(f"1:4x3/{mix}@kv={kv}")
    got = logits(path, plan, step=6)  # 20 tokens in ubatches of 6, 6, 6, 2
    ref = reference(spec, weights, plan, step=6)
    assert rel_err(got, ref) < TOL[arch]
    # not the exact model: across ubatches the later passes attend to pass 0's (or the last pass's) K/V
    assert rel_err(ref, reference(spec, weights, plan, step=6, kv="exact")) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_modes_differ_from_each_other_as_the_reference_does(tiny_models, arch):
    spec, weights, path = tiny_models[arch]
    first, last = (logits(path, f"0:3x3@kv={kv}", step=4) for kv in ("first", "last"))
    plan = LoopPlan.parse("0:3x3")
    assert rel_err(first, reference(spec, weights, plan, step=4, kv="first")) < TOL[arch]
    assert rel_err(last, reference(spec, weights, plan, step=4, kv="last")) < TOL[arch]
    assert rel_err(first, last) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_within_one_ubatch_every_mode_is_exact(tiny_models, arch):
    """All tokens in one ubatch: each pass attends to its own K/V only, in every mode, so the logits are the
    exact plan's, bit for bit, and the reference's."""
    spec, weights, path = tiny_models[arch]
    exact = logits(path, "1:4x3/uniform")
    for kv in ("first", "last"):
        assert np.array_equal(logits(path, f"1:4x3/uniform@kv={kv}"), exact)
    assert rel_err(exact, reference(spec, weights, LoopPlan.parse("1:4x3/uniform"))) < TOL[arch]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("kv", ["first", "last"])
def test_kv_mode_with_decode_bypass_over_chat_turns(tiny_models, arch, kv):
    """The peer's recipe: generated tokens run the block once (decode bypass) and the cache keeps one slot
    per layer; prompts in one ubatch each, generated tokens one by one."""
    spec, weights, path = tiny_models[arch]
    turns = [
        ([1, 17, 5, 42, 8, 33, 60, 12], False),
        ([9, 71, 23], True),
        ([55, 38, 14, 90, 27], False),
        ([3, 66], True),
    ]
    plan = LoopPlan.parse(f"1:4x3/euler@bypass@kv={kv}")
    llm = open_model(path, plan)
    llm.reset()
    for tokens, gen in turns:
        if gen:
            for tok in tokens:
                with llm.generated():
                    llm.eval([tok])
        else:
            llm.eval(tokens)
    tokens = [t for ts, _ in turns for t in ts]
    got = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    sizes = [n for ts, gen in turns for n in ([1] * len(ts) if gen else [len(ts)])]
    mask = np.array([gen for ts, gen in turns for _ in ts])
    assert rel_err(got, reference(spec, weights, plan, tokens, step=sizes, generated=mask)) < TOL[arch]


def _kv_state_bytes(llm) -> int:
    """Bytes of the sequence's KV cache state: proportional to the KV slots that hold its cells."""
    return llama_cpp.llama_state_seq_get_size(llm.ctx, 0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_one_slot_per_layer_is_the_unlooped_models_kv_size(tiny_models, arch):
    spec, _, path = tiny_models[arch]
    sizes = {}
    for plan in ("none", "1:4x3", "1:4x3@kv=first", "1:4x3@kv=last"):
        llm = open_model(path, plan)
        llm.eval(PROMPT)
        sizes[plan] = _kv_state_bytes(llm)
        llm.close()
    assert sizes["1:4x3@kv=first"] == sizes["1:4x3@kv=last"] == sizes["none"]
    L, m, K = spec.n_layer, 3, 3
    # the exact plan keeps L + (K-1)*m slots; the state also holds a header and the cells' positions
    per_slot = (sizes["1:4x3"] - sizes["none"]) / ((K - 1) * m)
    assert per_slot > 0 and sizes["none"] > L * per_slot * 0.9


def test_switching_kv_modes_on_a_loaded_model_equals_loading_each(tiny_models):
    _, _, path = tiny_models["qwen3"]
    llm = open_model(path, "1:4x3")
    try:
        for text in ("1:4x3/uniform@kv=first", "1:4x3/uniform@kv=last", "2:5x2@kv=first", "1:4x3", "none"):
            llm.set_loop(text)
            assert llm.plan == LoopPlan.parse(text)
            assert np.array_equal(eval_logits(llm, PROMPT, step=5), logits(path, text, step=5)), text
    finally:
        llm.close()


def test_a_side_context_runs_the_models_kv_mode(tiny_models):
    spec, weights, path = tiny_models["llama"]
    plan = LoopPlan.parse("1:4x3@kv=last")
    llm = open_model(path, plan)
    try:
        rows = []
        with llm.side_context(n_ctx=64, n_batch=8, n_ubatch=8) as side:
            for i in range(0, len(PROMPT), 8):  # ubatches of 8, 8, 4
                chunk = PROMPT[i : i + 8]
                out = side.decode([(tok, i + k, 0, True) for k, tok in enumerate(chunk)])
                rows += [side.logits(r) for r in out]
    finally:
        llm.close()
    assert rel_err(np.array(rows, dtype=np.float64), reference(spec, weights, plan, step=8)) < TOL["llama"]


@pytest.mark.parametrize(
    "text, why",
    [
        ("1:4x1@kv=first", "count >= 2"),
        ("none@kv=last", "count >= 2"),
        ("0:3,2:5@kv=first", "count >= 2"),
        ("1:4x3@kv=middle", "unknown KV mode 'middle'"),
        ("1:4x3@kv=first@kv=last", "gives the KV mode twice"),
    ],
)
def test_bad_kv_modes_are_refused_with_the_reason(text, why):
    with pytest.raises(PlanError, match=why):
        LoopPlan.parse(text)


def test_the_backend_refuses_a_bad_kv_key_and_a_mode_without_a_plan(tiny_models):
    _, _, path = tiny_models["llama"]
    with pytest.raises(BackendError, match="unknown KV mode 'sometimes'"):
        open_model(path, kv_overrides={"ggufloop.loop.start": 1, "ggufloop.loop.end": 4, "ggufloop.loop.count": 3,
                                       "ggufloop.loop.kv": "sometimes"})  # fmt: skip
    with pytest.raises(BackendError, match="count >= 2"):
        open_model(path, kv_overrides={"ggufloop.loop.kv": "first"})
    llm = open_model(path, "1:4x3")
    try:
        from ggufloop import _lib

        assert _lib.llama_model_set_loop_kv(llm.model, b"first") == -1  # a context of the model exists
        assert "context(s) of this model exist" in _lib.last_error()
        llm.set_loop("1:4x3@kv=first")
        assert llm.kv == "first"
    finally:
        llm.close()


def test_bake_stores_the_kv_mode(tiny_models, tmp_path):
    from ggufloop.gguf_io import metadata, open_gguf, write_plan

    _, _, path = tiny_models["llama"]
    out = write_plan(path, tmp_path / "baked.gguf", LoopPlan.parse("1:4x3/uniform@kv=first"))
    assert metadata(open_gguf(out))["ggufloop.loop.kv"] == "first"
    llm = open_model(out)
    try:
        assert str(llm.plan) == "1:4x3/uniform@kv=first"
    finally:
        llm.close()
