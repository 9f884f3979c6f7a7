"""Smoke tests on the real quantized models from models/ (fetched by `make models`)."""

from __future__ import annotations

import re

import llama_cpp
import numpy as np
import pytest
from test_backend import capture_llama_log

from ggufloop import LoopedLlama, models

pytestmark = pytest.mark.models

CASES = [("smollm2-135m-instruct", "10:15x3", 30, 40), ("gemma3-270m", "6:10x3", 18, 26)]


@pytest.mark.parametrize("name, plan, n_layer, n_virtual", CASES)
def test_looped_plan_generates_and_costs_only_kv(name, plan, n_layer, n_virtual):
    path = models.fetch(name, quiet=True)
    seen = {}
    for loop in (None, plan + "/uniform"):
        with capture_llama_log() as log:
            llm = LoopedLlama(str(path), loop=loop, n_ctx=1024, n_threads=2, verbose=False)
        # one line per cache (gemma3 has one for its sliding-window layers and one for the others)
        caches = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells, +(\d+) layers", "".join(log))
        out = llm.create_completion("The capital of France is", max_tokens=12, temperature=0.0)
        text = out["choices"][0]["text"]
        assert out["usage"]["completion_tokens"] > 0 and text.strip()
        seen[loop] = (llama_cpp.llama_model_size(llm._model.model), caches, llm.virtual_depth)
        llm.close()
    (w0, kv0, d0), (w1, kv1, d1) = seen[None], seen[plan + "/uniform"]
    assert (d0, d1) == (n_layer, n_virtual)
    assert w1 == w0
    assert sum(int(c[2]) for c in kv0) == n_layer and sum(int(c[2]) for c in kv1) == n_virtual
    for (size0, cells0, layers0), (size1, cells1, layers1) in zip(kv0, kv1):
        assert cells0 == cells1
        assert float(size1) / int(layers1) == pytest.approx(float(size0) / int(layers0), rel=2e-3)


@pytest.mark.parametrize("name, plan", [("smollm2-135m-instruct", "10:15x2"), ("gemma3-270m", "4:8x3")])
def test_plan_equals_duplicated_quantized_file(name, plan, tmp_path):
    """Same batch shapes, same quantized weights: the plan and the passthrough file agree exactly."""
    from ggufloop.gguf_io import write_duplicated
    from ggufloop.plan import LoopPlan

    path = models.fetch(name, quiet=True)
    n_layer = 30 if name.startswith("smollm2") else 18
    dup = write_duplicated(path, tmp_path / "dup.gguf", LoopPlan.parse(plan).schedule(n_layer))
    tokens = (
        [1, 504, 3458, 282, 4649, 314, 4724, 30, 378, 3458, 282, 7042, 314]
        if name.startswith("smollm2")
        else [2, 818, 5279, 529, 7001, 563, 9079, 236761, 669, 5279, 529, 9405, 563]
    )
    out = {}
    for key, (p, loop) in {"looped": (path, plan), "dup": (dup, "none")}.items():
        llm = LoopedLlama(str(p), loop=loop, n_ctx=128, logits_all=True, n_threads=2, verbose=False)
        llm.eval(tokens)
        out[key] = np.array(llm.scores[: len(tokens)])
        llm.close()
    assert np.array_equal(out["looped"], out["dup"])


@pytest.mark.data
def test_scores_do_not_depend_on_what_is_scored_with_them():
    """On a real quantized model, llama.cpp computes a ubatch that mixes sequences inexactly (its issue 24962):
    scoring that batched several items moved choices by up to 0.6 nats and flipped a few answers in a hundred
    (docs/reproduction/batch-noise.md). An item's score must not depend on the items scored with it or before it."""
    from ggufloop.eval.scoring import Scorer
    from ggufloop.eval.tasks import TASKS

    items = TASKS["winogrande"].items(shots=0, limit=16) + TASKS["arc_easy"].items(shots=0, limit=4)
    scorer = Scorer(str(models.fetch("smollm2-135m-instruct", quiet=True)), "10:15x3/uniform", threads=2)
    try:
        together = scorer.score(items)
        assert together == [scorer.score([it])[0] for it in items]
        assert together[::-1] == scorer.score(items[::-1])
    finally:
        scorer.close()
