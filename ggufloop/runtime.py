"""LoopedLlama: llama_cpp.Llama with a loop plan, applied by the patched backend.

Besides Llama's own API, LoopedLlama opens *side contexts* (``side_context``): llama.cpp
contexts of their own on the same loaded weights, with several sequences, logits at chosen
positions and an optional evaluation callback. Benchmark scoring and latent traces run on them
rather than on Llama's own context. What needs llama-cpp-python's private code (a new native context
under the wrapper when the schedule changes, the load-time substitutions) goes through ``_compat``.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import llama_cpp
import numpy as np

from . import _compat, _lib
from .gguf_io import metadata, open_gguf
from .plan import DECODES, MOES, RULES, LoopPlan, Mix
from .rpc import model_devices, watch_connections

# (token, position, sequence, wants logits)
Entry = tuple[int, int, int, bool]


class LoopedLlama(llama_cpp.Llama):
    """A ``llama_cpp.Llama`` that runs a loop plan; every other argument is Llama's own.

    ``loop`` is a LoopPlan, its notation (``"10:15x3/uniform"``) or None (the plan stored in
    the file, if any). The plan the backend actually runs is read back: ``plan``, ``schedule``.

    ``rpc`` (``"host:port,host:port"`` or a list) splits the model over llama.cpp RPC servers
    (see ``ggufloop.rpc``): the model offloads to their devices, then to the local GPUs
    (``devices``), with Llama's own ``n_gpu_layers`` (layers off the local CPU; -1, all, unless
    given) and ``tensor_split`` (each device's share). Without it, the model uses the local
    devices only.
    """

    def __init__(
        self,
        model_path: str,
        *,
        loop: LoopPlan | str | None = None,
        rpc: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        _lib.require_patched()
        broken = broken_chat_templates(metadata(open_gguf(model_path)))
        overrides = dict(kwargs.pop("kv_overrides", None) or {})
        plan = LoopPlan.parse(loop) if loop is not None else None
        if plan is not None:
            overrides.update(plan.kv_overrides())
        kwargs.setdefault("verbose", False)
        self._devices = None
        self._tail = False  # running only a plan's tail (set_loop_tail)
        if rpc:
            kwargs.setdefault("n_gpu_layers", -1)  # Llama's default, 0, would leave the servers unused
            split = kwargs.get("tensor_split")
            self._devices = model_devices(rpc, tuple(split) if split is not None else None)
        try:
            with _loading(broken, self._devices):
                super().__init__(model_path, kv_overrides=overrides or None, **kwargs)
        except ValueError as err:
            reason = _lib.last_error()
            if reason:
                raise _lib.BackendError(reason) from None
            raise _lib.BackendError(f"llama.cpp could not load {model_path}: {err}") from None
        if self._devices is not None:
            watch_connections(self._devices.endpoints)  # found dead, not waited for, if a server's machine vanishes
        if plan is not None and plan.mix.table:
            self.set_mix(plan.mix)  # an override holds no weight table: it is set on the context

    def close(self) -> None:
        if _compat.initialized(self):  # __init__ may have refused before Llama set anything up
            super().close()

    # -- what the backend runs --------------------------------------------------------------

    @property
    def devices(self) -> list:
        """The devices the model offloads layers to, in llama.cpp's order (``ggufloop.rpc.Device``):
        the RPC servers' devices, then the local GPUs, when the model was split with ``rpc``; else []
        (llama.cpp's default choice of local devices)."""
        return list(self._devices.devices) if self._devices is not None else []

    @property
    def n_layer_phys(self) -> int:
        """Layers in the model file."""
        return _lib.llama_model_n_layer_phys(self.model)

    @property
    def schedule(self) -> list[int]:
        """The physical layer of each virtual layer, as the backend runs them."""
        n = _lib.llama_model_layer_schedule(self.model, None, 0)
        buf = (ctypes.c_int32 * n)()
        _lib.llama_model_layer_schedule(self.model, buf, n)
        return list(buf)

    @property
    def virtual_depth(self) -> int:
        return len(self.schedule)

    @property
    def mix(self) -> Mix:
        """The mix the backend runs, read back exactly: Mix keeps its parameters in float32, as the
        backend does, so the mix reads back equal to what was set, with the same text."""
        return _backend_mix(self.ctx)

    @property
    def decode(self) -> str:
        """What generated tokens run: "full" (the plan) or "bypass" (the block once)."""
        return _backend_decode(self.ctx)

    @property
    def moe(self) -> str:
        """How MoE layers route the later passes: "free" (anew) or "freeze" (as pass 0 did)."""
        return _backend_moe(self.ctx)

    @property
    def kv(self) -> str:
        """What the KV cache keeps of the passes: "exact" (a slot per pass), "first" or "last" (a slot per layer)."""
        return (
            _lib.llama_model_get_loop_kv(self.model).decode() if _lib.llama_model_get_loop_kv is not None else "exact"
        )

    @property
    def plan(self) -> LoopPlan:
        """The plan read back from the backend."""
        start, end, count = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
        if _lib.llama_model_loop_plan(self.model, ctypes.byref(start), ctypes.byref(end), ctypes.byref(count)):
            return LoopPlan(
                start.value, end.value, count.value, mix=self.mix, decode=self.decode, moe=self.moe, kv=self.kv
            )
        schedule = self.schedule
        if schedule == list(range(self.n_layer_phys)):
            return LoopPlan()
        return LoopPlan(ranges=_ranges(schedule))

    # -- changing the plan ------------------------------------------------------------------

    def set_loop(self, loop: LoopPlan | str | None) -> None:
        """Run another plan. A new layer schedule or KV mode gives the context a fresh KV cache; a new mix
        on the same layers only clears the cache.

        The plan is checked against the model before anything is torn down, so a refused plan leaves
        plan, mix and cache exactly as they were. Refused while a generation is streaming: finish or
        close the stream first."""
        plan = LoopPlan.parse(loop)
        self._check_idle()
        current = self.plan
        same_layers = (plan.start, plan.end, plan.count, plan.ranges) == (
            current.start,
            current.end,
            current.count,
            current.ranges,
        )
        same_layers = same_layers and not self._tail  # a tail's plan reads as 0:m xK of other layers
        if same_layers and plan.kv == current.kv:
            self.set_mix(plan.mix)
            self.set_decode(plan.decode)
            self.set_moe(plan.moe)
            return
        if same_layers:
            self._set_kv(plan, current)
            return
        plan.validate(self.n_layer_phys)
        arch = str(self.metadata.get("general.architecture", "unknown"))
        if plan.is_looped and arch not in _lib.supported_archs():
            raise _lib.BackendError(
                f"architecture '{arch}' does not support layer schedules "
                f"(supported: {', '.join(_lib.supported_archs())})"
            )
        if why := plan.routing_refusal(self.metadata):
            raise _lib.BackendError(why)
        # the backend changes a schedule only while no context exists: free the native context, keep its wrapper
        _compat.free_context(self)
        self._tail = False
        try:
            if plan.ranges:
                status = _lib.llama_model_set_layer_schedule(
                    self.model, ",".join(f"{a}:{b}" for a, b in plan.ranges).encode()
                )
            elif plan.start or plan.end:
                status = _lib.llama_model_set_loop(self.model, plan.start, plan.end, plan.count)
            else:
                status = _lib.llama_model_set_layer_schedule(self.model, b"")
            reason = _lib.last_error()  # before the calls below replace it
        finally:
            self._new_native_context()
        if status != 0:
            self.set_mix(current.mix)  # the backend kept the old schedule; the cache is lost with the context
            self.set_decode(current.decode)
            self.set_moe(current.moe)
            raise _lib.BackendError(reason or "refused by the backend")
        if plan.kv != "exact":  # a new schedule starts exact
            self._set_kv(plan, current)
            return
        self.set_mix(plan.mix)
        self.set_decode(plan.decode)
        try:
            self.set_moe(plan.moe)
        except _lib.BackendError:
            self.set_loop(current)  # a block without MoE layers: back to the plan that ran
            raise

    def set_loop_tail(self, loop: LoopPlan | str) -> None:
        """Run only the tail of a block plan s:e xK, for prefix reuse (eval/prefix.py): layers s..e-1 K times,
        then e..L-1, as the plan 0:(e-s) xK of those layers (what ``plan`` then reads), with the plan's mix and
        decode mode; every batch must then come as layer s-1's output (``SideContext.decode_states``).
        ``set_loop`` puts the model back on a whole plan."""
        plan = LoopPlan.parse(loop)
        self._check_idle()
        if _lib.llama_model_set_loop_tail is None:
            raise _lib.BackendError("this build of the backend predates plan tails: rebuild it (make backend)")
        if plan.ranges or not plan.is_looped or plan.kv != "exact" or plan.moe != "free":
            raise _lib.BackendError(f"plan {plan} has no tail to run: a start:end xcount plan with exact KV is needed")
        plan.validate(self.n_layer_phys)
        current = self.plan
        _compat.free_context(self)
        try:
            status = _lib.llama_model_set_loop_tail(self.model, plan.start, plan.end, plan.count)
            reason = _lib.last_error()
        finally:
            self._new_native_context()
        if status != 0:  # the schedule stays; the context is new
            self.set_mix(current.mix)
            self.set_decode(current.decode)
            self.set_moe(current.moe)
            raise _lib.BackendError(reason or "refused by the backend")
        self._tail = True
        self.set_mix(plan.mix)
        self.set_decode(plan.decode)

    def _set_kv(self, plan: LoopPlan, fallback: LoopPlan) -> None:
        """Run the plan's KV mode on its layers (already the model's): the KV cache's shape changes, so the
        context is made anew. A refused mode (the model's memory has none) puts the model back on fallback."""
        if _lib.llama_model_set_loop_kv is None:
            raise _lib.BackendError("this build of the backend predates KV modes: rebuild it (make backend)")
        _compat.free_context(self)
        status = _lib.llama_model_set_loop_kv(self.model, plan.kv.encode())
        reason = _lib.last_error()
        try:
            self._new_native_context()
        except _lib.BackendError:
            reason = _lib.last_error() or reason
            status = -1
            _lib.llama_model_set_loop_kv(self.model, b"exact")
            self._new_native_context()
        if status != 0:
            self.set_loop(fallback)
            raise _lib.BackendError(reason or f"KV mode {plan.kv!r} was refused")
        self.set_mix(plan.mix)
        self.set_decode(plan.decode)
        try:
            self.set_moe(plan.moe)
        except _lib.BackendError:
            self.set_loop(fallback)
            raise

    def _new_native_context(self) -> None:
        ctx = llama_cpp.llama_init_from_model(self.model, self.context_params)
        if ctx is None:
            raise _lib.BackendError("llama.cpp could not create a context for the new plan")
        _compat.install_context(self, ctx)
        self.n_tokens = 0

    def set_mix(self, mix: Mix | str) -> None:
        """Mix the passes of the current plan another way; clears the KV cache. A refused mix leaves
        the mix and the cache as they were. The decode mode stays."""
        mix = Mix.parse(mix) if isinstance(mix, str) else mix
        self._check_idle()
        current = self.plan
        if current.end:
            current.with_mix(mix)  # a weight table is checked against the plan before the backend sees it
        _set_backend_mix(self.ctx, mix, current.start, current.end)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.n_tokens = 0

    def set_decode(self, decode: str) -> None:
        """What generated tokens run: "full" (the plan) or "bypass" (the block once, leaving their pass-0 K/V
        in the later passes' KV slots). Prompt tokens always run the plan. Keeps the KV cache: both modes
        leave well-defined K/V for every pass (docs/method.md, "Looping the prompt only")."""
        self._check_idle()
        if decode not in DECODES:
            raise _lib.BackendError(f"unknown decode mode {decode!r}: expected {' or '.join(DECODES)}")
        if decode == "bypass" and not self.plan.end:
            raise _lib.BackendError("decode bypass needs a start:end xcount plan")
        _lib.check(_lib.llama_set_loop_decode(self.ctx, decode.encode()))

    def set_moe(self, moe: str) -> None:
        """How the MoE layers of the block route the later passes: "free" (each pass routes its own input) or
        "freeze" (each token reuses pass 0's expert selection and gate weights; the experts run on the current
        input). Clears the KV cache: the K/V of later passes depend on it."""
        self._check_idle()
        if moe not in MOES:
            raise _lib.BackendError(f"unknown MoE routing {moe!r}: expected free or freeze")
        if moe == self.moe:
            return
        if _lib.llama_set_loop_moe is None:
            raise _lib.BackendError("this build of the backend predates MoE routing freeze: rebuild it (make backend)")
        _lib.check(_lib.llama_set_loop_moe(self.ctx, moe.encode()))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.n_tokens = 0

    def _check_idle(self) -> None:
        if self._streaming:
            raise _lib.BackendError("a generation is streaming: finish or close its stream before changing the plan")

    # -- generation -------------------------------------------------------------------------

    _streaming = 0
    _generate_evals = -1  # evals so far in the running generate (-1: none runs); the first is its prompt

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[int]:
        """Llama.generate, counted: the plan cannot change under a stream that is being read. Its first eval
        is the prompt; every later one decodes sampled tokens, which are *generated* (decode bypass)."""
        self._streaming += 1
        outer, self._generate_evals = self._generate_evals, 0
        try:
            yield from super().generate(*args, **kwargs)
        finally:
            self._streaming -= 1
            self._generate_evals = outer

    @contextlib.contextmanager
    def generated(self) -> Iterator[None]:
        """Within it, every eval decodes generated tokens: under decode bypass they run the block once.
        ``generate`` does this itself for the tokens it samples."""
        outer, self._generate_evals = self._generate_evals, 1
        try:
            yield
        finally:
            self._generate_evals = outer

    def eval(self, tokens: Sequence[int]) -> None:
        """Llama.eval, with a check that the model's answer is a number: non-finite logits (a damaged
        file, an overflowing computation) are an error, never an empty or arbitrary answer. The tokens
        are generated ones after a generate's prompt, or within ``generated()``."""
        if _lib.llama_set_loop_generating is not None:
            _lib.llama_set_loop_generating(self.ctx, self._generate_evals > 0)
        if self._generate_evals >= 0:
            self._generate_evals += 1
        try:
            super().eval(tokens)
        finally:
            if _lib.llama_set_loop_generating is not None:
                _lib.llama_set_loop_generating(self.ctx, False)
        if len(tokens):
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab(),))
            if not np.isfinite(row).all():
                raise _lib.BackendError(
                    "the model produced non-finite logits (NaN or infinity): its weights or "
                    "hyper-parameters are damaged, or the plan's computation overflows"
                )

    # -- side contexts ----------------------------------------------------------------------

    def side_context(
        self,
        n_ctx: int,
        n_batch: int,
        n_ubatch: int | None = None,
        n_seq: int = 1,
        kv_type: int | None = None,
        cb_eval: Any = None,
        streams: bool = False,
    ) -> SideContext:
        """A context of its own on this model's weights, running its current plan and mix (see
        SideContext). Close it before ``set_loop`` changes the layer schedule."""
        return SideContext(self, n_ctx, n_batch, n_ubatch, n_seq, kv_type, cb_eval, streams)

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


class SideContext:
    """A llama.cpp context on a LoopedLlama's weights, for work that Llama's one-sequence API
    does not cover: several sequences sharing a KV cache, logits at chosen positions, an
    evaluation callback that sees every layer's output.

    It takes Llama's own context settings (threads, flash attention off, ...) with the sizes
    given here, and the model's current mix. Use it as a context manager or call ``close``.

    Several sequences share one set of cache cells (sequence copies share them without a copy), or,
    with ``streams``, each has cells of its own, ``n_ctx / n_seq`` of them (llama.cpp's non-unified
    cache: a sequence copy copies the cells' data, and a batch of several sequences attends per
    sequence, so that a sequence's attention does not see its companions' cells).
    """

    def __init__(
        self,
        llm: LoopedLlama,
        n_ctx: int,
        n_batch: int,
        n_ubatch: int | None = None,
        n_seq: int = 1,
        kv_type: int | None = None,
        cb_eval: Any = None,
        streams: bool = False,
    ) -> None:
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_ubatch or n_batch
        params.n_seq_max = n_seq
        if n_seq > 1:
            params.kv_unified = not streams  # sequences share cache cells, or have streams of their own
        if kv_type is not None:
            params.type_k = params.type_v = kv_type
        if cb_eval is not None:
            params.cb_eval, params.cb_eval_user_data = cb_eval, None
        self._cb_eval = cb_eval  # the C side keeps only a pointer to it
        self.n_ctx, self.n_batch, self.n_seq = n_ctx, n_batch, n_seq
        self.n_vocab = llm.n_vocab()
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if self.ctx is None:
            raise _lib.BackendError(f"llama.cpp could not create a context of {n_ctx} tokens and {n_seq} sequences")
        try:
            plan = llm.plan
            _set_backend_mix(self.ctx, plan.mix, plan.start, plan.end)
            if plan.decode != "full":
                _lib.check(_lib.llama_set_loop_decode(self.ctx, plan.decode.encode()))
            if plan.moe != "free":
                _lib.check(_lib.llama_set_loop_moe(self.ctx, plan.moe.encode()))  # the model checked it at load
        except _lib.BackendError:
            self.close()
            raise
        self._memory = llama_cpp.llama_get_memory(self.ctx)

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> SideContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear(self) -> None:
        """Forget every sequence's KV cache."""
        llama_cpp.llama_memory_clear(self._memory, True)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Share src's KV cache with sequence dst (llama.cpp's sequence copy; no recomputation)."""
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)

    def remove_sequence(self, seq: int) -> None:
        """Forget one sequence's KV cache: its cells are freed unless another sequence shares them."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def decode(self, entries: Sequence[Entry], generated: bool = False) -> list[int]:
        """Decode one batch of (token, position, sequence, wants logits) entries; returns, per entry
        that wanted logits, its row index for ``logits``. ``generated``: the batch is of generated
        tokens (decode bypass runs their block once)."""
        batch = llama_cpp.llama_batch_init(len(entries), 0, 1)
        if _lib.llama_set_loop_generating is not None:
            _lib.llama_set_loop_generating(self.ctx, generated)
        try:
            rows = []
            for j, (tok, pos, seq, logits) in enumerate(entries):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
                batch.seq_id[j][0], batch.logits[j] = seq, logits
                if logits:
                    rows.append(j)
            batch.n_tokens = len(entries)
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise _lib.BackendError(f"llama_decode failed (status {status})")
            return rows
        finally:
            llama_cpp.llama_batch_free(batch)
            if _lib.llama_set_loop_generating is not None:
                _lib.llama_set_loop_generating(self.ctx, False)

    def decode_states(self, states: np.ndarray, entries: Sequence[Entry]) -> list[int]:
        """Decode one batch whose inputs are hidden states, [len(entries), n_embd] float32, instead of the
        entries' tokens (llama.cpp's batch.embd: they enter the schedule's first virtual layer as the token
        embeddings would; the embedding scale of some architectures applies to tokens only); the entries
        give the positions, sequences and logits. Returns the rows for ``logits``, as ``decode`` does."""
        states = np.ascontiguousarray(states, dtype=np.float32)
        if states.ndim != 2 or states.shape[0] != len(entries):
            raise ValueError(f"states of shape {states.shape} for {len(entries)} entries")
        batch = llama_cpp.llama_batch_init(len(entries), states.shape[1], 1)
        try:
            rows = []
            for j, (_, pos, seq, logits) in enumerate(entries):
                batch.pos[j], batch.n_seq_id[j] = pos, 1
                batch.seq_id[j][0], batch.logits[j] = seq, logits
                if logits:
                    rows.append(j)
            ctypes.memmove(batch.embd, states.ctypes.data, states.nbytes)
            batch.n_tokens = len(entries)
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise _lib.BackendError(f"llama_decode failed (status {status})")
            return rows
        finally:
            llama_cpp.llama_batch_free(batch)

    def logits(self, row: int) -> np.ndarray:
        """The logits of one row of the last decoded batch, copied as float64."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)).astype(
            np.float64
        )

    def all_logits(self, n: int) -> np.ndarray:
        """The logits of the last batch's first n entries (every one asked for logits), [n, vocab]."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(n, self.n_vocab)).copy()

    def decode_all(self, tokens: Iterable[int]) -> np.ndarray:
        """Decode tokens as one sequence from position 0 in one batch, with every position's logits."""
        tokens = list(tokens)
        self.decode([(tok, i, 0, True) for i, tok in enumerate(tokens)])
        return self.all_logits(len(tokens))


def broken_chat_templates(meta: dict[str, Any]) -> dict[str, str]:
    """Chat templates in a file's metadata that jinja2 cannot compile: key -> the reason."""
    from llama_cpp import llama_chat_format

    out = {}
    for key, template in meta.items():
        if key.startswith("tokenizer.chat_template") and isinstance(template, str):
            try:
                llama_chat_format.Jinja2ChatFormatter(template, eos_token="", bos_token="")
            except Exception as err:  # jinja2 raises several types for a broken template
                out[key] = f"{type(err).__name__}: {err}"
    return out


@contextlib.contextmanager
def _loading(broken: dict[str, str], devices: Any) -> Iterator[None]:
    """What Llama's load needs beyond its arguments: tolerance of a chat template that does not compile (a
    chat then gets a one-line error; completions need no template), and the RPC servers' devices."""
    with contextlib.ExitStack() as stack:
        if broken:
            reason = "; ".join(f"{k}: {v}" for k, v in broken.items())
            stack.enter_context(_compat.tolerating_broken_templates(f"the model's chat template is broken ({reason})"))
        if devices is not None:
            stack.enter_context(_compat.loading_with_devices(devices.pointer))
        yield


def _set_backend_mix(ctx: Any, mix: Mix, start: int = 0, end: int = 0) -> None:
    """The mix on a context: a rule through llama_set_loop_rule (a weight table expanded to the block's
    end - start layers), the others through llama_set_loop_mix."""
    if not mix.is_rule:
        _lib.check(_lib.llama_set_loop_mix(ctx, mix.name.encode(), mix.beta, mix.temperature, mix.seed))
        return
    if _lib.llama_set_loop_rule is None:
        raise _lib.BackendError(f"mix {mix.name!r} needs a newer backend: rebuild it with `make backend`")
    table = list(mix.table) * (end - start) if len(mix.table) == 1 else list(mix.table)
    flat = [w for layer in table for row in layer for w in row]
    weights = (ctypes.c_float * len(flat))(*flat)
    param = -1.0 if mix.param is None else mix.param
    _lib.check(_lib.llama_set_loop_rule(ctx, mix.name.encode(), param, weights, len(flat)))


def _backend_mix(ctx: Any) -> Mix:
    beta, temperature, seed = ctypes.c_float(), ctypes.c_float(), ctypes.c_uint32()
    name = _lib.llama_get_loop_mix(ctx, ctypes.byref(beta), ctypes.byref(temperature), ctypes.byref(seed)).decode()
    if _lib.llama_get_loop_rule is None or name not in RULES:
        return Mix(name, beta.value, temperature.value, seed.value)
    param, n = ctypes.c_float(), ctypes.c_int32()
    _lib.llama_get_loop_rule(ctx, ctypes.byref(param), None, 0, ctypes.byref(n))
    buf = (ctypes.c_float * n.value)()
    _lib.llama_get_loop_rule(ctx, ctypes.byref(param), buf, n.value, ctypes.byref(n))
    table: tuple = ()
    if n.value:
        K = _plan_count(ctx)
        rows = [tuple(buf[i : i + K]) for i in range(0, n.value, K)]
        table = tuple(tuple(rows[j : j + K]) for j in range(0, len(rows), K))
    return Mix(name, param=None if param.value < 0 else param.value, table=table)


def _plan_count(ctx: Any) -> int:
    """K, the passes of the plan of a context's model."""
    start, end, count = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
    _lib.llama_model_loop_plan(
        llama_cpp.llama_get_model(ctx), ctypes.byref(start), ctypes.byref(end), ctypes.byref(count)
    )
    return count.value


def _backend_decode(ctx: Any) -> str:
    return _lib.llama_get_loop_decode(ctx).decode() if _lib.llama_get_loop_decode is not None else "full"


def _backend_moe(ctx: Any) -> str:
    return _lib.llama_get_loop_moe(ctx).decode() if _lib.llama_get_loop_moe is not None else "free"


def _ranges(schedule: list[int]) -> tuple[tuple[int, int], ...]:
    """Compress a schedule into maximal runs of consecutive layers."""
    ranges: list[tuple[int, int]] = []
    for il in schedule:
        if ranges and ranges[-1][1] == il:
            ranges[-1] = (ranges[-1][0], il + 1)
        else:
            ranges.append((il, il + 1))
    return tuple(ranges)
