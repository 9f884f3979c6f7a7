"""LoopedLlama: llama_cpp.Llama with a loop plan, applied by the patched backend."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
from llama_cpp import _internals

from . import _lib
from .modelinfo import check_gguf
from .plan import LoopPlan, Mix, PlanError

_MAX_KV_STR = 127  # llama_model_kv_override.val_str is char[128]


class LoopedLlama(llama_cpp.Llama):
    """A ``llama_cpp.Llama`` that runs a loop plan; every other argument is Llama's own.

    ``loop`` is a LoopPlan, its notation (``"10:15x3/uniform"``) or None (the plan stored in
    the file, if any). The plan the backend actually runs is read back: ``plan``, ``schedule``.
    """

    def __init__(self, model_path: str, *, loop: "LoopPlan | str | None" = None, **kwargs: Any) -> None:
        _lib.require_patched()
        check_gguf(model_path)
        overrides = dict(kwargs.pop("kv_overrides", None) or {})
        if loop is not None:
            requested = LoopPlan.parse(loop)
            for key, value in requested.kv_overrides().items():
                if isinstance(value, str) and len(value.encode()) > _MAX_KV_STR:
                    raise PlanError(f"schedule {requested} is too long for a metadata override ({_MAX_KV_STR} bytes)")
                overrides[key] = value
        kwargs.setdefault("verbose", False)
        try:
            super().__init__(model_path, kv_overrides=overrides or None, **kwargs)
        except ValueError as err:
            reason = _lib.last_error()
            if reason:
                raise _lib.BackendError(reason) from None
            raise _lib.BackendError(f"llama.cpp could not load {model_path}: {err}") from None

    def close(self) -> None:
        if "_stack" in self.__dict__:  # __init__ may have refused before Llama set anything up
            super().close()

    # -- what the backend runs --------------------------------------------------------------

    @property
    def n_layer_phys(self) -> int:
        """Layers in the model file."""
        return _lib.llama_model_n_layer_phys(self._model.model)

    @property
    def schedule(self) -> list[int]:
        """The physical layer of each virtual layer, as the backend runs them."""
        n = _lib.llama_model_layer_schedule(self._model.model, None, 0)
        buf = (ctypes.c_int32 * n)()
        _lib.llama_model_layer_schedule(self._model.model, buf, n)
        return list(buf)

    @property
    def virtual_depth(self) -> int:
        return len(self.schedule)

    @property
    def mix(self) -> Mix:
        beta, temperature, seed = ctypes.c_float(), ctypes.c_float(), ctypes.c_uint32()
        name = _lib.llama_get_loop_mix(self._ctx.ctx, ctypes.byref(beta), ctypes.byref(temperature), ctypes.byref(seed))
        return Mix(name.decode(), round(beta.value, 6), round(temperature.value, 6), seed.value)

    @property
    def plan(self) -> LoopPlan:
        """The plan read back from the backend."""
        start, end, count = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
        if _lib.llama_model_loop_plan(self._model.model, ctypes.byref(start), ctypes.byref(end), ctypes.byref(count)):
            return LoopPlan(start.value, end.value, count.value, mix=self.mix)
        schedule = self.schedule
        if schedule == list(range(self.n_layer_phys)):
            return LoopPlan()
        return LoopPlan(ranges=_ranges(schedule))

    # -- changing the plan ------------------------------------------------------------------

    def set_loop(self, loop: "LoopPlan | str | None") -> None:
        """Run another plan. A new layer schedule recreates the context (its KV cache is lost);
        a new mix on the same layers only clears the cache."""
        plan = LoopPlan.parse(loop)
        current = self.plan
        if (plan.start, plan.end, plan.count, plan.ranges) != (current.start, current.end, current.count, current.ranges):
            self._ctx.close()
            try:
                if plan.ranges:
                    _lib.check(_lib.llama_model_set_layer_schedule(
                        self._model.model, ",".join(f"{a}:{b}" for a, b in plan.ranges).encode()))
                elif plan.start or plan.end:
                    _lib.check(_lib.llama_model_set_loop(self._model.model, plan.start, plan.end, plan.count))
                else:
                    _lib.check(_lib.llama_model_set_layer_schedule(self._model.model, b""))
            finally:
                self._ctx = _internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)
        self.set_mix(plan.mix)

    def set_mix(self, mix: "Mix | str") -> None:
        """Mix the passes of the current plan another way; clears the KV cache."""
        mix = Mix.parse(mix) if isinstance(mix, str) else mix
        _lib.check(_lib.llama_set_loop_mix(self._ctx.ctx, mix.name.encode(), mix.beta, mix.temperature, mix.seed))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), True)
        self.n_tokens = 0

    # -- state ------------------------------------------------------------------------------

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        state.ggufloop_plan = str(self.plan)
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        """Restore a state; refused when it was saved under another plan (its KV cache would not fit)."""
        saved = getattr(state, "ggufloop_plan", "none")
        if saved != str(self.plan):
            raise _lib.BackendError(f"this state was saved under plan {saved!r}; the model now runs {str(self.plan)!r}")
        super().load_state(state)


def _ranges(schedule: list[int]) -> tuple[tuple[int, int], ...]:
    """Compress a schedule into maximal runs of consecutive layers."""
    ranges: list[tuple[int, int]] = []
    for il in schedule:
        if ranges and ranges[-1][1] == il:
            ranges[-1] = (ranges[-1][0], il + 1)
        else:
            ranges.append((il, il + 1))
    return tuple(ranges)
