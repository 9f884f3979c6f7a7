"""The loop plan: which layers run, how many times, and how the passes are mixed.

Notation (slice semantics, as everywhere in ggufloop):
  ``10:15x3``            layers 0..9, then 10..14 three times, then 15..L-1
  ``10:15x3/uniform``    the same, passes mixed by a running mean
  ``10:15x3/ema:0.3``    mixed by ``(1-beta)*reference + beta*current``, beta = 0.3
  ``10:15x3/autoalign:0.5`` softmax over passes of cos(reference, pass)/T, T = 0.5
  ``10:15x3/noise:7``    the paper's random-direction control, seed 7
  ``0:20,10:30``         a general schedule: layers 0..19 then 10..29 (no mixing)
  ``none``               the unlooped model
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MIXES = ("none", "uniform", "ema", "autoalign", "noise")
DEFAULT_BETA = 0.5
DEFAULT_TEMPERATURE = 1.0
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS

KEY_START = "ggufloop.loop.start"
KEY_END = "ggufloop.loop.end"
KEY_COUNT = "ggufloop.loop.count"
KEY_LAYERS = "ggufloop.layers"
KEY_MIX = "ggufloop.loop.mix"
KEY_BETA = "ggufloop.loop.beta"
KEY_TEMPERATURE = "ggufloop.loop.temperature"
KEY_SEED = "ggufloop.loop.seed"


class PlanError(ValueError):
    """A plan that cannot be parsed or does not fit the model."""


@dataclass(frozen=True)
class Mix:
    """How the passes of a looped block are combined (see METHOD: regularized looping)."""

    name: str = "none"
    beta: float = DEFAULT_BETA
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in MIXES:
            raise PlanError(f"unknown mix {self.name!r}: expected one of {', '.join(MIXES)}")
        if not (0.0 <= self.beta <= 1.0):
            raise PlanError(f"ema beta must be in [0, 1], got {self.beta}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise PlanError(f"autoalign temperature must be > 0, got {self.temperature}")
        if not (0 <= self.seed < 2**32):
            raise PlanError(f"noise seed must be in [0, 2**32), got {self.seed}")

    @classmethod
    def parse(cls, text: str) -> "Mix":
        """``uniform``, ``ema:0.3``, ``autoalign:0.5``, ``noise:7``."""
        name, _, arg = text.strip().partition(":")
        name = name.strip().lower()
        if name not in MIXES:
            raise PlanError(f"unknown mix {name!r}: expected one of {', '.join(MIXES)}")
        if not arg:
            return cls(name)
        if name not in ("ema", "autoalign", "noise"):
            raise PlanError(f"mix {name!r} takes no parameter, got {arg!r}")
        try:
            value = int(arg) if name == "noise" else float(arg)
        except ValueError:
            raise PlanError(f"bad parameter {arg!r} for mix {name!r}") from None
        if name == "ema":
            return cls(name, beta=value)
        if name == "autoalign":
            return cls(name, temperature=value)
        return cls(name, seed=value)

    def __str__(self) -> str:
        if self.name == "ema" and self.beta != DEFAULT_BETA:
            return f"ema:{self.beta!r}"
        if self.name == "autoalign" and self.temperature != DEFAULT_TEMPERATURE:
            return f"autoalign:{self.temperature!r}"
        if self.name == "noise" and self.seed:
            return f"noise:{self.seed}"
        return self.name


_PLAN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class LoopPlan:
    """A block plan (start, end, count) or a general schedule (ranges), with its mix.

    ``start``/``end``/``count`` follow slice semantics: layers start..end-1, count passes in
    total (1 = the ordinary model). ``ranges`` is set instead for a general schedule.
    """

    start: int = 0
    end: int = 0
    count: int = 1
    ranges: tuple[tuple[int, int], ...] = ()
    mix: Mix = field(default_factory=Mix)

    def __post_init__(self) -> None:
        if self.ranges:
            if self.count != 1 or self.start or self.end:
                raise PlanError("a plan is either start:end xcount or a list of ranges, not both")
            if self.mix.name != "none":
                raise PlanError(f"mix {self.mix.name!r} needs a start:end xcount plan, not a general schedule")
            for a, b in self.ranges:
                if not (0 <= a < b):
                    raise PlanError(f"bad range {a}:{b}: need 0 <= start < end")
        elif self.is_looped or self.start or self.end:
            if not (0 <= self.start < self.end):
                raise PlanError(f"bad block {self.start}:{self.end}: need 0 <= start < end")
            if self.count < 1:
                raise PlanError(f"loop count must be >= 1 (1 = the unlooped model), got {self.count}")
        elif self.mix.name != "none":
            raise PlanError(f"mix {self.mix.name!r} needs a start:end xcount plan")

    @property
    def is_looped(self) -> bool:
        """True when the plan changes the model (more than one pass, or a general schedule)."""
        return self.count > 1 or bool(self.ranges)

    @classmethod
    def parse(cls, text: "str | LoopPlan | None") -> "LoopPlan":
        """Parse the notation in the module docstring; None, '' and 'none' give the unlooped plan."""
        if isinstance(text, LoopPlan):
            return text
        if text is None:
            return cls()
        if not isinstance(text, str):
            raise PlanError(f"a plan is a string such as '10:15x3', got {type(text).__name__}")
        body, slash, mix_text = text.partition("/")
        mix = Mix.parse(mix_text) if slash else Mix()
        body = body.strip()
        if body.lower() in ("", "none"):
            return cls(mix=mix)
        if m := _PLAN.match(body):
            start, end, count = (int(g) for g in m.groups())
            return cls(start, end, count, mix=mix)
        ranges = []
        for part in body.split(","):
            r = _RANGE.match(part)
            if not r:
                raise PlanError(f"cannot parse plan {text!r}: expected START:ENDxCOUNT (such as 10:15x3), "
                                "optionally /MIX, or ranges such as 0:20,10:30")
            ranges.append((int(r.group(1)), int(r.group(2))))
        return cls(ranges=tuple(ranges), mix=mix)

    def __str__(self) -> str:
        if self.ranges:
            body = ",".join(f"{a}:{b}" for a, b in self.ranges)
        elif self.start or self.end:
            body = f"{self.start}:{self.end}x{self.count}"
        else:
            body = "none"
        return body if self.mix.name == "none" else f"{body}/{self.mix}"

    def with_mix(self, mix: "Mix | str") -> "LoopPlan":
        """The same layers with another mix."""
        return LoopPlan(self.start, self.end, self.count, self.ranges, Mix.parse(mix) if isinstance(mix, str) else mix)

    def schedule(self, n_layer: int) -> list[int]:
        """The physical layer of each virtual layer, for a model of n_layer layers."""
        self.validate(n_layer)
        if self.ranges:
            return [il for a, b in self.ranges for il in range(a, b)]
        if not (self.start or self.end):
            return list(range(n_layer))
        block = list(range(self.start, self.end))
        return list(range(self.start)) + block * self.count + list(range(self.end, n_layer))

    def validate(self, n_layer: int) -> None:
        """Raise PlanError saying what is wrong and what would be valid for a model of n_layer layers."""
        spans = self.ranges or (((self.start, self.end),) if self.end else ())
        for a, b in spans:
            if b > n_layer:
                raise PlanError(f"block {a}:{b} is out of range: the model has {n_layer} layers, "
                                f"so a block is start:end with 0 <= start < end <= {n_layer}")
        depth = self.virtual_depth(n_layer)
        if depth > MAX_LAYERS:
            raise PlanError(f"plan {self} gives {depth} virtual layers, more than llama.cpp's limit of {MAX_LAYERS}")

    def virtual_depth(self, n_layer: int) -> int:
        """Number of layers the plan runs: L + (K-1)*m for a block plan."""
        if self.ranges:
            return sum(b - a for a, b in self.ranges)
        return n_layer + (self.count - 1) * (self.end - self.start)

    def kv_overrides(self) -> dict[str, "int | float | str"]:
        """The GGUF metadata keys that make the patched backend run this plan."""
        kv: dict[str, int | float | str] = {
            KEY_LAYERS: ",".join(f"{a}:{b}" for a, b in self.ranges),
            KEY_MIX: self.mix.name,
            KEY_BETA: float(self.mix.beta),
            KEY_TEMPERATURE: float(self.mix.temperature),
            KEY_SEED: int(self.mix.seed),
        }
        if not self.ranges:
            # an explicit 0:L x1 plan overrides any plan stored in the file
            kv.update({KEY_START: self.start, KEY_END: self.end, KEY_COUNT: self.count})
        return kv

    @classmethod
    def from_metadata(cls, meta: dict) -> "LoopPlan":
        """The plan stored in a GGUF file's metadata (ggufloop.* keys), or the unlooped plan."""
        mix = Mix(str(meta.get(KEY_MIX, "none")), float(meta.get(KEY_BETA, DEFAULT_BETA)),
                  float(meta.get(KEY_TEMPERATURE, DEFAULT_TEMPERATURE)), int(meta.get(KEY_SEED, 0)))
        layers = str(meta.get(KEY_LAYERS, "") or "")
        if layers:
            return cls.parse(layers)
        if KEY_START in meta:
            return cls(int(meta[KEY_START]), int(meta[KEY_END]), int(meta[KEY_COUNT]), mix=mix)
        return cls()
