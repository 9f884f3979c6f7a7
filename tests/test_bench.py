"""The benchmark command end to end on a tiny model (the numbers themselves are not asserted)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ggufloop.cli import main


def test_bench_writes_table_plot_and_json(tiny_models, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_models["llama"][2]),
            "--no-stock",
            "--block",
            "2:4",
            "--counts",
            "2",
            "-r",
            "1",
            "--prompt-tokens",
            "16",
            "--decode-tokens",
            "4",
            "-o",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    rows = {r["variant"]: r for r in next(iter(data["models"].values()))["rows"]}
    assert set(rows) == {"patched, no plan", "2:4x2 none"}
    assert rows["2:4x2 none"]["ideal_ratio"] == round(8 / 6, 4)
    assert rows["2:4x2 none"]["weights_mib"] == rows["patched, no plan"]["weights_mib"]
    assert rows["2:4x2 none"]["kv_mib"] > rows["patched, no plan"]["kv_mib"]
    assert (tmp_path / "benchmarks.png").stat().st_size > 1000
    assert "| 2:4x2 none |" in (tmp_path / "benchmarks.md").read_text()
    assert rows["2:4x2 none"]["bypass_decode_tps"] > 0 and rows["patched, no plan"]["bypass_decode_tps"] is None


def test_bench_on_a_gpu_machines_options(tmp_path):
    """What the GPU check asks of bench (tools/gpu-check): chosen mixes at every K, the duplicated file
    without the stock build, layers offloaded, and every variant again with CUDA graphs off, whose ratios
    are taken against the unlooped variant with them off; on an F16 model as tests/support/tiny.py writes one."""
    import dataclasses

    import gguf

    from tiny import BIG, make_weights, write_model

    spec = dataclasses.replace(BIG, n_layer=6, n_embd=128, n_head=2, n_head_kv=1, n_ff=256, n_vocab=512)
    path = write_model(tmp_path / "f16.gguf", spec, make_weights(spec, f16=True))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16 == types["token_embd.weight"]
    args = ["bench", str(path), "--no-stock", "--block", "2:4", "--counts", "2,3", "--mixes", "uniform"]
    args += ["--duplicated", "-ngl", "-1", "--cuda-graphs-off", "-r", "1", "--prompt-tokens", "16"]
    res = CliRunner().invoke(main, args + ["--decode-tokens", "4", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["meta"]["n_gpu_layers"] == -1
    rows = {r["variant"]: r for r in data["models"]["f16"]["rows"]}
    on = ["patched, no plan"] + [
        f"2:4x{k} {v}" for k in (2, 3) for v in ("none", "uniform", "duplicated file (patched)")
    ]
    assert list(rows) == on + [v + " [CUDA graphs off]" for v in on]
    raw = {r["variant"]: r for r in data["models"]["f16"]["raw"]}
    for name in on:
        off = name + " [CUDA graphs off]"
        base_on, base_off = raw["patched, no plan"], raw["patched, no plan [CUDA graphs off]"]
        assert rows[off]["prefill_time_ratio"] == round(base_off["prefill_tps"][0] / raw[off]["prefill_tps"][0], 4)
        assert rows[name]["prefill_time_ratio"] == round(base_on["prefill_tps"][0] / raw[name]["prefill_tps"][0], 4)
    assert (
        rows["2:4x3 duplicated file (patched)"]["ideal_ratio"] == rows["2:4x3 none"]["ideal_ratio"] == round(10 / 6, 4)
    )
    assert rows["2:4x3 uniform"]["vs_naive_prefill"] is not None
    assert rows["2:4x3 duplicated file (patched)"]["weights_mib"] > rows["2:4x3 none"]["weights_mib"]
    res = CliRunner().invoke(main, ["bench", str(path), "--no-stock", "--mixes", "uniform,bogus"])
    assert res.exit_code != 0 and "bogus" in res.output and "Traceback" not in res.output


def test_bench_kv_modes_keep_the_unlooped_models_kv_memory(tiny_models, tmp_path):
    """bench --kv-modes: the KV modes of the naive plan at every K, their KV cache the unlooped model's size
    (as llama.cpp reports it), the exact plan's larger, and their ratios taken against the exact plan."""
    args = ["bench", str(tiny_models["llama"][2]), "--no-stock", "--block", "2:4", "--counts", "2,3", "--mixes", "none"]
    args += ["--kv-modes", "-r", "1", "--prompt-tokens", "16", "--decode-tokens", "4", "-o", str(tmp_path)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = {
        r["variant"]: r
        for r in next(iter(json.loads((tmp_path / "benchmarks.json").read_text())["models"].values()))["rows"]
    }
    assert list(rows) == ["patched, no plan"] + [
        f"2:4x{k} {v}" for k in (2, 3) for v in ("none", "kv=first", "kv=last")
    ]
    for k in (2, 3):
        for kv in ("first", "last"):
            assert rows[f"2:4x{k} kv={kv}"]["kv_mib"] == rows["patched, no plan"]["kv_mib"]
            assert rows[f"2:4x{k} kv={kv}"]["vs_naive_decode"] is not None
        assert rows[f"2:4x{k} none"]["kv_mib"] > rows["patched, no plan"]["kv_mib"]


def test_the_kv_quality_measure_is_llama_perplexitys_kld():
    """bench/measure_kv.py's comparison (perplexity.compare_logprobs): identical distributions give KLD 0 and
    every top the same; otherwise each token's KLD is the sum over the entries with log p > -16 of
    p (log p - log q), by brute force."""
    import math

    import numpy as np

    from ggufloop.eval.perplexity import compare_logprobs as compare
    from ggufloop.numeric import log_softmax

    rng = np.random.default_rng(0)
    lp, lq = log_softmax(rng.normal(size=(5, 50)) * 4), log_softmax(rng.normal(size=(5, 50)) * 4)
    targets = np.array([1, 2, 3, 4, 5])
    same = compare(lp, lp, targets)
    assert np.all(same.kld == 0) and same.same_top.all() and np.all(same.dp == 0)
    got = compare(lq, lp, targets)
    for t in range(5):
        want = sum(math.exp(a) * (a - b) for a, b in zip(lp[t], lq[t], strict=True) if a > -16)
        assert math.isclose(got.kld[t], want, rel_tol=1e-12)
    assert np.allclose(got.nll, -lq[np.arange(5), targets])
