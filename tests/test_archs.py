"""Layer schedules on every architecture the backend allows, on llama.cpp's own random models
(tests/support/archs.py): a plan equals the physically duplicated file, K = 1 is the model, the mixes'
defining properties hold, incremental decoding equals the whole prompt; on MoE models the routing
freeze reaches the architecture's router. And the designs no schedule can repeat are refused with
the layer and the reason."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ggufloop import BackendError, LoopPlan, _lib
from ggufloop.gguf_io import model_info, write_duplicated

import archs
from conftest import eval_logits, logits, open_model, rel_err

# the minimum set: each must be allowed by the backend
MINIMUM = (
    "gemma2 gemma4 qwen35 qwen35moe qwen2moe qwen3moe gpt-oss mistral3 llama4 phi3 olmo2 granite smollm3 deepseek2 glm4"
).split()

# Blocks of two layers, so that a layer's copies keep the parity of its index: a file written with
# the copies runs the architectures whose layer types follow the index (gemma2's alternating
# sliding-window layers, llama4's interleaved MoE) like the plan, which keeps the physical types.
# A mid block, a block ending at the last layer (pruned rows) and a general schedule.
# The graphs that skip RoPE on every 4th layer by its number (NOPE_BY_NUMBER) run a layer at a number
# of its own kind only: blocks of 4 layers there (the backend refuses the others, with the reason).
NOPE_BY_NUMBER = {"llama4": 4, "smollm3": 4}


def _block(name: str) -> tuple[int, int]:
    """A block of the model that every check can loop."""
    step = NOPE_BY_NUMBER.get(_arch(name))
    return (0, step) if step else (1, 3)


def _plans(name: str, n_layer: int) -> list[str]:
    if _arch(name) in NOPE_BY_NUMBER:
        s, e = _block(name)
        return [f"{s}:{e}x3", f"{n_layer - e + s}:{n_layer}x2", f"{s}:{e},0:{n_layer}"]
    return ["1:3x3", f"{n_layer - 2}:{n_layer}x2", f"0:3,1:{n_layer}"]


PROMPT = [1, 17, 5, 42, 8, 33, 60, 12, 9, 71, 23, 4, 55, 38, 14, 90, 27, 3, 66, 11, 101, 7, 127, 64]

# architectures whose logits are not bit-identical to the duplicated file's on the CPU: the measured
# relative difference and why (none so far: every allowed architecture is exact in F32)
TOLERANCE: dict[str, tuple[float, str]] = {}

# incremental decoding against the whole prompt: a different batch shape sums in another order; the
# bound is this or twice what the duplicated file shows on the CPU at hand, whichever is larger
INCREMENTAL_TOL = 1e-4

EXPLORE = bool(os.environ.get("GGUFLOOP_EXPLORE_ALL_ARCHS"))  # a build that allows every architecture


def _models() -> dict[str, str]:
    """model name (ARCH-dense|moe) -> path, for the architectures under test."""
    folder, status = archs.models()
    allowed = set(_lib.supported_archs())
    return {
        name: str(folder / f"{name}.gguf")
        for name, st in sorted(status.items())
        if st == "ok" and (EXPLORE or name.rsplit("-", 1)[0] in allowed)
    }


MODELS = _models()


def _arch(name: str) -> str:
    return name.rsplit("-", 1)[0]


def _logits(path, plan=None, step=None) -> np.ndarray:
    return logits(path, plan, tokens=PROMPT, step=step, n_ctx=256)


def test_minimum_set_is_allowed():
    assert set(MINIMUM) <= set(_lib.supported_archs())


@pytest.mark.archs
@pytest.mark.parametrize("name", MODELS)
def test_architecture(name, tmp_path):
    """The four checks of one architecture, on one load of each file where it can."""
    path = MODELS[name]
    tol, _why = TOLERANCE.get(_arch(name), (0.0, ""))
    base = _logits(path)
    assert np.isfinite(base).all()
    n_layer = model_info(path).n_layer  # 4; llama4 and gemma4 have their own
    s, e = _block(name)
    for plan in _plans(name, n_layer):
        schedule = LoopPlan.parse(plan).schedule(n_layer)
        dup = write_duplicated(path, tmp_path / f"dup-{plan.replace(':', '_').replace(',', '-')}.gguf", schedule)
        looped, want = _logits(path, plan), _logits(dup)
        if tol == 0.0:
            assert np.array_equal(looped, want), f"{plan}: rel. difference {rel_err(looped, want):.3g}"
        else:
            assert rel_err(looped, want) <= tol, plan
        assert rel_err(looped, base) > 1e-4, f"{plan} does not change the model"

    # K = 1 is the model, with or without a mix; ema:0 is the model, ema:1 naive looping
    assert np.array_equal(_logits(path, f"{s}:{e}x1"), base)
    assert np.array_equal(_logits(path, f"{s}:{e}x1/uniform"), base)
    assert rel_err(_logits(path, f"{s}:{e}x3/ema:0"), base) < 1e-5
    assert rel_err(_logits(path, f"{s}:{e}x3/ema:1"), _logits(path, f"{s}:{e}x3")) < 1e-6

    # incremental decoding: the naive plan equals the duplicated file decoded the same way (one KV slot
    # per pass is exact); the mixed plan stays as near its whole prompt as the duplicated file does
    # to its own on this CPU (batch shapes sum in another order, more so on deeper models)
    plan = f"{s}:{e}x3"
    dup = write_duplicated(path, tmp_path / "dup-incremental.gguf", LoopPlan.parse(plan).schedule(n_layer))
    noise = 0.0
    for step in (1, 5):
        looped, want = _logits(path, plan, step=step), _logits(dup, step=step)
        if tol == 0.0:
            assert np.array_equal(looped, want), f"{plan}, {step} per decode: {rel_err(looped, want):.3g}"
        else:
            assert rel_err(looped, want) <= tol, plan
        noise = max(noise, rel_err(want, _logits(dup)))
    for plan in (f"{s}:{e}x3", f"{s}:{e}x3/uniform"):
        llm = open_model(path, plan, n_ctx=256)
        try:
            full = eval_logits(llm, PROMPT)
            for step in (1, 5):
                err = rel_err(eval_logits(llm, PROMPT, step=step), full)
                assert err < max(INCREMENTAL_TOL, 2 * noise), f"{plan}, {step} per decode: {err:.3g} ({noise:.3g})"
        finally:
            llm.close()


def _moe_layers(path) -> set[int]:
    """The layers with an expert router (an ffn_gate_inp tensor)."""
    from ggufloop.gguf_io import open_gguf

    return {int(t.name.split(".")[1]) for t in open_gguf(path).tensors if ".ffn_gate_inp." in t.name}


@pytest.mark.archs
@pytest.mark.parametrize("name", [n for n in MODELS if _moe_layers(MODELS[n])])
def test_moe_routing_freeze(name):
    """The freeze acts on the architecture's MoE layers (it changes the looped model, so the router goes
    through the hook), is the model at K = 1 and keeps incremental decoding equal to the whole prompt."""
    path = MODELS[name]
    s, e = _block(name)
    assert set(range(s, e)) & _moe_layers(path), "the block has an MoE layer"
    plan = f"{s}:{e}x3"
    assert np.array_equal(_logits(path, f"{s}:{e}x1@freeze"), _logits(path))
    frozen = _logits(path, plan + "@freeze")
    assert not np.array_equal(frozen, _logits(path, plan)), "the freeze does not reach this architecture's router"
    llm = open_model(path, plan + "/uniform@freeze", n_ctx=256)
    try:
        full = eval_logits(llm, PROMPT)
        assert rel_err(eval_logits(llm, PROMPT, step=1), full) < INCREMENTAL_TOL
    finally:
        llm.close()


def test_moe_routing_freeze_needs_an_moe_layer_in_the_block():
    name = "deepseek2-moe"  # layer 0 is dense (leading_dense_block_count = 1)
    assert _moe_layers(MODELS[name]) == {1, 2, 3}
    # at K = 1 (a dense layer moved to another number is refused before: test_a_layer_runs_only_at_...)
    with pytest.raises(BackendError, match="the block 0:1 has no MoE layer"):
        open_model(MODELS[name], "0:1x1@freeze", n_ctx=256)
    open_model(MODELS[name], "0:2x1@freeze", n_ctx=256).close()


@pytest.mark.parametrize(
    "name, plan, reason",
    [
        ("deepseek2-moe", "0:2x3", "layer 0 would run as layer 2, but this model's first 1 layer\\(s\\) are dense"),
        ("deepseek2-moe", "0:2,0:4", "layer 0 would run as layer 2"),
        ("smollm3-dense", "1:3x3", "layer 1 would run as layer 3, but every 4-th layer of this model skips RoPE"),
        ("llama4-moe", "2:4x2", "layer 3 would run as layer 5, but every 4-th layer of this model skips RoPE"),
    ],
)
def test_a_layer_runs_only_at_a_number_of_its_type(name, plan, reason):
    """Graphs that pick a layer's type by its number (dense or MoE, RoPE or not) would run a moved layer as
    another type (a crash, or another function): such schedules are refused, naming the layer."""
    with pytest.raises(BackendError, match=reason):
        open_model(MODELS[name], plan, n_ctx=256)


def test_other_architectures_are_refused_with_the_reason():
    folder, status = archs.models()
    allowed = set(_lib.supported_archs())
    name = next(n for n, st in sorted(status.items()) if st == "ok" and _arch(n) not in allowed)
    with pytest.raises(BackendError, match=f"architecture '{_arch(name)}' does not support layer schedules"):
        open_model(folder / f"{name}.gguf", "1:3x2", n_ctx=256)


def _edited(tmp_path, name: str, values: dict[str, int]) -> str:
    """A generated model with some metadata values changed (the checks run before the tensors load)."""
    import gguf

    from ggufloop.gguf_io import open_gguf, rewrite_gguf

    folder, _ = archs.models()
    arch = _arch(name)
    keys = {f"{arch}.{k}": v for k, v in values.items()}

    def add(writer: gguf.GGUFWriter) -> None:
        for key, value in keys.items():
            if key not in seen:
                writer.add_uint32(key, value)

    seen: set[str] = set()

    def edit(key: str, value):
        if key in keys:
            seen.add(key)
            return keys[key]
        return value

    return str(rewrite_gguf(open_gguf(folder / f"{name}.gguf"), tmp_path / f"{name}-edited.gguf", edit, add))


@pytest.mark.parametrize(
    "name, values, reason",
    [
        (
            "gemma4-dense",
            {"attention.shared_kv_layers": 2},
            "layer 3 reuses the KV cache of an earlier layer \\(cross-layer KV sharing\\)",
        ),
        (
            "gemma4-dense",
            {"embedding_length_per_layer_input": 64},
            "layer 0 reads its own slice of the per-layer token embeddings",
        ),
        ("qwen3moe-moe", {"nextn_predict_layers": 1}, "layer 3 is a next-token-prediction \\(MTP\\) layer"),
    ],
)
def test_designs_that_cannot_be_repeated_are_refused(tmp_path, name, values, reason):
    path = _edited(tmp_path, name, values)
    for plan in ("1:3x2", "0:2,1:4"):
        with pytest.raises(BackendError, match=reason):
            open_model(path, plan, n_ctx=256)


def test_the_documented_list_is_the_backends():
    """README.md and docs/architectures.md list exactly what the backend allows (make archs-doc)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = _archs_doc(root)
    archs = _lib.supported_archs()
    assert doc.readme_block(archs) in (root / "README.md").read_text()
    assert doc.page_block(archs) in (root / "docs" / "architectures.md").read_text()


def _archs_doc(root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("archs_doc", root / "tools" / "archs_doc.py")
    doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(doc)
    return doc


def test_make_archs_doc_keeps_what_is_written_by_hand(tmp_path):
    """S3 of the December review: `make archs-doc` rewrote docs/architectures.md whole, losing its
    hand-written sections; it must replace the marked list only, in both files."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = _archs_doc(root)
    for name in ("README.md", "docs/architectures.md"):
        original = (root / name).read_text()
        copy = tmp_path / Path(name).name
        copy.write_text(original.replace("`llama`", "`not-an-arch`").replace("- llama\n", "- not-an-arch\n"))
        block = doc.readme_block(("x", "y")) if name == "README.md" else doc.page_block(("x", "y"))
        doc.substitute(copy, block)
        before, _, after = original.partition(doc.BEGIN)
        assert copy.read_text() == before + block + after.partition(doc.END)[2]
