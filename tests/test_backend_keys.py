"""The backend's checks of what it reads: ggufloop.* keys of every type and range, over-long
override strings, tiny autoalign temperatures, damaged hyperparameters.

Every load runs in a child process, so that an abort inside llama.cpp fails one test with the
case that caused it instead of killing pytest; the child reports one JSON line per case.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from tiny import Spec, make_weights, write_model

PLAN = {"ggufloop.loop.start": 2, "ggufloop.loop.end": 4, "ggufloop.loop.count": 3}

# Each case: [path, kv_overrides, n_eval]. The child loads the model with llama_cpp.Llama (kv_overrides
# go through llama-cpp-python unchanged: int -> int64, float -> double, bool, str), evaluates n_eval
# tokens, and prints {"ok": true, ...what the backend runs} or {"ok": false, "error": reason}; the
# reason comes from llama_loop_last_error(), the backend's way of giving it.
CHILD = r"""
import ctypes, json, math, sys
import llama_cpp
from ggufloop import _lib

for path, overrides, n_eval in json.loads(sys.stdin.read()):
    print(json.dumps({"running": [path, repr(overrides)]}), flush=True)
    try:
        llm = llama_cpp.Llama(path, kv_overrides=overrides or None, n_ctx=64, n_batch=16, n_threads=1,
                              n_threads_batch=1, verbose=False)
    except ValueError as err:
        print(json.dumps({"ok": False, "error": _lib.last_error() or "(no reason) " + str(err)}), flush=True)
        continue
    beta, temperature, seed = ctypes.c_float(), ctypes.c_float(), ctypes.c_uint32()
    mix = _lib.llama_get_loop_mix(llm.ctx, ctypes.byref(beta), ctypes.byref(temperature), ctypes.byref(seed))
    out = {"ok": True, "depth": _lib.llama_model_layer_schedule(llm.model, None, 0), "mix": mix.decode(),
           "beta": beta.value, "temperature": temperature.value, "seed": seed.value, "finite": True}
    if n_eval:
        llm.eval(list(range(3, 3 + n_eval)))
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # llm.scores is only filled with logits_all
        out["finite"] = all(math.isfinite(row[i]) for i in range(llm.n_vocab()))
    llm.close()
    print(json.dumps(out), flush=True)
"""


def run_cases(cases: list[tuple]) -> list[dict]:
    """Run the cases in one child; fails with the case that killed it, if one did."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps([[str(p), kv, n] for p, kv, n in cases]),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [line for line in lines if "running" not in line]
    if proc.returncode != 0:
        running = [line["running"] for line in lines if "running" in line][len(results) :]
        pytest.fail(
            f"the child ended with {proc.returncode} (a negative value is a signal) while loading "
            f"{running[0] if running else '?'}\n{proc.stderr[-2000:]}"
        )
    assert len(results) == len(cases), proc.stderr[-2000:]
    return results


def load(path, overrides=None, n_eval=0) -> dict:
    return run_cases([(path, overrides or {}, n_eval)])[0]


def refused(result: dict, *patterns: str) -> str:
    assert not result["ok"], f"loaded, expected a refusal matching {patterns}: {result}"
    reason = result["error"]
    assert "\n" not in reason.strip() and reason.strip(), reason
    for pattern in patterns:
        assert re.search(pattern, reason), f"{pattern!r} not in {reason!r}"
    return reason


class TypedWriter(gguf.GGUFWriter):
    """A GGUFWriter that writes the keys in `typed` with the given type and value, in place of
    what tiny.write_model writes for them (its extra keys and hyperparameters)."""

    typed: dict = {}

    def _typed(self, key, val, write) -> None:
        if key in self.typed:
            vtype, value = self.typed[key]
            self.add_key_value(key, value, vtype)
        else:
            write(key, val)

    def add_uint32(self, key, val):
        self._typed(key, val, super().add_uint32)

    def add_float32(self, key, val):
        self._typed(key, val, super().add_float32)

    def add_string(self, key, val):
        self._typed(key, val, super().add_string)


def write_typed(path: Path, typed: dict, arch: str = "llama") -> Path:
    """A tiny model whose keys in `typed` ({key: (GGUFValueType, value)}) have exactly that type."""
    spec = Spec(arch)
    mp = pytest.MonkeyPatch()
    mp.setattr(TypedWriter, "typed", typed)
    mp.setattr(tiny.gguf, "GGUFWriter", TypedWriter)
    try:
        extra = {k: 0 for k in typed if k.startswith("ggufloop.")}
        return write_model(path, spec, make_weights(spec), extra_kv=extra)
    finally:
        mp.undo()


T = gguf.GGUFValueType


@pytest.fixture(scope="module")
def llama_path(tiny_models) -> Path:
    return tiny_models["llama"][2]


# -- integers are range-checked before any narrowing ---------------------------------------------


def test_integer_overrides_do_not_wrap(llama_path):
    cases = [
        ({**PLAN, "ggufloop.loop.count": 2**32 + 3}, r"ggufloop\.loop\.count = 4294967299 is out of range"),
        ({**PLAN, "ggufloop.loop.start": 2**32 + 10}, r"ggufloop\.loop\.start = 4294967306 is out of range"),
        ({**PLAN, "ggufloop.loop.end": 2**32 + 4}, r"ggufloop\.loop\.end = 4294967300 is out of range"),
        ({**PLAN, "ggufloop.loop.start": -1}, r"ggufloop\.loop\.start = -1 is out of range"),
        (
            {**PLAN, "ggufloop.loop.seed": 2**40},
            r"ggufloop\.loop\.seed = 1099511627776 is out of range \[0, 4294967295\]",
        ),
        ({**PLAN, "ggufloop.loop.seed": -1}, r"ggufloop\.loop\.seed = -1 is out of range"),
        ({**PLAN, "ggufloop.loop.count": 2**31}, r"ggufloop\.loop\.count = 2147483648 is out of range"),
        ({**PLAN, "ggufloop.loop.count": 2**31 - 1}, r"needs \d+ virtual layers, more than llama.cpp's limit of 512"),
    ]
    for (_, reason), result in zip(cases, run_cases([(llama_path, kv, 0) for kv, _ in cases])):
        refused(result, reason)


def test_integer_limits_that_fit_load(llama_path):
    ok = load(llama_path, {**PLAN, "ggufloop.loop.mix": "noise", "ggufloop.loop.seed": 2**32 - 1})
    assert ok["ok"] and ok["seed"] == 2**32 - 1 and ok["depth"] == 10 and ok["mix"] == "noise"


def test_file_integers_of_any_width_are_read_and_range_checked(tmp_path):
    wide = write_typed(
        tmp_path / "wide.gguf",
        {
            "ggufloop.loop.start": (T.INT64, 2),
            "ggufloop.loop.end": (T.INT32, 4),
            "ggufloop.loop.count": (T.UINT8, 3),
            "ggufloop.loop.seed": (T.UINT64, 7),
            "ggufloop.loop.mix": (T.STRING, "noise"),
        },
    )
    big = write_typed(
        tmp_path / "big.gguf",
        {
            "ggufloop.loop.start": (T.UINT64, 2**64 - 1),
            "ggufloop.loop.end": (T.INT32, 4),
            "ggufloop.loop.count": (T.INT32, 3),
        },
    )
    neg = write_typed(
        tmp_path / "neg.gguf",
        {"ggufloop.loop.start": (T.INT32, -2), "ggufloop.loop.end": (T.INT32, 4), "ggufloop.loop.count": (T.INT32, 3)},
    )
    ok, too_big, negative = run_cases([(wide, {}, 0), (big, {}, 0), (neg, {}, 0)])
    assert ok["ok"] and ok["depth"] == 10 and ok["seed"] == 7
    refused(too_big, r"ggufloop\.loop\.start = 18446744073709551615 is out of range")
    refused(negative, r"ggufloop\.loop\.start = -2 is out of range")


# -- every ggufloop.* key of the wrong type is an error naming the key and the type --------------

KEY_TYPES = {  # key -> (expected type in the message, a valid value, wrong values as overrides)
    "ggufloop.loop.start": ("an integer", 2, ["2", 2.0, True]),
    "ggufloop.loop.end": ("an integer", 4, ["4", 4.0, False]),
    "ggufloop.loop.count": ("an integer", 3, ["3", 3.0, True]),
    "ggufloop.loop.seed": ("an integer", 5, ["5", 5.0, True]),
    "ggufloop.layers": ("a string", "0:4,2:6", [5, 0.5, True]),
    "ggufloop.loop.mix": ("a string", "uniform", [3, 1.0, True]),
    "ggufloop.loop.beta": ("a float", 0.3, [3, "0.3", True]),
    "ggufloop.loop.temperature": ("a float", 0.5, [1, "0.5", False]),
}
OVERRIDE_TYPE = {str: "a str", int: "an int", float: "a float", bool: "a bool"}


def _base_for(key: str) -> dict:
    return {} if key == "ggufloop.layers" else dict(PLAN)


def test_override_of_the_wrong_type_is_an_error_naming_key_and_type(llama_path):
    cases = [(key, wrong) for key, (_, _, wrongs) in KEY_TYPES.items() for wrong in wrongs]
    results = run_cases([(llama_path, {**_base_for(key), key: wrong}, 0) for key, wrong in cases])
    for (key, wrong), result in zip(cases, results):
        expected = KEY_TYPES[key][0]
        refused(result, re.escape(f"{key} must be {expected}, got {OVERRIDE_TYPE[type(wrong)]} override"))


def test_file_key_of_the_wrong_type_is_an_error_naming_key_and_type(tmp_path):
    wrong_file_types = {
        "ggufloop.loop.start": (T.FLOAT32, 2.0, "f32"),
        "ggufloop.loop.count": (T.STRING, "3", "str"),
        "ggufloop.loop.seed": (T.BOOL, True, "bool"),
        "ggufloop.layers": (T.UINT32, 5, "u32"),
        "ggufloop.loop.mix": (T.INT32, 3, "i32"),
        "ggufloop.loop.beta": (T.UINT32, 3, "u32"),
        "ggufloop.loop.temperature": (T.STRING, "0.5", "str"),
    }
    cases = []
    for key, (vtype, value, _) in wrong_file_types.items():
        typed = {k: (T.UINT32, v) for k, v in _base_for(key).items()}
        typed[key] = (vtype, value)
        cases.append((write_typed(tmp_path / f"{key}.gguf", typed), {}, 0))
    for (key, (_, _, got)), result in zip(wrong_file_types.items(), run_cases(cases)):
        refused(result, re.escape(f"{key} must be {KEY_TYPES[key][0]}, got {got}"))


def test_valid_values_of_every_key_load(llama_path):
    plan = run_cases(
        [
            (llama_path, {**PLAN, "ggufloop.loop.mix": "ema", "ggufloop.loop.beta": 0.3}, 0),
            (llama_path, {**PLAN, "ggufloop.loop.mix": "autoalign", "ggufloop.loop.temperature": 0.5}, 0),
            (llama_path, {"ggufloop.layers": "0:4,2:6"}, 0),
        ]
    )
    assert plan[0]["ok"] and plan[0]["mix"] == "ema" and math.isclose(plan[0]["beta"], 0.3, rel_tol=1e-6)
    assert plan[1]["ok"] and plan[1]["mix"] == "autoalign" and plan[1]["temperature"] == 0.5
    assert plan[2]["ok"] and plan[2]["depth"] == 8


# -- override strings are read within their 128-byte field ---------------------------------------


def test_override_string_of_exactly_128_bytes_is_read_within_its_field(llama_path):
    junk = "x" * 128
    valid = "0:6," * 30 + "000:0006"  # 31 ranges of 6 layers
    assert len(valid) == 128
    bad, good, bad_mix = run_cases(
        [
            (llama_path, {"ggufloop.layers": junk}, 0),
            (llama_path, {"ggufloop.layers": valid}, 0),
            (llama_path, {**PLAN, "ggufloop.loop.mix": junk}, 0),
        ]
    )
    reason = refused(bad, "bad range")
    assert re.search(r"in layer schedule '([^']*)'", reason).group(1) == junk
    assert good["ok"] and good["depth"] == 31 * 6
    assert re.search(r"unknown mix '([^']*)'", refused(bad_mix)).group(1) == junk


# -- autoalign temperatures at which float32 stays finite ----------------------------------------


def test_temperatures_that_make_the_weights_nan_are_refused(llama_path):
    auto = {**PLAN, "ggufloop.loop.mix": "autoalign"}
    cases = [
        (1e-40, r"temperature 1e-40 is too small: 1/T must be finite in float32"),
        (2e-39, "too small"),
        (1e-300, "too small"),
        (0.0, "temperature must be > 0"),
        (-1.0, "temperature must be > 0"),
        (math.inf, "must be > 0 and finite"),
        (math.nan, "must be > 0 and finite"),
    ]
    for (_, reason), result in zip(
        cases, run_cases([(llama_path, {**auto, "ggufloop.loop.temperature": t}, 0) for t, _ in cases])
    ):
        refused(result, reason)


def test_small_normal_temperatures_work_and_are_not_rounded(llama_path):
    auto = {**PLAN, "ggufloop.loop.mix": "autoalign"}
    small, smallest = run_cases(
        [
            (llama_path, {**auto, "ggufloop.loop.temperature": 1e-7}, 8),
            (llama_path, {**auto, "ggufloop.loop.temperature": 3e-39}, 8),
        ]
    )
    assert small["ok"] and small["finite"] and small["temperature"] > 0
    assert math.isclose(small["temperature"], 1e-7, rel_tol=1e-6)
    assert smallest["ok"] and smallest["finite"]


def test_set_loop_mix_refuses_a_subnormal_temperature(llama_path):
    from ggufloop import LoopedLlama, _lib

    llm = LoopedLlama(str(llama_path), loop="2:4x3", n_ctx=64, n_threads=1, verbose=False)
    assert _lib.llama_set_loop_mix(llm.ctx, b"autoalign", 0.5, 1e-40, 0) == -1
    assert "too small" in _lib.last_error()
    assert _lib.llama_set_loop_mix(llm.ctx, b"autoalign", 0.5, 1e-7, 0) == 0
    assert _lib.last_error() == ""
    llm.close()


# -- damaged hyperparameters fail the load with a reason, never a signal -------------------------


@pytest.mark.parametrize("n_layer", [0, 1000, 2**32 - 1])
def test_damaged_block_count_in_the_file_is_a_load_error(tmp_path, n_layer):
    path = write_typed(tmp_path / "damaged.gguf", {"llama.block_count": (T.UINT32, n_layer)})
    refused(load(path), rf"llama\.block_count = {n_layer}, need 1 to 512")


def test_damaged_block_count_override_is_a_load_error(llama_path):
    values = [0, 1000, 2**32 - 1, 2**32 + 3, -1]
    for value, result in zip(values, run_cases([(llama_path, {"llama.block_count": v}, 0) for v in values])):
        refused(result, "block_count" if 0 <= value < 2**32 else "out of range for u32")


@pytest.mark.parametrize("eps", [math.nan, -1.0, math.inf])
def test_damaged_norm_epsilon_is_a_load_error(tmp_path, eps):
    path = write_typed(tmp_path / "eps.gguf", {"llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, eps)})
    refused(load(path, n_eval=4), "RMS norm epsilon")


# -- random values and types: every input ends in a result or a one-line error -------------------

INT_KEYS = [
    "ggufloop.loop.start",
    "ggufloop.loop.end",
    "ggufloop.loop.count",
    "ggufloop.loop.seed",
    "llama.block_count",
]
ANY_VALUE = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(st.characters(codec="ascii", exclude_characters="\0"), max_size=40),
)


@st.composite
def key_sets(draw):
    kv = {}
    for key in draw(st.lists(st.sampled_from(list(KEY_TYPES) + ["llama.block_count"]), unique=True, max_size=5)):
        if key in INT_KEYS and draw(st.booleans()):
            kv[key] = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 40)))
        else:
            kv[key] = draw(ANY_VALUE)
    return kv


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(key_sets(), min_size=25, max_size=25))
def test_random_keys_never_end_in_a_signal(tiny_models, batch):
    path = tiny_models["llama"][2]
    for kv, result in zip(batch, run_cases([(path, kv, 2) for kv in batch])):
        if result["ok"]:
            assert 1 <= result["depth"] <= 512, (kv, result)
            assert 0 <= result["seed"] <= 2**32 - 1
        else:
            refused(result)
