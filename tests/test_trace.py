"""Latent trajectories: capture, logit lens, and the trace command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ggufloop.cli import main
from ggufloop.trajectory import capture, load_head, metrics

from conftest import PROMPT, TOL, eval_logits, open_model, rel_err


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_leaves_logits_unchanged_and_lens_reproduces_them(tiny_models, arch):
    _, _, path = tiny_models[arch]
    llm = open_model(path, "2:4x3/uniform")
    states, logits = capture(llm, PROMPT)
    assert states.shape == (10, len(PROMPT), 64) and not np.isnan(states).any()
    assert np.array_equal(logits, eval_logits(llm, PROMPT).astype(np.float32))
    assert rel_err(load_head(path).logits(states[-1]), logits) < TOL[arch]
    llm.close()


def test_pass_zero_is_the_unlooped_model(tiny_models):
    _, _, path = tiny_models["qwen2"]
    llm = open_model(path)
    base, _ = capture(llm, PROMPT)
    llm.set_loop("2:4x3/uniform")
    looped, _ = capture(llm, PROMPT)
    llm.close()
    assert np.array_equal(looped[:4], base[:4])  # layers 0, 1 and pass 0 of the block (2, 3)
    assert not np.allclose(looped[4], base[4])


def test_metrics_line_up_passes(tiny_models):
    _, _, path = tiny_models["llama"]
    llm = open_model(path, "2:4x3")
    states, logits = capture(llm, PROMPT)
    m = metrics(states, logits, llm.schedule, load_head(path), str)
    llm.close()
    assert m["pass"] == [0, 0, 0, 0, 1, 1, 2, 2, 0, 0]
    assert m["cos_prev_pass"][2][0] is None and m["cos_prev_pass"][4][0] is not None
    # the same physical layer's previous pass of virtual layer 6 (layer 2, pass 2) is virtual layer 4
    a, b = states[6].astype(np.float64), states[4].astype(np.float64)
    expect = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert np.allclose(m["cos_prev_pass"][6], expect)
    assert m["rank_of_final"][-1] == [0] * len(PROMPT)
    assert max(m["kl_to_final"][-1]) < 1e-6


def test_trace_command(tiny_models, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "trace",
            str(tiny_models["gemma3"][2]),
            "w1 w2 hello",
            "--loop",
            "1:4x3",
            "--mix",
            "uniform",
            "--compare",
            "none",
            "-o",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(data["runs"]) == {"unlooped", "uniform", "none"}
    assert len(data["runs"]["uniform"]["norm"]) == 12
    assert len(list(tmp_path.glob("*.png"))) == 4
    assert "uniform (1:4x3/uniform): depth 12" in res.output
