"""The plan notation: parsing, printing, validation, metadata keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ggufloop.plan import LoopPlan, Mix, PlanError


@pytest.mark.parametrize(
    "text, schedule",
    [
        ("none", [0, 1, 2, 3, 4, 5]),
        ("2:4x1", [0, 1, 2, 3, 4, 5]),
        ("2:4x3", [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]),
        ("0:6x2", [0, 1, 2, 3, 4, 5] * 2),
        ("0:4,1:6", [0, 1, 2, 3, 1, 2, 3, 4, 5]),
    ],
)
def test_schedule(text, schedule):
    assert LoopPlan.parse(text).schedule(6) == schedule
    assert LoopPlan.parse(text).virtual_depth(6) == len(schedule)


@pytest.mark.parametrize(
    "text",
    [
        "none",
        "10:15x3",
        "10:15x3/uniform",
        "10:15x3/ema:0.3",
        "3:4x2/ema",
        "10:15x3/autoalign:0.5",
        "10:15x3/noise:7",
        "0:20,10:30",
        "5:9x1/autoalign",
    ],
)
def test_round_trip(text):
    plan = LoopPlan.parse(text)
    assert LoopPlan.parse(str(plan)) == plan


def test_defaults_print_short():
    assert str(LoopPlan.parse("10:15x3/ema:0.5")) == "10:15x3/ema"
    assert str(LoopPlan.parse(" 10 : 15 X 3 / Uniform ")) == "10:15x3/uniform"
    assert LoopPlan.parse(None) == LoopPlan.parse("") == LoopPlan.parse("none") == LoopPlan()


@pytest.mark.parametrize(
    "text, reason",
    [
        ("10:15", None),  # a single range is a general schedule, not an error
        ("15:10x3", "need 0 <= start < end"),
        ("10:15x0", "count must be >= 1"),
        ("10-15x3", "cannot parse plan"),
        ("10:15x3/average", "unknown mix"),
        ("10:15x3/ema:2", r"beta must be in \[0, 1\]"),
        ("10:15x3/ema:abc", "bad parameter"),
        ("10:15x3/uniform:3", "takes no parameter"),
        ("10:15x3/autoalign:-1", "temperature must be > 0"),
        ("10:15x3/noise:-1", "seed"),
        ("0:5,5:10/uniform", "needs a start:end xcount plan"),
    ],
)
def test_parse_errors(text, reason):
    if reason is None:
        assert LoopPlan.parse(text).ranges == ((10, 15),)
        return
    with pytest.raises(PlanError, match=reason):
        LoopPlan.parse(text)


def test_validate_against_the_model():
    with pytest.raises(
        PlanError, match=r"the model has 30 layers, so a block is start:end with 0 <= start < end <= 30"
    ):
        LoopPlan.parse("20:40x2").validate(30)
    with pytest.raises(PlanError, match="limit of 512"):
        LoopPlan.parse("0:30x20").validate(30)
    LoopPlan.parse("0:30x17").validate(30)


def test_kv_overrides_round_trip_through_metadata():
    for text in ("10:15x3/ema:0.3", "0:20,10:30", "none", "4:8x2/noise:9"):
        plan = LoopPlan.parse(text)
        assert LoopPlan.from_metadata(plan.kv_overrides()) == plan


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=40))
def test_parsing_never_crashes(text):
    try:
        plan = LoopPlan.parse(text)
    except PlanError:
        return
    assert LoopPlan.parse(str(plan)) == plan


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 40),
    st.integers(1, 20),
    st.integers(1, 6),
    st.sampled_from(["none", "uniform", "ema:0.25", "autoalign:2", "noise:3"]),
)
def test_generated_plans_round_trip(start, size, count, mix):
    plan = LoopPlan(start, start + size, count, mix=Mix.parse(mix))
    assert LoopPlan.parse(str(plan)) == plan
    assert len(plan.schedule(start + size + 3)) == start + size + 3 + (count - 1) * size


def test_mix_lists_keep_inline_weight_tables_whole():
    """tune --mixes and trace --compare split at the commas outside brackets."""
    from ggufloop.cli.options import parse_mixes

    table = "weights:[[1,0,0],[0.5,0.5,0],[0.25,0.25,0.5]]"
    mixes = parse_mixes(f"none, uniform,{table},ema:0.3")
    assert mixes[0] == "none" and mixes[1] == "uniform" and mixes[3] == "ema:0.3"
    assert Mix.parse(mixes[2]).table == Mix.parse(table).table and len(mixes) == 4


def test_the_top_level_help_names_every_mix():
    """Review S8: `ggufloop --help` listed 5 of the mixes."""
    from click.testing import CliRunner

    from ggufloop.cli import main
    from ggufloop.plan import MIXES

    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert [m for m in MIXES if m not in text] == []


def test_the_mix_registry_drives_the_lists_the_help_and_the_readme():
    """plan.MIX_SPECS is the one list of mixes: the backend's rule lists, parsing of every mix with and without
    its parameter, the help of --mix and the README's table (make archs-doc) come from it."""
    from pathlib import Path

    from ggufloop import plan
    from ggufloop.cli.options import MIX_HELP

    assert plan.MIXES == tuple(plan.MIX_SPECS) and set(plan.RULES) == {
        n for n, m in plan.MIX_SPECS.items() if m.is_rule
    }
    for name, spec in plan.MIX_SPECS.items():
        assert spec.notation in MIX_HELP
        if spec.kind == "table":
            continue
        mix = plan.Mix.parse(name)
        assert str(mix) == name and plan.Mix.parse(str(mix)) == mix
        if spec.param:
            value = "7" if name == "noise" else "0.25"
            assert str(plan.Mix.parse(f"{name}:{value}")) == f"{name}:{value}"
        else:
            with pytest.raises(PlanError, match="takes no parameter"):
                plan.Mix.parse(f"{name}:0.25")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"<!-- mixes:begin (make archs-doc) -->\n{plan.mix_table()}\n<!-- mixes:end -->" in readme
