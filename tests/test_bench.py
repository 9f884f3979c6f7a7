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
