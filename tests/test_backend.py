"""The patched backend's layer schedules, against independent references:
the unlooped model, a file with physically duplicated layers, and incremental decoding."""

from __future__ import annotations

import contextlib
import ctypes
import re

import llama_cpp
import numpy as np
import pytest

from ggufloop import BackendError, LoopedLlama, LoopPlan, _lib

from conftest import PROMPT, TOL, eval_logits, logits, open_model, rel_err
from tiny import ARCHS, Spec, make_weights, write_model

PLANS = ["2:4x3", "1:5x2", "0:6x2", "3:6x3", "0:4,1:6"]  # mid, wide, whole model, block at the end, general


@pytest.mark.parametrize("arch", ARCHS)
def test_count_one_is_bit_identical_to_no_plan(tiny_models, arch):
    _, _, path = tiny_models[arch]
    base = logits(path)
    for plan in ("2:4x1", "0:6x1"):
        assert np.array_equal(logits(path, plan), base), plan


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plan", PLANS)
def test_plan_matches_physically_duplicated_file(tiny_models, tiny_dir, arch, plan):
    spec, weights, path = tiny_models[arch]
    schedule = LoopPlan.parse(plan).schedule(spec.n_layer)
    dup = write_model(tiny_dir / f"{arch}-dup-{plan.replace(':', '_').replace(',', '-')}.gguf", spec, weights, schedule)
    looped = logits(path, plan)
    assert rel_err(looped, logits(dup)) < 1e-5
    assert rel_err(looped, logits(path)) > 1e-3  # the plan does change the model


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_matches_full_prompt(tiny_models, arch):
    _, _, path = tiny_models[arch]
    llm = open_model(path, "2:5x3")
    full = eval_logits(llm, PROMPT)
    assert rel_err(eval_logits(llm, PROMPT, step=1), full) < TOL[arch]
    assert rel_err(eval_logits(llm, PROMPT, step=7), full) < TOL[arch]
    llm.close()


def test_schedule_is_read_back(tiny_models):
    _, _, path = tiny_models["llama"]
    llm = open_model(path, "2:4x3")
    assert llm.n_layer_phys == 6
    assert llm.schedule == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert str(llm.plan) == "2:4x3"
    assert llama_cpp.llama_model_n_layer(llm._model.model) == 10
    llm.close()
    llm = open_model(path, "0:4,1:6")
    assert llm.schedule == [0, 1, 2, 3, 1, 2, 3, 4, 5]
    assert str(llm.plan) == "0:4,1:6"
    llm.close()


def test_change_schedule_of_a_loaded_model(tiny_models):
    _, _, path = tiny_models["qwen3"]
    llm = open_model(path)
    base = eval_logits(llm, PROMPT)
    llm.set_loop("2:4x3")
    assert llm.schedule == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert np.array_equal(eval_logits(llm, PROMPT), logits(path, "2:4x3"))
    llm.set_loop(None)
    assert np.array_equal(eval_logits(llm, PROMPT), base)
    llm.close()


def test_schedule_cannot_change_while_a_context_exists(tiny_models):
    _, _, path = tiny_models["llama"]
    llm = open_model(path, "2:4x2")
    assert _lib.llama_model_set_loop(llm._model.model, 1, 3, 2) == -1
    assert "context" in _lib.last_error()
    assert llm.schedule == [0, 1, 2, 3, 2, 3, 4, 5]
    llm.close()


def _batch_logits(ctx, seqs: dict[int, list[int]], n_vocab: int, first_pos: int = 0) -> dict[int, np.ndarray]:
    """Decode several sequences in one batch; the last position's logits of each."""
    n = sum(len(t) for t in seqs.values())
    batch = llama_cpp.llama_batch_init(n, 0, len(seqs))
    out_idx = {}
    i = 0
    for seq, toks in seqs.items():
        for pos, tok in enumerate(toks):
            batch.token[i] = tok
            batch.pos[i] = first_pos + pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = pos == len(toks) - 1
            if batch.logits[i]:
                out_idx[seq] = i
            i += 1
    batch.n_tokens = n
    assert llama_cpp.llama_decode(ctx, batch) == 0
    res = {
        s: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, j), shape=(n_vocab,)).copy()
        for s, j in out_idx.items()
    }
    llama_cpp.llama_batch_free(batch)
    return res


def test_two_sequences_in_one_batch_and_removing_one(tiny_models):
    _, _, path = tiny_models["gemma3"]
    llm = open_model(path, "2:5x2")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 128, 64, 64, 2
    params.type_k = params.type_v = 0
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)  # a second context, two sequences
    mem, n_vocab = llama_cpp.llama_get_memory(ctx), llm.n_vocab()
    a, b = PROMPT[:12], PROMPT[5:17]

    def alone(tokens):
        llama_cpp.llama_memory_clear(mem, True)
        return _batch_logits(ctx, {0: tokens}, n_vocab)[0]

    ref_a, ref_b, ref_a_next = alone(a), alone(b), alone(a + [7])
    llama_cpp.llama_memory_clear(mem, True)
    both = _batch_logits(ctx, {0: a, 1: b}, n_vocab)
    assert rel_err(both[0], ref_a) < TOL["gemma3"] and rel_err(both[1], ref_b) < TOL["gemma3"]

    assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 1) == -1
    # sequence 0 goes on as if sequence 1 had never been there
    nxt = _batch_logits(ctx, {0: [7]}, n_vocab, first_pos=len(a))
    assert rel_err(nxt[0], ref_a_next) < TOL["gemma3"]
    llama_cpp.llama_free(ctx)
    llm.close()


def test_state_round_trip_and_refusal_under_another_plan(tiny_models):
    _, _, path = tiny_models["llama"]
    llm = open_model(path, "2:4x3")
    eval_logits(llm, PROMPT[:10])
    state = llm.save_state()
    llm.eval(PROMPT[10:15])
    after = np.array(llm.scores[14])
    llm.load_state(state)
    llm.eval(PROMPT[10:15])
    assert np.array_equal(np.array(llm.scores[14]), after)

    llm.set_loop("1:3x3")  # same virtual depth, other layers: the KV cache would not fit
    with pytest.raises(BackendError, match="saved under plan '2:4x3'"):
        llm.load_state(state)
    llm.close()


@pytest.mark.parametrize(
    "plan, reason",
    [
        ("4:9x2", "out of range"),
        ("2:4x0", "count must be >= 1"),
        ("0:6x200", "limit of 512"),
        ("0:4,3:9", "out of range"),
        ("0:6x1/uniform", None),  # fine: a K=1 plan with a mix is the unlooped model
    ],
)
def test_refusals_reach_python_with_the_reason(tiny_models, plan, reason):
    _, _, path = tiny_models["llama"]
    if reason is None:
        open_model(path, plan).close()
        return
    with pytest.raises((BackendError, ValueError), match=reason):
        open_model(path, plan)


def test_a_schedule_without_a_sliding_window_layer_is_refused_not_aborted(tiny_models):
    """gemma3's layer 5 of 6 is its one global-attention layer: a schedule of it alone leaves llama.cpp's iSWA
    cache without a sliding-window layer, which aborted the process creating the context (GGML_ASSERT
    is_swa_any). In a process of its own, so that an abort fails this test instead of ending the run."""
    import subprocess
    import sys

    path = tiny_models["gemma3"][2]
    script = f"""
from ggufloop import BackendError, LoopedLlama
for how in ("load", "switch"):
    try:
        if how == "load":
            LoopedLlama({str(path)!r}, loop="5:6,5:6", n_ctx=64, verbose=False)
        else:
            llm = LoopedLlama({str(path)!r}, n_ctx=64, verbose=False)
            try:
                llm.set_loop("5:6,5:6")
            except BackendError:
                llm.eval([1, 2, 3])  # the model keeps its schedule and runs
                raise
    except BackendError as err:
        print(how, "refused:", err)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the reason reaches Python both ways (a switch lost it before: the calls after the refusal replaced it)
    for how in ("load", "switch"):
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"{how} refused:"))
        assert "the schedule runs none of this model's sliding-window attention layers" in line, proc.stdout


def test_unsupported_architecture_is_refused(tiny_dir):
    spec = Spec("refact")  # llama's tensors, but a graph no test has proven (tests/test_archs.py)
    path = write_model(tiny_dir / "refact.gguf", spec, make_weights(Spec("llama")))
    open_model(path).close()  # loads fine without a plan
    with pytest.raises(BackendError, match="architecture 'refact' does not support layer schedules"):
        open_model(path, "1:3x2")


def test_plan_keys_from_the_file_and_overrides(tiny_models, tiny_dir):
    spec, weights, path = tiny_models["llama"]
    baked = write_model(
        tiny_dir / "baked.gguf",
        spec,
        weights,
        extra_kv={"ggufloop.loop.start": 2, "ggufloop.loop.end": 4, "ggufloop.loop.count": 3},
    )
    llm = open_model(baked)
    assert str(llm.plan) == "2:4x3"
    llm.close()
    llm = open_model(baked, "none")  # an explicit plan overrides the stored one
    assert llm.schedule == list(range(6))
    llm.close()
    with pytest.raises(BackendError, match="start, ggufloop.loop.end and ggufloop.loop.count together"):
        LoopedLlama(str(path), kv_overrides={"ggufloop.loop.start": 1}, verbose=False)
    with pytest.raises(BackendError, match="loop count must be >= 1"):  # past the Python checks
        LoopedLlama(
            str(path),
            kv_overrides={"ggufloop.loop.start": 1, "ggufloop.loop.end": 3, "ggufloop.loop.count": 0},
            verbose=False,
        )


def test_kv_cache_grows_by_the_layer_ratio_and_weights_do_not(tiny_models):
    _, _, path = tiny_models["llama"]
    sizes = {}
    for plan in (None, "2:4x3"):
        with capture_llama_log() as log:
            llm = open_model(path, plan, n_ctx=4096)
        kv = re.search(r"llama_kv_cache: size = +([0-9.]+) MiB \( *4096 cells, +(\d+) layers", "".join(log))
        sizes[plan] = (
            llama_cpp.llama_model_size(llm._model.model),
            llama_cpp.llama_model_n_params(llm._model.model),
            float(kv.group(1)),
            int(kv.group(2)),
        )
        llm.close()
    assert sizes[None][:2] == sizes["2:4x3"][:2]  # weights: same bytes, same parameters
    assert sizes[None][3] == 6 and sizes["2:4x3"][3] == 10
    assert sizes["2:4x3"][2] == pytest.approx(sizes[None][2] * 10 / 6, rel=1e-3)


@contextlib.contextmanager
def capture_llama_log():
    """Collect llama.cpp's log lines while the block runs."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def test_stock_library_is_detected(monkeypatch):
    monkeypatch.setattr(_lib, "PATCHED", False)
    with pytest.raises(BackendError, match="make backend"):
        _lib.require_patched()


def test_back_to_the_unlooped_model_on_a_loaded_model(tiny_models):
    spec, _, path = tiny_models["llama"]
    llm = open_model(path)
    try:
        want = eval_logits(llm, PROMPT)
        for plan in ("1:3x2", "0:4,1:6", "2:4x3/uniform"):
            llm.set_loop(plan)
            llm.set_loop("none")
            assert llm.schedule == list(range(spec.n_layer)) and str(llm.plan) == "none"
            assert np.array_equal(eval_logits(llm, PROMPT), want)
    finally:
        llm.close()


@pytest.mark.system
def test_a_cuda_build_without_nvcc_is_one_line(tmp_path):
    """GGUFLOOP_BACKEND=cuda on a machine without the CUDA toolkit: one line that says what is missing
    and how to get it, before anything is downloaded or built."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    build = Path(__file__).resolve().parent.parent / "patches" / "build.py"
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare), "GGUFLOOP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(build), "--backend", "cuda", "--no-install"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("build: error: the cuda backend needs nvcc")
    assert "/usr/local/cuda/bin" in proc.stderr and not (tmp_path / "cache").exists()


def test_a_load_time_substitution_acts_for_its_own_thread_only():
    """_compat's substitutions of llama-cpp-python classes are scoped: while one thread loads a file whose
    chat template is broken (its formatter tolerates it, and errs only when a chat asks), the same class used
    in another thread meanwhile behaves as llama-cpp-python's own (it raises on the broken template)."""
    import threading

    from llama_cpp import llama_chat_format

    from ggufloop import _compat
    from ggufloop.errors import BackendError

    broken = "{% for m in messages %}{{ m.content }"
    plain = llama_chat_format.Jinja2ChatFormatter
    inside, release, seen = threading.Event(), threading.Event(), {}

    def loader() -> None:
        with _compat.tolerating_broken_templates("the template is broken"):
            seen["loader"] = llama_chat_format.Jinja2ChatFormatter(broken, eos_token="", bos_token="")
            inside.set()
            release.wait(10)

    t = threading.Thread(target=loader)
    t.start()
    assert inside.wait(10)
    try:
        assert llama_chat_format.Jinja2ChatFormatter is not plain  # substituted for the loading thread's load
        with pytest.raises(Exception) as other:
            llama_chat_format.Jinja2ChatFormatter(broken, eos_token="", bos_token="")
        assert not isinstance(other.value, BackendError)  # jinja2's own error, as without ggufloop
    finally:
        release.set()
        t.join(10)
    assert llama_chat_format.Jinja2ChatFormatter is plain
    with pytest.raises(BackendError, match="the template is broken"):
        seen["loader"](messages=[{"role": "user", "content": "hi"}])
