"""Log-likelihoods of multiple-choice continuations, fast on a CPU.

The tokens an item's choices share (its context) are decoded once on one sequence, whose KV
cache is then shared with one sequence per choice (llama.cpp's sequence copy), and each choice
decodes only its own tokens, one sequence per decode. Only the positions that predict a
continuation token produce logits. With ``prefix``, a block plan runs from its first looped layer
on, on states computed once per item (prefix.py); the scores are the same, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _lib
from ..numeric import log_softmax
from ..plan import LoopPlan
from ..rpc import Placement
from ..runtime import Entry, LoopedLlama, SideContext
from .prefix import PrefixConfig, PrefixStates, refusal
from .tasks import Item


@dataclass
class _Prepared:
    item: Item
    tokens: list[list[int]]  # per choice: context + continuation
    starts: list[int]  # per choice: index of the first continuation token
    shared: int  # leading tokens common to every choice, decoded once


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


class Scorer:
    """Scores items under a loop plan; one model load serves several plans (set_plan)."""

    def __init__(
        self,
        model_path: str,
        plan: LoopPlan | str | None = None,
        n_ctx: int = 4096,
        n_batch: int = 1024,
        n_seq: int = 16,
        threads: int | None = None,
        kv_type: int | None = None,
        placement: Placement | None = None,
        prefix: PrefixConfig | None = None,
    ) -> None:
        """``prefix``: score block plans by prefix reuse (prefix.py; not with a placement)."""
        self.llm = LoopedLlama(
            model_path,
            loop=LoopPlan.parse(plan),
            n_ctx=64,
            n_batch=64,
            n_threads=threads,
            n_threads_batch=threads,
            **(placement.llama_kwargs() if placement else {}),
        )
        self.n_ctx, self.n_batch, self.n_seq, self.kv_type = n_ctx, n_batch, n_seq, kv_type
        self.ctx: SideContext | None = None
        self._plan = self.llm.plan  # the plan scored; the model runs only its tail when _tail
        self._tail = False
        self.prefix: PrefixStates | None = None
        if prefix is not None and prefix.bound > 0:
            if placement is not None:
                raise _lib.BackendError("prefix reuse runs on this machine's model, not on a placement over servers")
            self.prefix = PrefixStates(model_path, self.llm.n_layer_phys, self._context_sizes(), threads, prefix)
        self._open_context()

    def _context_sizes(self) -> dict:
        return {
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_ubatch": min(self.n_batch, 512),
            "n_seq": self.n_seq,
            "kv_type": self.kv_type,
        }

    def _open_context(self) -> None:
        # room for several sequences that share their items' contexts
        self.ctx = self.llm.side_context(**self._context_sizes())

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self.prefix is not None:
            self.prefix.close()
        self.llm.close()

    @property
    def plan(self) -> LoopPlan:
        return self._plan

    @property
    def reuses_prefix(self) -> bool:
        """Whether the current plan is scored by prefix reuse (its tail, on stored states)."""
        return self._tail

    def set_plan(self, plan: LoopPlan | str | None) -> None:
        """Run another plan on the same model load (its tail only, where prefix reuse applies)."""
        plan = LoopPlan.parse(plan)
        tail = self.prefix is not None and refusal(plan, str(self.llm.metadata.get("general.architecture"))) is None
        self.ctx.close()
        try:
            if tail:
                try:
                    self.llm.set_loop_tail(plan)
                except _lib.BackendError:  # a tail the backend refuses (prefix.PREFIX_ARCHS): the whole plan
                    tail = False
            if not tail:
                self.llm.set_loop(plan)
            self._plan, self._tail = plan, tail
        finally:
            self._open_context()

    # -- tokens -----------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def prepare(self, item: Item) -> _Prepared:
        tokens, starts = [], []
        for context, continuation in item.requests():
            ctx = self._tokenize(context)
            whole = self._tokenize(context + continuation)
            start = _common_prefix([ctx, whole])  # where the tokenizer merges across the boundary
            if start == len(whole):
                start = len(whole) - 1
            tokens.append(whole)
            starts.append(max(start, 1))
        over = max(len(t) for t in tokens) - self.n_ctx
        if over > 0:  # too long: drop the oldest context tokens (after BOS), as lm-evaluation-harness does
            tokens = [t[:1] + t[1 + over :] for t in tokens]
            starts = [max(1, s - over) for s in starts]
        shared = min(_common_prefix(tokens), min(starts))
        return _Prepared(item, tokens, starts, shared)

    # -- scoring ----------------------------------------------------------------------------

    def score(self, items: list[Item]) -> list[list[float]]:
        """Log-likelihood of every choice of every item."""
        return [self._score_item(self.prepare(it)) for it in items]

    def _score_item(self, p: _Prepared) -> list[float]:
        """One item: its shared context decoded once, then each choice's own tokens on its own sequence,
        one sequence per decode. llama.cpp's attention over a unified cache is not exact when one ubatch
        holds the tokens of several sequences (llama.cpp issue 24962: up to 0.6 logits off, answers flip;
        docs/reproduction/batch-noise.md), so no batch here mixes sequences: an item's score does not depend
        on the items scored with it or before it. (llama.cpp's CPU attention still sums a ubatch of 32 or
        more tokens differently from shorter ones, so a score is that of this fixed way of decoding.)"""
        if len(p.tokens) > self.n_seq or max(len(t) for t in p.tokens) > self.n_ctx:
            raise _lib.BackendError(
                f"item {p.item.id} needs {max(len(t) for t in p.tokens)} tokens and {len(p.tokens)} sequences, "
                f"more than the scoring context ({self.n_ctx}, {self.n_seq}): its choices are too long"
            )
        if self.reuses_prefix:
            replay = lambda ctx, step: self._replay(p, ctx, step)  # noqa: E731
            feed = iter(self.prefix.states(tuple(map(tuple, p.tokens)), self._plan.start - 1, replay))
            rows = self._replay(p, self.ctx, lambda chunk: self._decode(chunk, next(feed)))
        else:
            rows = self._replay(p, self.ctx, self._decode)
        lls = []
        for c, toks in enumerate(p.tokens):
            # the row that predicts token k: the shared context's last row, or the choice's own
            lls.append(
                sum(float(rows[(0 if k - 1 < p.shared else c, k - 1)][toks[k]]) for k in range(p.starts[c], len(toks)))
            )
        return lls

    def _replay(self, p: _Prepared, ctx: SideContext, step) -> dict[tuple[int, int], np.ndarray]:
        """The item's decode calls on ctx, each chunk of n_batch entries through step(chunk) -> rows:
        the shared context on sequence 0, its cache shared with each choice, each choice's own tokens."""
        ctx.clear()
        rows: dict[tuple[int, int], np.ndarray] = {}

        def run(entries: list[Entry]) -> None:
            for at in range(0, len(entries), self.n_batch):
                rows.update(step(entries[at : at + self.n_batch]))

        run([(tok, pos, 0, pos == p.shared - 1) for pos, tok in enumerate(p.tokens[0][: p.shared])])
        for c in range(1, len(p.tokens) if p.shared else 1):
            ctx.copy_sequence(0, c)  # before any choice adds its own tokens to sequence 0
        for c, toks in enumerate(p.tokens):
            run(
                [
                    (toks[pos], pos, c, pos >= p.starts[c] - 1 and pos < len(toks) - 1)
                    for pos in range(p.shared, len(toks))
                ]
            )
        return rows

    def _decode(self, entries: list[Entry], states: np.ndarray | None = None) -> dict[tuple[int, int], np.ndarray]:
        """Decode (token, position, sequence, wants logits) entries in chunks of n_batch; returns
        the log-softmax rows keyed by (sequence, position). ``states``: the inputs of one chunk's
        entries as hidden states instead of their tokens (prefix reuse)."""
        rows: dict[tuple[int, int], np.ndarray] = {}
        for at in range(0, len(entries), self.n_batch):
            chunk = entries[at : at + self.n_batch]
            try:
                wanted = self.ctx.decode(chunk) if states is None else self.ctx.decode_states(states, chunk)
            except _lib.BackendError as err:
                raise _lib.BackendError(f"{err} while scoring") from None
            for j in wanted:
                _, pos, seq, _ = chunk[j]
                rows[(seq, pos)] = log_softmax(self.ctx.logits(j))
        return rows

    def score_naive(self, items: list[Item]) -> list[list[float]]:
        """The slow reference: every choice gets its own full forward pass."""
        out = []
        for it in items:
            p = self.prepare(it)
            lls = []
            for c, toks in enumerate(p.tokens):
                self.ctx.clear()
                rows = self._decode(
                    [(t, pos, 0, pos >= p.starts[c] - 1 and pos < len(toks) - 1) for pos, t in enumerate(toks)]
                )
                lls.append(sum(float(rows[(0, k - 1)][toks[k]]) for k in range(p.starts[c], len(toks))))
            out.append(lls)
        return out


def accuracy(item: Item, lls: list[float]) -> tuple[bool, bool]:
    """(acc, acc_norm): the choice of highest log-likelihood, raw and per character."""
    conts = [c for _, c in item.requests()]
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, conts)]
    return int(np.argmax(lls)) == item.gold, int(np.argmax(norm)) == item.gold
