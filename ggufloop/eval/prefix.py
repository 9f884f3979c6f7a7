"""Prefix reuse: score a block plan from its first looped layer on, on hidden states computed once.

A block plan s:e xK runs layers 0..s-1 exactly as the unlooped model does, so the states entering
layer s are the same for every candidate that starts at s, item by item. ``PrefixStates`` computes
them once per item on the unlooped model (llama.cpp's graph evaluation callback, the tensors
``l_out-N``) and keeps them; the scorer then runs only the plan's tail (patch 0008,
``LoopedLlama.set_loop_tail``: layers s..e-1 K times and e..L-1, as the plan 0:(e-s) xK of those
layers, so the mixes and rules find the block's passes as the full plan has them), fed the stored
states through llama.cpp's ``batch.embd``. The capture replays the scorer's own decode calls (the
same batches, sequences and cache copies, in a context of the same sizes), so every kernel sees the
shapes it sees in the full run and the logits are the full run's bit for bit (tests/test_prefix.py).

What it saves: the layers 0..s-1 of every candidate's evaluation, i.e. s of the plan's
s + K(e-s) + (L-e) virtual layers, at the cost of one capture pass per item (the deepest declared
start + 1 layers).

Not for every plan (``refusal`` says why, and the scorer then runs the full plan): the noise mix
draws its directions by virtual layer, which the tail numbers differently; KV modes and MoE freeze
are not verified on a tail; and only the architectures whose input path is verified exact are
allowed (one that adds position embeddings or per-layer inputs at layer 0 would see them twice or
not at all).

The states are float32, [tokens, n_embd] per decode call and layer, kept in memory under a bound in
bytes (``PrefixConfig.bound``, ``--prefix-cache`` MiB). The layers of every start declared in
``PrefixConfig.starts`` (a search's candidates) are captured together, in one pass per item. Over its
bound the cache keeps what it holds, and a further item's states are captured again for each plan that
needs them (a pass of at most the deepest start + 2 layers instead of s): units run one plan over all
their items, so a least-recently-used cache would evict each item just before the next candidate asks
for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .. import _lib
from ..plan import LoopPlan
from ..runtime import Entry, LoopedLlama, SideContext

# the architectures whose states fed through batch.embd give the full run's logits bit for bit
# (tests/test_prefix.py): their input path is the token embeddings only (gemma3's embedding scale
# applies to tokens alone). A tail the backend refuses (gemma3's of only global-attention layers, which
# leaves its sliding-window cache without a layer) runs in full.
PREFIX_ARCHS = ("gemma3", "llama", "qwen2", "qwen3")

ItemKey = tuple[tuple[int, ...], ...]
Calls = list[np.ndarray]  # per decode call: the states entering the first layer run, [entries, n_embd]


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix reuse's settings: the bytes of states it may keep, and the block starts of the plans to come."""

    bound: int
    starts: tuple[int, ...] = ()

    @classmethod
    def for_plans(cls, bound: int, plans: Iterable[LoopPlan | str], arch: str) -> PrefixConfig:
        parsed = [LoopPlan.parse(str(p)) for p in plans]
        return cls(bound, tuple(sorted({p.start for p in parsed if refusal(p, arch) is None})))


def refusal(plan: LoopPlan, arch: str) -> str | None:
    """Why prefix reuse cannot score this plan on this architecture, or None when it can."""
    if plan.ranges or not plan.is_looped:
        return "prefix reuse needs a start:end xcount plan"
    if plan.start == 0:
        return "the block starts at layer 0: there is no prefix to reuse"
    if plan.mix.name == "noise":
        return "the noise mix draws by virtual layer, which the plan's tail numbers differently"
    if plan.kv != "exact" or plan.moe != "free":
        return "KV modes and MoE freeze are not verified on a plan's tail"
    if arch not in PREFIX_ARCHS:
        return f"architecture {arch!r} is not verified for prefix reuse (verified: {', '.join(PREFIX_ARCHS)})"
    return None


class PrefixStates:
    """The states entering each layer asked for, per item, from one capture on the unlooped model.

    ``replay(ctx, step)`` must make the scorer's decode calls for the item on ``ctx``, each through
    ``step(chunk)``; ``states(key, layer, replay)`` runs it on a context of the unlooped model when the
    item's states for that layer are not kept, and returns them per call."""

    def __init__(self, model_path: str, n_layer: int, context: dict, threads: int | None, config: PrefixConfig) -> None:
        self.model_path, self.n_layer, self.context, self.threads = model_path, n_layer, context, threads
        self.bound, self.used = config.bound, 0
        self.kept: dict[ItemKey, dict[int, Calls]] = {}
        # the layers declared and asked for so far: captured together for each new item
        self.layers: set[int] = {s - 1 for s in config.starts if 0 < s < n_layer}
        self.depth = 0  # the capture model's layers (0..depth-1): the deepest asked for, plus one
        self.base: LoopedLlama | None = None
        self.ctx: SideContext | None = None
        self._parts: dict[int, list[np.ndarray]] = {}

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self.base is not None:
            self.base.close()
            self.base = None

    def _open(self, depth: int) -> None:
        """A context on layers 0..depth-1 of the model, whose callback copies the layers asked for. The
        deepest layer captured is never the last one run, whose rows llama.cpp prunes to the outputs."""
        from ..trajectory import _ggml_base

        ggml = _ggml_base()
        names = {f"l_out-{il}".encode(): il for il in range(depth)}

        @llama_cpp.ggml_backend_sched_eval_callback
        def on_tensor(t, ask, user_data):
            il = names.get(ggml.ggml_get_name(t) or b"")
            if ask:
                return il is not None and il in self._parts
            if il is not None and il in self._parts:
                part = np.empty((ggml.ggml_nelements(t) // self.n_embd, self.n_embd), dtype=np.float32)
                ggml.ggml_backend_tensor_get(t, part.ctypes.data, 0, part.nbytes)
                self._parts[il].append(part)
            return True

        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        plan = LoopPlan(ranges=((0, depth),))
        if self.base is None:
            threads = {"n_threads": self.threads, "n_threads_batch": self.threads}
            self.base = LoopedLlama(self.model_path, loop=plan, n_ctx=64, n_batch=64, **threads)
            self.n_embd = self.base.n_embd()
        else:
            self.base.set_loop(plan)
        self.ctx = self.base.side_context(cb_eval=on_tensor, **self.context)
        self.depth = depth

    def states(self, key: ItemKey, layer: int, replay: Callable[[SideContext, Callable], None]) -> Calls:
        """The states leaving ``layer`` (entering layer + 1) for each of the item's decode calls."""
        kept = self.kept.get(key, {})
        if layer in kept:
            return kept[layer]
        self.layers.add(layer)
        if layer + 2 > self.depth:
            self._open(min(self.n_layer, max(self.layers) + 2))
        wanted = sorted(self.layers - kept.keys())
        calls: dict[int, Calls] = {il: [] for il in wanted}

        def step(chunk: Sequence[Entry]) -> dict:
            self._parts = {il: [] for il in wanted}
            self.ctx.decode(chunk)
            for il in wanted:
                got = np.concatenate(self._parts[il]) if self._parts[il] else np.empty((0, self.n_embd), np.float32)
                if got.shape[0] != len(chunk):
                    raise _lib.BackendError(
                        f"prefix reuse captured {got.shape[0]} states of layer {il} for a batch of {len(chunk)}"
                    )
                calls[il].append(got)
            return {}

        try:
            replay(self.ctx, step)
        finally:
            self._parts = {}
        size = sum(a.nbytes for c in calls.values() for a in c)
        if self.used + size <= self.bound:  # over the bound: what is kept stays, this item is not kept
            self.kept.setdefault(key, {}).update(calls)
            self.used += size
        return calls[layer]
