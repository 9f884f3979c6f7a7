"""Block rules, the paper code's weights, weight tables and decode bypass: the backend against the numpy
reference (tests/support/reference.py), and the rules' defining properties."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from ggufloop import BackendError, LoopPlan, PlanError
from ggufloop.plan import Mix

from conftest import PROMPT, TOL, eval_logits, logits, open_model, rel_err
from reference import forward, paper_row

RULES = ["euler", "euler:0.5", "anchored", "anchored:0.3", "inputanchor:0.7", "momentum", "momentum:0.9"]
RULES += ["paper-no", "paper-uniform", "paper-ema:0.3"]
TABLE = "weights:[[1,0,0],[0.25,0.75,0],[0.5,-0.25,0.75]]"


def reference(spec, weights, plan: LoopPlan, tokens=PROMPT, generated=None) -> np.ndarray:
    m = plan.mix
    table = np.array(plan.weights()).reshape(plan.end - plan.start, plan.count, plan.count) if m.table else None
    return forward(
        spec, weights, tokens, plan.start, plan.end, plan.count, m.name, m.beta, m.temperature, m.seed,
        param=m.param, table=table, generated=generated,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("mix", [*RULES, TABLE])
def test_rule_matches_numpy(tiny_models, arch, mix):
    spec, weights, path = tiny_models[arch]
    plan = LoopPlan.parse(f"1:4x3/{mix}")
    assert rel_err(logits(path, plan), reference(spec, weights, plan)) < TOL[arch]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize(
    "plan",
    [
        "0:3x2/euler:0.5",
        "0:2x3/anchored",
        "0:3x3/inputanchor:0.7",
        "3:6x3/anchored:0.3",
        "0:3x4/momentum",
        "3:6x3/momentum:0.8",
    ],
)
def test_block_rule_at_the_first_and_last_layers(tiny_models, arch, plan):
    """x0 is the input of layer 0 (the scaled embeddings on gemma3); at the last layer the rows are pruned."""
    spec, weights, path = tiny_models[arch]
    plan = LoopPlan.parse(plan)
    assert rel_err(logits(path, plan), reference(spec, weights, plan)) < TOL[arch]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rule_properties(tiny_models, arch):
    spec, weights, path = tiny_models[arch]
    base = logits(path)
    naive = logits(path, "1:4x3")
    assert rel_err(logits(path, "1:4x3/euler:1"), naive) < 1e-6
    assert rel_err(logits(path, "1:4x3/inputanchor:1"), naive) < 1e-6
    for count in (1, 2, 3, 6):  # anchored:1 is the unlooped model for any K
        assert rel_err(logits(path, f"1:4x{count}/anchored:1"), base) < 1e-6
    assert rel_err(logits(path, "1:4x1/euler"), base) < 1e-6  # h = 1/K = 1
    # the same weights, summed in another order (gemma3: through the fp16 GELU table)
    assert rel_err(logits(path, "1:4x3/paper-uniform"), logits(path, "1:4x3/uniform")) < 1e-5
    ema = logits(path, "1:4x3/ema:0.3")
    assert rel_err(logits(path, "1:4x3/weights:[[1,0,0],[0.7,0.3,0],[0.7,0,0.3]]"), ema) < 1e-5
    # heavy ball without momentum is damped Euler; at K = 1 it has no earlier step, so it is the model
    assert rel_err(logits(path, "1:4x3/momentum:0"), logits(path, "1:4x3/euler")) < 1e-6
    assert rel_err(logits(path, "1:4x1/momentum:0.9"), base) < 1e-6
    assert rel_err(logits(path, "1:4x3/momentum:0.9"), logits(path, "1:4x3/euler")) > 1e-3
    # a K = 1 block rule still acts: x1 = x0 + h (g(x0) - x0)
    plan = LoopPlan.parse("1:4x1/euler:0.5")
    assert rel_err(logits(path, plan), reference(spec, weights, plan)) < TOL[arch]


def test_paper_rows_are_the_published_codes():
    """docs/method.md's rows: the softmax of the code's preset rows."""
    assert np.allclose(paper_row("paper-no", 1, 0), [0.269, 0.731], atol=5e-4)
    assert np.allclose(paper_row("paper-no", 3, 0), [0.175, 0.175, 0.175, 0.475], atol=5e-4)
    assert np.allclose(paper_row("paper-ema", 2, 0.5), [0.384, 0.233, 0.384], atol=5e-4)
    assert np.allclose(paper_row("paper-ema", 3, 0.5), [0.311, 0.189, 0.189, 0.311], atol=5e-4)
    assert np.allclose(paper_row("paper-uniform", 2, 0), [1 / 3] * 3)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mix", ["euler", "anchored", "inputanchor:0.7", "momentum", "paper-no", TABLE])
def test_incremental_decoding_matches_full_prompt(tiny_models, arch, mix):
    _, _, path = tiny_models[arch]
    llm = open_model(path, f"1:4x3/{mix}")
    full = eval_logits(llm, PROMPT)
    assert rel_err(eval_logits(llm, PROMPT, step=1), full) < TOL[arch]
    assert rel_err(eval_logits(llm, PROMPT, step=6), full) < TOL[arch]
    llm.close()


# -- decode bypass ------------------------------------------------------------------------------

TURNS = [([1, 17, 5, 42, 8, 33, 60, 12], "prompt"), ([9, 71, 23, 4], "gen"), ([55, 38, 14, 90, 27], "prompt"),
         ([3, 66, 11], "gen")]  # fmt: skip


def _chat(llm, turns, flag: bool = True) -> np.ndarray:
    """Two chat turns: prompts evaluated at once, generated tokens one by one (as generated tokens when flag)."""
    llm.reset()
    for tokens, kind in turns:
        if kind == "prompt":
            llm.eval(tokens)
        else:
            for tok in tokens:
                with llm.generated() if flag else contextlib.nullcontext():
                    llm.eval([tok])
    n = sum(len(t) for t, _ in turns)
    return np.array(llm.scores[:n], dtype=np.float64)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("mix", ["none", "anchored", "momentum", "uniform", "paper-ema"])
def test_bypass_over_two_chat_turns_matches_numpy(tiny_models, arch, mix):
    spec, weights, path = tiny_models[arch]
    plan = LoopPlan.parse(f"1:4x3/{mix}@bypass")
    tokens = [tok for t, _ in TURNS for tok in t]
    generated = np.array([kind == "gen" for t, kind in TURNS for _ in t])
    llm = open_model(path, plan)
    assert llm.plan == plan
    got = _chat(llm, TURNS)
    llm.close()
    ref = reference(spec, weights, plan, tokens, generated)
    assert rel_err(got, ref) < TOL[arch]
    # not the looped model: generated tokens did run the block once
    assert rel_err(ref, reference(spec, weights, plan, tokens)) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bypass_with_two_sequences_in_one_batch(tiny_models, arch):
    spec, weights, path = tiny_models[arch]
    plan = LoopPlan.parse("1:4x3/euler@bypass")
    seqs = [[1, 17, 5, 42, 8, 33], [60, 12, 9, 71, 23]]
    gens = [[4, 55], [38, 14]]
    turn2 = [[90, 27, 3], [66, 11, 5, 7]]
    llm = open_model(path, plan)
    got: list[list[np.ndarray]] = [[], []]
    with llm.side_context(n_ctx=128, n_batch=64, n_seq=2) as side:

        def run(chunks, start, generated):
            entries = [(tok, start[s] + i, s, True) for s in (0, 1) for i, tok in enumerate(chunks[s])]
            rows = side.decode(entries, generated=generated)
            for row, (_, _, s, _) in zip(rows, entries, strict=True):
                got[s].append(side.logits(row))

        run(seqs, [0, 0], False)
        for k in range(2):  # one generated token per sequence per batch
            run([[gens[0][k]], [gens[1][k]]], [len(seqs[0]) + k, len(seqs[1]) + k], True)
        run(turn2, [len(seqs[0]) + 2, len(seqs[1]) + 2], False)
    llm.close()
    for s in (0, 1):
        tokens = seqs[s] + gens[s] + turn2[s]
        mask = np.array([False] * len(seqs[s]) + [True] * 2 + [False] * len(turn2[s]))
        ref = reference(spec, weights, plan, tokens, mask)
        assert rel_err(np.array(got[s]), ref) < TOL[arch]


def test_decode_full_is_todays_behaviour(tiny_models):
    _, _, path = tiny_models["qwen2"]
    llm = open_model(path, "1:4x3/uniform")
    assert llm.decode == "full"
    assert np.array_equal(_chat(llm, TURNS), _chat(llm, TURNS, flag=False))
    llm.set_decode("bypass")
    assert str(llm.plan) == "1:4x3/uniform@bypass"
    llm.set_mix("anchored")  # a new mix keeps the decode mode
    assert str(llm.plan) == "1:4x3/anchored@bypass"
    llm.close()


def test_generate_runs_sampled_tokens_as_generated(tiny_models):
    """Llama.generate's first eval is the prompt, the later ones its sampled tokens."""
    spec, weights, path = tiny_models["llama"]
    plan = LoopPlan.parse("1:4x3/anchored@bypass")
    llm = open_model(path, plan)
    out = []
    for tok in llm.generate(PROMPT[:8], temp=0.0):
        out.append(tok)
        if len(out) == 4:
            break
    scores = np.array(llm.scores[: 8 + 3], dtype=np.float64)
    llm.close()
    mask = np.array([False] * 8 + [True] * 3)
    assert rel_err(scores, reference(spec, weights, plan, PROMPT[:8] + out[:3], mask)) < TOL["llama"]


# -- notation, files and refusals ----------------------------------------------------------------


def test_notation_round_trips():
    for text in ["10:15x6/anchored", "10:15x6/anchored:0.3@bypass", "10:15x3/euler", "10:15x3/euler:0.25",
                 "10:15x3@bypass", "10:15x2/weights:[[1.0,0.0],[0.5,0.5]]", "10:15x3/paper-ema:0.3",
                 "10:15x4/momentum", "10:15x4/momentum:0.25"]:  # fmt: skip
        plan = LoopPlan.parse(text)
        assert str(plan) == text and LoopPlan.parse(str(plan)) == plan
        meta = {key: value for key, _, value in plan.metadata()}
        assert LoopPlan.from_metadata({k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}) == plan
    assert str(LoopPlan.parse("10:15x6/anchored:0.5@full")) == "10:15x6/anchored"
    assert LoopPlan.parse("10:15x6/inputanchor").mix.param == 0.5
    assert LoopPlan.parse("10:15x6/momentum").mix.param == 0.5
    assert LoopPlan.parse("10:15x6/euler").mix.param is None  # 1/K


def test_weight_files(tmp_path):
    rows = [[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]
    (tmp_path / "w.json").write_text(json.dumps(rows))
    np.save(tmp_path / "w.npy", np.array([rows] * 4))  # [m][K][K], the same rows: canonical [K][K]
    a = LoopPlan.parse(f"10:14x3/weights:{tmp_path / 'w.json'}")
    b = LoopPlan.parse(f"10:14x3/weights:{tmp_path / 'w.npy'}")
    assert a == b and str(a) == "10:14x3/weights:[[1.0,0.0,0.0],[0.5,0.5,0.0],[0.2,0.3,0.5]]"
    assert len(a.weights()) == 4 * 9
    (tmp_path / "bad.json").write_text("[[1, 0], [0.5,")
    np.save(tmp_path / "nan.npy", np.array([[1, 0], [np.nan, 0.5]]))
    for spec, reason in [
        (f"10:14x3/weights:{tmp_path / 'bad.json'}", "not valid JSON"),
        (f"10:14x3/weights:{tmp_path / 'nan.npy'}", "not finite"),
        (f"10:14x3/weights:{tmp_path / 'missing.json'}", "not found"),
        ("10:14x2/weights:[[1,0],[0.5]]", "not a 2 x 2 table"),
        ("10:14x2/weights:[[0.5,0.5],[0.5,0.5]]", r"pass 0 is the reference"),
        ("10:14x2/weights:[[1,0.1],[0.5,0.5]]", r"pass 0 is the reference"),
        ("10:14x3/weights:[[1,0,0],[0.5,0.5,0.1],[0.3,0.3,0.4]]", "tau > t"),
        ("10:14x3/weights:[[1,0],[0.5,0.5]]", r"needs \[3\]\[3\] rows or \[4\]\[3\]\[3\]"),
        ("10:14x2/weights:[[[1,0],[0.5,0.5]],[[1,0],[1,0]]]", r"needs \[2\]\[2\] rows or \[4\]\[2\]\[2\]"),
        ("10:14x2/weights:[1,0]", "nested lists"),
        ("10:14x2/weights:", "needs a table"),
        ("10:14x3/euler:1.5", r"must be in \[0, 1\]"),
        ("10:14x3/paper-no:0.5", "takes no parameter"),
        ("0:3,2:6@bypass", "needs a start:end xcount plan"),
    ]:
        with pytest.raises(PlanError, match=reason):
            LoopPlan.parse(spec)


def test_backend_refusals(tiny_models):
    from ggufloop import LoopedLlama
    from ggufloop.runtime import _set_backend_mix

    _, _, path = tiny_models["llama"]
    for kv, reason in [
        ({"ggufloop.loop.mix": "euler", "ggufloop.loop.param": 1.5}, r"must be in \[0, 1\]"),
        ({"ggufloop.loop.mix": "paper-no", "ggufloop.loop.param": 0.5}, "takes no parameter"),
        ({"ggufloop.loop.mix": "weights"}, "needs 27 weights"),
        ({"ggufloop.loop.decode": "sometimes"}, 'must be "full" or "bypass"'),
    ]:
        overrides = {"ggufloop.loop.start": 1, "ggufloop.loop.end": 4, "ggufloop.loop.count": 3, **kv}
        with pytest.raises(BackendError, match=reason):
            LoopedLlama(str(path), kv_overrides=overrides, verbose=False)
    llm = open_model(path, "1:4x2")
    bad = Mix.__new__(Mix)  # a table that Python would refuse, to reach the backend's own check
    object.__setattr__(bad, "name", "weights")
    object.__setattr__(bad, "param", None)
    object.__setattr__(bad, "table", (((1.0, 0.0), (float("inf"), 0.5)),))
    with pytest.raises(BackendError, match="must be finite"):
        _set_backend_mix(llm.ctx, bad, 1, 4)
    assert str(llm.plan) == "1:4x2"
    llm.close()


def test_bake_keeps_rules_tables_and_decode(tiny_models, tmp_path):
    from ggufloop.gguf_io import model_info, write_plan

    spec, weights, path = tiny_models["qwen3"]
    plan = LoopPlan.parse("1:4x3/weights:[[1,0,0],[0.25,0.75,0],[0.5,-0.25,0.75]]@bypass")
    baked = write_plan(path, tmp_path / "baked.gguf", plan)
    assert model_info(baked).stored_plan == plan
    llm = open_model(baked)
    assert llm.plan == plan
    got = eval_logits(llm, PROMPT)
    llm.close()
    assert rel_err(got, reference(spec, weights, plan)) < TOL["qwen3"]
