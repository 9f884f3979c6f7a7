"""MoE routing freeze (``PLAN@freeze``, key ggufloop.loop.moe): on a tiny qwen3moe model, the backend
against the numpy reference (tests/support/reference.py, whose MoE FFN is written from the architecture's
definition), the freeze's defining properties, and its refusals."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from ggufloop import BackendError, LoopPlan, PlanError

from conftest import PROMPT, eval_logits, logits, open_model, rel_err
from reference import forward
from tiny import MOE_ARCH, Spec, make_weights, write_model

TOL = 1e-4


@pytest.fixture(scope="module")
def moe_model(tiny_dir):
    spec = Spec(MOE_ARCH)
    weights = make_weights(spec, seed=7)
    return spec, weights, write_model(tiny_dir / f"{MOE_ARCH}.gguf", spec, weights)


def reference(spec, weights, plan: LoopPlan, tokens=PROMPT) -> np.ndarray:
    m = plan.mix
    return forward(
        spec,
        weights,
        tokens,
        plan.start,
        plan.end,
        plan.count,
        m.name,
        m.beta,
        m.temperature,
        m.seed,
        param=m.param,
        moe=plan.moe,
    )


@pytest.mark.parametrize("plan", ["none", "1:4x3", "1:4x3/uniform"])
def test_free_routing_matches_numpy(moe_model, plan):
    """The reference's MoE FFN is right: free routing (every pass routes its own input) agrees with llama.cpp."""
    spec, weights, path = moe_model
    plan = LoopPlan.parse(plan)
    assert rel_err(logits(path, plan), reference(spec, weights, plan)) < TOL


def test_a_plan_equals_the_duplicated_file(moe_model, tmp_path):
    spec, weights, path = moe_model
    dup = write_model(tmp_path / "dup.gguf", spec, weights, LoopPlan.parse("1:4x3").schedule(spec.n_layer))
    assert rel_err(logits(path, "1:4x3"), logits(dup)) == 0.0


FROZEN = ["1:4x3@freeze", "0:2x3@freeze", "2:5x4@freeze", "1:4x3/ema:0.3@freeze", "1:4x3/anchored@freeze"]


@pytest.mark.parametrize("plan", FROZEN)
def test_freeze_matches_numpy(moe_model, plan):
    """Later passes take pass 0's experts and gate weights; the experts run on the current input."""
    spec, weights, path = moe_model
    plan = LoopPlan.parse(plan)
    assert rel_err(logits(path, plan), reference(spec, weights, plan)) < TOL


def test_freeze_at_the_last_layer_keeps_the_output_rows(moe_model):
    """A block that ends at the last layer: llama.cpp keeps only the output rows before its last FFN, so the
    frozen routes are taken for those rows."""
    spec, weights, path = moe_model
    plan = LoopPlan.parse("3:6x3@freeze")
    llm = open_model(path, loop=plan, logits_all=False)
    try:
        llm.reset()
        llm.eval(PROMPT)
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the one output row
        last = np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64)
    finally:
        llm.close()
    assert rel_err(last, reference(spec, weights, plan)[-1]) < TOL


def test_freeze_properties(moe_model):
    spec, weights, path = moe_model
    assert rel_err(logits(path, "1:4x1@freeze"), logits(path)) == 0.0  # K = 1: nothing to freeze
    free, frozen = logits(path, "1:4x3"), logits(path, "1:4x3@freeze")
    assert rel_err(frozen, free) > 1e-3  # the routing of later passes matters on this model
    # the routing does change between passes here: the share of (token, block layer, later pass) whose
    # top-k set differs from pass 0's, which the freeze removes
    x = weights["token_embd.weight"][PROMPT].astype(np.float64)
    assert changed_routes(spec, weights, x, 1, 4, 3) > 0.1


def changed_routes(spec, weights, x, start, end, count) -> float:
    """The share of later-pass routes that differ from pass 0's under free routing (numpy)."""
    from reference import layer
    from tiny import layer_weights

    pos = np.arange(len(x))
    for il in range(start):
        x = layer(spec, layer_weights(weights, il), x, pos, False)
    first, changed, total = {}, 0, 0
    for t in range(count):
        for il in range(start, end):
            route: list = []
            x = layer(spec, layer_weights(weights, il), x, pos, False, route)
            chosen = np.sort(route[0][0], axis=-1)
            if t == 0:
                first[il] = chosen
            else:
                changed += int(np.sum(np.any(chosen != first[il], axis=-1)))
                total += len(chosen)
    return changed / total


@pytest.mark.parametrize("step", [1, 7])
def test_incremental_decoding_matches_the_whole_prompt(moe_model, step):
    _, _, path = moe_model
    whole = logits(path, "1:4x3/uniform@freeze")
    assert rel_err(logits(path, "1:4x3/uniform@freeze", step=step), whole) < TOL


def test_set_moe_on_a_live_model(moe_model):
    spec, weights, path = moe_model
    llm = open_model(path, loop="1:4x3")
    try:
        free = eval_logits(llm, PROMPT)
        llm.set_moe("freeze")
        assert str(llm.plan) == "1:4x3@freeze" and llm.moe == "freeze"
        assert rel_err(eval_logits(llm, PROMPT), reference(spec, weights, LoopPlan.parse("1:4x3@freeze"))) < TOL
        llm.set_loop("2:5x2")  # a new plan that does not say: free, the default
        assert llm.moe == "free"
        llm.set_loop("1:4x3/uniform@freeze")
        assert str(llm.plan) == "1:4x3/uniform@freeze"
        llm.set_loop("1:4x3")
        assert rel_err(eval_logits(llm, PROMPT), free) == 0.0
        with pytest.raises(BackendError, match="expected free or freeze"):
            llm.set_moe("sticky")
    finally:
        llm.close()


def test_freeze_is_refused_on_a_dense_model(tiny_models):
    _, _, path = tiny_models["llama"]
    with pytest.raises(BackendError, match="no experts"):
        open_model(path, loop="1:4x3@freeze")
    llm = open_model(path, loop="1:4x3")
    try:
        with pytest.raises(BackendError, match="no experts"):
            llm.set_moe("freeze")
        with pytest.raises(BackendError, match="no experts"):
            llm.set_loop("1:4x2@freeze")
        assert str(llm.plan) == "1:4x3"  # the refused plan changed nothing
    finally:
        llm.close()


def test_the_backend_checks_the_key_itself(moe_model):
    """A key written by another tool reaches llama.cpp unchecked by Python: the loader refuses it itself."""
    overrides = {**LoopPlan.parse("1:4x3").kv_overrides(), "ggufloop.loop.moe": "sticky"}
    with pytest.raises(BackendError, match='ggufloop.loop.moe must be "free" or "freeze", got "sticky"'):
        open_model(moe_model[2], kv_overrides=overrides)


def test_notation():
    assert str(LoopPlan.parse("10:15x3/uniform@freeze@bypass")) == "10:15x3/uniform@bypass@freeze"
    assert LoopPlan.parse("10:15x3@free") == LoopPlan.parse("10:15x3")
    plan = LoopPlan.parse("10:15x3@freeze")
    assert LoopPlan.from_metadata(dict((k, v) for k, _, v in plan.metadata())) == plan
    with pytest.raises(PlanError, match="needs a start:end xcount plan"):
        LoopPlan.parse("none@freeze")
    with pytest.raises(PlanError, match="MoE routing twice"):
        LoopPlan.parse("10:15x3@freeze@free")


def test_the_command_line(moe_model, tiny_models, tmp_path):
    """--moe and PLAN@freeze reach the model; bake stores the routing; a dense model is a one-line error."""
    from click.testing import CliRunner

    from ggufloop.cli import main
    from ggufloop.gguf_io import model_info

    def run(*args: str):
        return CliRunner().invoke(main, list(args))

    path = str(moe_model[2])
    out = tmp_path / "frozen.gguf"
    res = run("bake", path, "--loop", "1:4x3/uniform", "--moe", "freeze", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert str(model_info(out).stored_plan) == "1:4x3/uniform@freeze"
    spec, weights, _ = moe_model
    assert rel_err(logits(out), reference(spec, weights, LoopPlan.parse("1:4x3/uniform@freeze"))) < TOL
    res = run("generate", str(tiny_models["llama"][2]), "w1", "--loop", "1:4x3@freeze", "-n", "2")
    assert res.exit_code == 1 and res.output.startswith("error: ") and "no experts" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
