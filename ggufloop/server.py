"""An OpenAI-compatible server that offers several loop plans of one model, chosen per request.

One model file is loaded once, as one LoopedLlama; every plan it offers is an OpenAI model id
(``<stem>@<name>``), and a request picks one with the standard ``model`` field. Requests run one
at a time under a lock: a request for another plan than the last one switches the loaded
weights to it with ``set_loop`` (no reload from disk; a new layer schedule recreates the
context, a new mix only clears the KV cache), then generates.

Model ids (``model_ids``):
  ``<stem>``         the default plan: --loop/--mix, else the plan stored in the file, else none;
                     also what a request without a ``model`` field gets
  ``<stem>@none``    the unlooped model, always offered
  ``<stem>@<name>``  each plan given as ``--plan NAME=PLAN``

Only those ids can be chosen: a request naming another model, or carrying a plan or metadata
override in any other field (``loop``, ``plan``, ``mix``, ``kv_overrides``, ``ggufloop.*``, ...),
is refused with a 4xx whose body lists the allowed ids.

The endpoints are those of llama-cpp-python's server, with its request schemas and sampling
defaults (temperature 0.8, repeat_penalty 1.1, ...): /v1/models, /v1/completions,
/v1/chat/completions (both streaming as server-sent events), /extras/tokenize,
/extras/tokenize/count, /extras/detokenize. Input that would reach llama.cpp's C code unchecked
is checked first: token ids (detokenize, logit_bias) must be in the vocabulary, a grammar must
parse with llama.cpp's own parser, text must have a UTF-8 form (no lone surrogates), and a prompt
must fit the context. Limits, each a ``ServeConfig`` field: ``max_tokens`` (a request asking for
more, or for no limit, gets this many), ``request_timeout`` (a generation ends there, as if by
max_tokens) and ``max_input_chars`` (the text one request may send). Tokenizing runs in the worker
threads, never on the event loop. Errors answer in OpenAI's shape (``{"error": {"message", "type",
"param", "code"}}``) and never carry server paths or tracebacks. A model whose logits are not finite
(a damaged file) answers 500 with that reason, never an empty answer: LoopedLlama.eval checks every
evaluated row.

``/v1/completions`` answers ``logprobs`` (at most ``MAX_LOGPROBS`` alternatives) and ``echo`` as
OpenAI's legacy completions do, which is what lm-evaluation-harness's ``gguf`` and
``local-completions`` models ask for. The prompt's log-probabilities are not llama-cpp-python's echo
path (shifted by one position for a model that adds no BOS, llama-cpp-python issue 1983): the prompt,
with the BOS the model adds, is decoded in a side context of the model under the request's plan, and
each echoed token gets the log-softmax of the row before it (the first token of a prompt without a
BOS gets null); only that request's rows are computed, one at a time, and no logits matrix is kept.
Generated tokens get the logits their generation sampled from. ``max_tokens: 0`` with ``echo`` only
scores the prompt. A prompt may be a list of token ids, taken as it is (no BOS added). ``logprobs`` or
``echo`` with ``stream``, and ``logprobs`` on chat completions, are refused with a 400 naming the field.
vLLM's ``/tokenizer_info``, ``/tokenize`` (``add_special_tokens``) and ``/detokenize`` are served too:
lm-evaluation-harness's ``local-completions`` model tokenizes through them (its remote tokenizer).

This module imports FastAPI and llama.cpp; ``ggufloop.cli.serve`` imports it only when it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
import json
import re
import sys
import threading
import time
import traceback
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import llama_cpp
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from llama_cpp.server.types import (
    CreateChatCompletionRequest,
    CreateCompletionRequest,
    DetokenizeInputRequest,
    TokenizeInputRequest,
)
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import _compat
from .errors import BackendError, PlanError
from .numeric import log_softmax
from .plan import LoopPlan
from .runtime import LoopedLlama

T = TypeVar("T")

DEFAULT_MAX_INPUT_CHARS = 1_000_000
MAX_LOGPROBS = 20  # the most alternatives per token a completion's `logprobs` asks for
API_KEY_ENV = "GGUFLOOP_API_KEY"
UNLOOPED = "none"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# request fields that would choose a plan, or change the model, another way than `model`
PLAN_FIELDS = frozenset(
    {
        "loop",
        "plan",
        "mix",
        "layers",
        "schedule",
        "kv_overrides",
        "kv_override",
        "override_kv",
        "overrides",
        "model_path",
        "lora_path",
        "lora_base",
        "n_gpu_layers",
        "rpc",
        "rpc_servers",
        "tensor_split",
        "devices",
    }
)
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.+@~-]+){2,}[\\/]?")


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """What ``ggufloop serve`` serves: one model file, its plans, and how to run it.

    ``plans`` maps a name to a plan (``--plan NAME=PLAN``); ``default`` is the plan served under
    the plain stem (None: the unlooped model). ``api_key``: requests must carry
    ``Authorization: Bearer <api_key>`` (None: no key asked). ``rpc`` and ``tensor_split``: the
    model split over llama.cpp RPC servers (``ggufloop.rpc``), ``n_gpu_layers`` layers off the CPU.
    ``max_tokens``: the most tokens one request generates (None: n_ctx); ``request_timeout``: seconds
    of generation one request may take (None: no limit); ``max_input_chars``: the most characters of
    text one request may send (its strings together), and the most token ids of a detokenize request.
    """

    model_path: Path
    plans: dict[str, LoopPlan] = field(default_factory=dict)
    default: LoopPlan | None = None
    n_ctx: int = 2048
    n_gpu_layers: int = 0
    rpc: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None
    threads: int | None = None
    seed: int = llama_cpp.LLAMA_DEFAULT_SEED
    api_key: str | None = None
    verbose: bool = False
    max_tokens: int | None = None
    request_timeout: float | None = None
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS

    @property
    def stem(self) -> str:
        return Path(self.model_path).stem


def parse_named_plan(text: str) -> tuple[str, LoopPlan]:
    """``NAME=PLAN`` (``uniform=10:15x3/uniform``) as (name, plan); PlanError says what is wrong."""
    name, eq, plan = text.partition("=")
    name = name.strip()
    if not eq or not plan.strip():
        raise PlanError(f"--plan takes NAME=PLAN, such as uniform=10:15x3/uniform; got {text!r}")
    if not _NAME.match(name):
        raise PlanError(f"plan name {name!r}: use letters, digits, '_', '.' or '-' (at most 64, no '@' or '=')")
    if name == UNLOOPED:
        raise PlanError(f"plan name {UNLOOPED!r} is reserved for the unlooped model, which is always served")
    return name, LoopPlan.parse(plan)


def model_ids(config: ServeConfig) -> dict[str, LoopPlan]:
    """Every model id the server offers, with its plan, in the order /v1/models lists them."""
    ids = {config.stem: config.default or LoopPlan(), f"{config.stem}@{UNLOOPED}": LoopPlan()}
    for name, plan in config.plans.items():
        ids[f"{config.stem}@{name}"] = plan
    return ids


# -- errors -------------------------------------------------------------------------------------


class ServeError(Exception):
    """A request the server refuses or could not answer; becomes an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        **extra: Any,
    ) -> None:
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.extra = (
            status,
            message,
            kind,
            param,
            code,
            extra,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code, **self.extra}
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def scrub(text: str) -> str:
    """text without file system paths (a server's layout is none of a client's business)."""
    return _PATH.sub("<path>", text)


def _printable(text: str) -> str:
    """text that has a UTF-8 form: a client's lone surrogate quoted in an error is escaped, not a crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- the engine: one model, its plans, one request at a time ---------------------------------------


class PlanServer:
    """One LoopedLlama and the plans it offers; runs requests one at a time, switching plans on the
    loaded weights. Usable without HTTP (the app below is a thin layer over it)."""

    def __init__(self, config: ServeConfig, llm: LoopedLlama | None = None) -> None:
        self.config = config
        self.models = model_ids(config)
        self.default_id = config.stem
        self._lock = threading.Lock()
        default = self.models[self.default_id]
        self.llm = llm if llm is not None else _open(config, default)
        self._current = self.llm.plan if llm is not None else default
        self.n_vocab = self.llm.n_vocab()
        self.created = int(time.time())
        self.max_tokens = config.max_tokens or config.n_ctx
        self._deadline: float | None = None  # of the running request's generation (request_timeout)
        self._timed_out = False
        self._capture: list[tuple[int, float, list[tuple[int, float]]]] | None = None  # generated tokens' logprobs
        self._capture_top = 0
        self._limit_generation()

    def close(self) -> None:
        self.llm.close()

    # -- choosing a plan

    def resolve(self, model: str | None) -> tuple[str, LoopPlan]:
        """The (id, plan) a request's ``model`` field names; None means the default id."""
        model_id = self.default_id if model in (None, "") else model
        if model_id not in self.models:
            raise ServeError(
                404,
                f"unknown model {model_id!r}: this server offers {', '.join(self.models)}",
                param="model",
                code="model_not_found",
                allowed=list(self.models),
            )
        return model_id, self.models[model_id]

    def refuse_plan_fields(self, fields: dict[str, Any] | None) -> None:
        """Refuse a request that carries a plan or an override outside the ``model`` field."""
        for key in fields or {}:
            low = key.lower()
            if low in PLAN_FIELDS or low.startswith("ggufloop"):
                raise ServeError(
                    400,
                    f"field {key!r} is not accepted: a request chooses its plan with the 'model' field, "
                    f"one of {', '.join(self.models)}",
                    param=key,
                    code="plan_not_allowed",
                    allowed=list(self.models),
                )

    def _use(self, plan: LoopPlan) -> None:
        if str(plan) != str(self._current):
            self.llm.set_loop(plan)
            self._current = plan

    def run(self, model: str | None, call: Callable[[LoopedLlama], T], prompt_field: str = "prompt") -> T:
        """call(llm) under the lock, with the plan of ``model``; blocks while another request runs.
        A prompt that does not fit the context is a 400 naming ``prompt_field``."""
        _, plan = self.resolve(model)
        with self._lock:
            try:
                self._use(plan)
                self._start_clock()
                answer = call(self.llm)
                if self._timed_out:
                    _ended_by_limit(answer)
                return answer
            except BackendError as err:
                self.llm.reset()
                raise _model_error(err) from None
            except ValueError as err:
                raise _too_long(err, prompt_field) from None
            finally:
                self._deadline = None

    def stream(
        self, model: str | None, call: Callable[[LoopedLlama], Iterator[T]], prompt_field: str = "prompt"
    ) -> Iterator[T]:
        """The chunks of call(llm), generated under the lock (held until the iterator is exhausted
        or closed: close it when the client goes away)."""
        _, plan = self.resolve(model)
        with self._lock:
            try:
                self._use(plan)
                self._start_clock()
                for chunk in call(self.llm):
                    if self._timed_out:
                        _ended_by_limit(chunk)
                    yield chunk
            except BackendError as err:
                self.llm.reset()
                raise _model_error(err) from None
            except ValueError as err:
                raise _too_long(err, prompt_field) from None
            finally:
                self._deadline = None

    # -- the time limit of a request (request_timeout)

    def _start_clock(self) -> None:
        timeout = self.config.request_timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timed_out = False

    def _limit_generation(self) -> None:
        """Make the llm's token generator end a request's generation at its deadline, as the model's
        end-of-generation token would (llama-cpp-python then finishes the answer with the text so far;
        ``run`` and ``stream`` report finish_reason "length"). Checked before each token after the first."""
        generate = self.llm.generate
        vocab = _compat.vocab(self.llm)
        ends = [t for t in (self.llm.token_eos(), llama_cpp.llama_vocab_eot(vocab)) if t >= 0]
        end = next((t for t in ends if llama_cpp.llama_vocab_is_eog(vocab, t)), None)

        def limited(*args: Any, **kwargs: Any) -> Iterator[int]:
            tokens = generate(*args, **kwargs)
            try:
                sent = None
                while True:
                    try:
                        token = tokens.send(sent) if sent is not None else next(tokens)
                    except StopIteration:
                        return
                    if self._capture is not None:  # the logits it was sampled from: the context's last row
                        row = np.ctypeslib.as_array(
                            llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,)
                        )
                        self._capture.append((token, *_logprob(row, token, self._capture_top)))
                    sent = yield token
                    if self._deadline is not None and time.monotonic() >= self._deadline:
                        self._timed_out = True
                        if end is None:
                            raise ServeError(
                                503,
                                "the request reached the server's time limit, and this model has no "
                                "end-of-generation token to end its answer with",
                                kind="server_error",
                                code="timeout",
                            )
                        yield end
                        return
            finally:
                tokens.close()

        self.llm.generate = limited  # type: ignore[method-assign]

    # -- checks before anything reaches llama.cpp

    def check_text(self, body: Any) -> None:
        """Refuse a request whose text has no UTF-8 form (a lone surrogate such as "\\ud800", which
        JSON's escapes allow and llama.cpp's tokenizer cannot take), or that sends more characters, its
        strings together, than ``max_input_chars``; the 400 names the field."""
        cap = self.config.max_input_chars
        total = 0
        todo: list[tuple[str, Any]] = [(name, getattr(body, name)) for name in reversed(type(body).model_fields)]
        while todo:
            where, value = todo.pop()
            if isinstance(value, str):
                total += len(value)
                if total > cap:
                    raise ServeError(
                        400,
                        f"{where}: the request's text is more than {cap} characters, this server's "
                        "limit (--max-input-chars)",
                        param=where,
                    )
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ServeError(
                        400,
                        f"{where} is not valid text: character {err.start} is a lone surrogate "
                        f"(U+{ord(value[err.start]):04X}), which has no UTF-8 form",
                        param=where,
                    ) from None
            elif isinstance(value, dict):
                for key, item in value.items():
                    todo.append((f"{where} (a key)", key))
                    todo.append((f"{where}.{key}", item))
            elif isinstance(value, (list, tuple)):
                if len(value) > cap:
                    raise ServeError(
                        400,
                        f"{where}: {len(value)} items, more than this server's limit of {cap} (--max-input-chars)",
                        param=where,
                    )
                todo.extend(
                    (f"{where}[{i}]", item)
                    for i, item in enumerate(value)
                    if not isinstance(item, (int, float)) and item is not None
                )
            elif hasattr(value, "model_dump"):
                todo.append((where, value.model_dump()))

    def tokenize(self, body: Any, text: str | None = None, add_special: bool = True) -> list[int]:
        """The token ids of a tokenize request's checked text (``body.input`` unless ``text``), with
        the BOS the model adds where ``add_special`` (run it in a worker thread)."""
        self.check_text(body)
        data = (body.input if text is None else text).encode("utf-8")
        return self.llm.tokenize(data, add_bos=add_special, special=True)

    def detokenize(self, body: Any) -> str:
        """The text of a detokenize request's checked token ids (run it in a worker thread)."""
        self.check_text(body)
        self.check_tokens(body.tokens)
        return self.llm.detokenize(body.tokens).decode("utf-8", errors="replace")

    def tokenizer_info(self) -> dict[str, Any]:
        """What lm-evaluation-harness's remote tokenizer asks of a server (vLLM's ``/tokenizer_info``):
        the special tokens as text, whether the model adds a BOS, the chat template, the context."""
        llm = self.llm
        vocab = _compat.vocab(llm)

        def text(token: int) -> str | None:
            return _piece(vocab, token).decode("utf-8", "replace") if token >= 0 else None

        return {
            "tokenizer_class": "gguf",
            "bos_token": text(llm.token_bos()),
            "eos_token": text(llm.token_eos()),
            "pad_token": None,
            "add_bos_token": _compat.adds_bos(llm),
            "chat_template": llm.metadata.get("tokenizer.chat_template"),
            "model_max_length": llm.n_ctx(),
        }

    def check_tokens(self, tokens: list[int], param: str = "tokens") -> None:
        """Refuse token ids outside the vocabulary (llama.cpp would abort the process on them)."""
        for tok in tokens:
            if not (0 <= tok < self.n_vocab):
                raise ServeError(
                    400,
                    f"token id {tok} is out of range: this model's vocabulary has ids 0..{self.n_vocab - 1}",
                    param=param,
                )

    def check_grammar(self, grammar: str) -> None:
        """Refuse a grammar that llama.cpp's own parser rejects (it would return no sampler, and
        llama-cpp-python would crash the process on it)."""
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise ServeError(
                400,
                "invalid grammar: llama.cpp's GBNF parser refused it (a syntax error, an undefined "
                "rule, left recursion, or no 'root' rule)",
                param="grammar",
            )
        llama_cpp.llama_sampler_free(sampler)

    def sampling_kwargs(self, body: CreateCompletionRequest | CreateChatCompletionRequest) -> dict[str, Any]:
        """The Llama keyword arguments of a completion or chat request, checked; max_tokens at most
        the server's cap (a request asking for more, or for no limit, gets the cap)."""
        self.check_text(body)
        if (body.n or 1) != 1:
            raise ServeError(400, "n > 1 is not supported: send one request per choice", param="n")
        if isinstance(body, CreateCompletionRequest):
            self._check_logprobs(body)
        else:  # chat: OpenAI's logprobs there are per generated token only, which this server does not give
            if body.logprobs:
                raise _unsupported("logprobs")
            if body.top_logprobs:
                raise _unsupported("top_logprobs")
        kwargs = body.model_dump(exclude={"model", "n", "best_of", "logit_bias_type", "user", "min_tokens", "grammar"})
        for key in body.model_extra or {}:
            kwargs.pop(key, None)
        if kwargs.get("logprobs") is False:
            kwargs["logprobs"] = None
        if kwargs.get("max_tokens") is None or not 0 < kwargs["max_tokens"] <= self.max_tokens:
            kwargs["max_tokens"] = self.max_tokens
        if body.logit_bias:
            kwargs["logit_bias"] = self._logit_bias(body.logit_bias, body.logit_bias_type)
        if body.grammar is not None:
            self.check_grammar(body.grammar)
            kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(body.grammar, verbose=False)
        if body.min_tokens > 0:
            kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
                [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, self.llm.token_eos())]
            )
        return kwargs

    def _check_logprobs(self, body: CreateCompletionRequest) -> None:
        """Refuse what a completion's logprobs and echo cannot be combined with here, naming the field."""
        if body.logprobs is not None and body.logprobs > MAX_LOGPROBS:
            raise ServeError(
                400,
                f"logprobs is {body.logprobs}: this server gives at most {MAX_LOGPROBS} alternatives per token",
                param="logprobs",
            )
        for name in ("logprobs", "echo"):
            if body.stream and getattr(body, name) not in (None, False):
                raise ServeError(
                    400, f"{name} with stream is not supported by this server: send stream false", param=name
                )
            if body.suffix is not None and getattr(body, name) not in (None, False):
                raise ServeError(
                    400, f"suffix with {name} is not supported by this server: leave it out", param="suffix"
                )

    # -- completions with logprobs or echo

    def scored_completion(
        self, llm: LoopedLlama, kwargs: dict[str, Any], n_top: int | None, echo: bool, generate: bool
    ) -> dict[str, Any]:
        """A completion with OpenAI's ``logprobs`` (n_top alternatives per token; None: no logprobs)
        and ``echo``: the prompt's log-probabilities from a side context under the current plan, the
        generated tokens' from the logits they were sampled from (run it under the lock)."""
        prompt = kwargs["prompt"]
        vocab = _compat.vocab(llm)
        if isinstance(prompt, str):  # as llama-cpp-python tokenizes a completion's prompt
            data = prompt.encode("utf-8")
            body = llm.tokenize(data, add_bos=False, special=True) if prompt else []
            bos = [llm.token_bos()] if _compat.adds_bos(llm) and llm.token_bos() >= 0 else []
        else:  # token ids: as given, no BOS added (as llama-cpp-python does); echoed as their pieces
            body, bos = list(prompt), []
            data = b"".join(_piece(vocab, t) for t in body)
        text = data.decode("utf-8", "replace")
        tokens = bos + body
        if not body and not (bos and generate):
            raise ServeError(400, "prompt is empty: nothing to score or continue", param="prompt")
        n_ctx = llm.n_ctx()
        if len(tokens) > n_ctx - generate:
            raise _too_long_error(len(tokens), n_ctx, "prompt", generate)
        pieces = [_piece(vocab, t) for t in body]
        entries: list[tuple[str, int, float | None, list[tuple[int, float]]]] = []
        if echo and n_top is not None:
            scored = self._score_prompt(llm, tokens, len(bos), n_top)
            for token, piece, offset, (value, top) in zip(body, pieces, _offsets(data, pieces), scored):
                entries.append((_token_text(piece), offset, value, top + [(token, value)] if value is not None else []))
        finish, generated, n_generated = "length", "", 0
        if generate:
            self._capture, self._capture_top = [], n_top or 0
            try:
                answer = llm.create_completion(**{**kwargs, "echo": False, "logprobs": None, "stream": False})
            finally:
                captured, self._capture = self._capture, None
            choice = answer["choices"][0]
            generated, finish = choice["text"], choice["finish_reason"]
            n_generated = answer["usage"]["completion_tokens"]
            if n_top is not None:
                entries += _generated_entries(vocab, captured, len(text), generated, finish)
        logprobs = None
        if n_top is not None:
            logprobs = {
                "tokens": [e[0] for e in entries],
                "text_offset": [e[1] for e in entries],
                "token_logprobs": [e[2] for e in entries],
                "top_logprobs": [_top_dict(vocab, e[3]) if e[2] is not None else None for e in entries],
            }
        return {
            "id": f"cmpl-{uuid.uuid4()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": kwargs.get("model"),
            "choices": [
                {
                    "text": (text if echo else "") + generated,
                    "index": 0,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(tokens),
                "completion_tokens": n_generated,
                "total_tokens": len(tokens) + n_generated,
            },
        }

    def _score_prompt(
        self, llm: LoopedLlama, tokens: list[int], first: int, n_top: int
    ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """(log-probability, the n_top best (token, log-probability)) of tokens[k] given tokens[:k], for
        k from first on ((None, []) for k = 0): the whole prompt decoded from position 0 in a context of
        its own under the current plan, in the model's batch size, as generation decodes a prompt."""
        n = len(tokens)
        lo = max(first, 1) - 1  # the first row wanted: the one predicting tokens[first]
        size = -(-n // 256) * 256
        n_batch = min(llm.n_batch, size)
        out: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if lo >= n - 1:  # one token and no BOS: nothing to score
            return [(None, [])] * (n - first)
        with llm.side_context(size, n_batch, min(llm.context_params.n_ubatch, n_batch)) as side:
            for at in range(0, n, n_batch):
                chunk = [(tokens[p], p, 0, lo <= p < n - 1) for p in range(at, min(n, at + n_batch))]
                for j in side.decode(chunk):
                    pos = chunk[j][1]
                    out[pos + 1] = _logprob(side.logits(j), tokens[pos + 1], n_top)
        return [out.get(k, (None, [])) for k in range(first, n)]

    def _logit_bias(self, bias: dict[str, float], kind: str | None) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in bias.items():
            if kind == "tokens":
                ids = self.llm.tokenize(key.encode("utf-8"), add_bos=False, special=True)
            else:
                try:
                    ids = [int(key)]
                except ValueError:
                    raise ServeError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
                self.check_tokens(ids, "logit_bias")
            for tok in ids:
                out[str(tok)] = value
        return out


def _open(config: ServeConfig, plan: LoopPlan) -> LoopedLlama:
    """The server's one LoopedLlama, running plan (a general schedule too long for a metadata
    override is set after loading)."""
    extra: dict[str, Any] = {"n_threads": config.threads, "n_threads_batch": config.threads} if config.threads else {}
    if config.rpc:
        extra["rpc"] = ",".join(config.rpc)
    if config.tensor_split is not None:
        extra["tensor_split"] = list(config.tensor_split)
    try:
        plan.kv_overrides()
        first = plan
    except PlanError:
        first = LoopPlan()
    llm = LoopedLlama(
        str(config.model_path),
        loop=first,
        n_ctx=config.n_ctx,
        n_gpu_layers=config.n_gpu_layers,
        seed=config.seed,
        verbose=config.verbose,
        **extra,
    )
    if first is not plan:
        llm.set_loop(plan)
    return llm


def _model_error(err: BackendError) -> ServeError:
    return ServeError(500, f"the model failed: {scrub(str(err))}", kind="server_error", code="model_error")


def _unsupported(name: str) -> ServeError:
    message = (
        f"{name} is not supported on chat completions by this server: leave it out, or ask /v1/completions "
        "with logprobs (and echo for the prompt's)"
    )
    return ServeError(400, message, param=name)


def _too_long(err: ValueError, field: str) -> Exception:
    """llama-cpp-python's refusal of a prompt longer than the context as a 400 naming both counts;
    any other ValueError as it was."""
    counts = _compat.prompt_exceeds_context(err)
    if counts is None:
        return err
    return _too_long_error(*counts, field)


def _too_long_error(n_prompt: int, n_ctx: int, field: str, generate: bool = True) -> ServeError:
    room = " (the prompt must leave room for at least one generated token)" if generate else ""
    return ServeError(
        400,
        f"{field}: the prompt is {n_prompt} tokens, and the context holds {n_ctx}{room}: shorten it",
        param=field,
        code="context_length_exceeded",
        prompt_tokens=n_prompt,
        n_ctx=n_ctx,
    )


# -- log-probabilities --------------------------------------------------------------------------


def _logprob(logits: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """token's log-probability under one row of logits, and the n_top most likely (token, log-probability)."""
    row = log_softmax(logits)
    if not np.isfinite(row[token]):
        raise BackendError("the model produced non-finite logits (NaN or infinity) while scoring the prompt")
    top: list[tuple[int, float]] = []
    if n_top:
        best = np.argpartition(-row, n_top - 1)[:n_top]
        top = [(int(i), float(row[i])) for i in best[np.argsort(-row[best], kind="stable")]]
    return float(row[token]), top


def _piece(vocab: Any, token: int) -> bytes:
    """The bytes of one token as generation writes them (special tokens as their text)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, True)
    return buf.raw[: max(n, 0)]


def _token_text(piece: bytes) -> str:
    """A token's text, as OpenAI writes it: bytes that are not UTF-8 by themselves as ``bytes:\\xNN``."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def _top_dict(vocab: Any, top: list[tuple[int, float]]) -> dict[str, float]:
    """OpenAI's top_logprobs entry: token text -> log-probability (tokens of one text: the highest)."""
    out: dict[str, float] = {}
    for token, value in top:
        key = _token_text(_piece(vocab, token))
        out[key] = max(value, out.get(key, value))
    return out


def _offsets(data: bytes, pieces: list[bytes], at: int = 0) -> list[int]:
    """The character offset in data's text (plus at) where each token starts. The pieces spell data,
    after the leading blanks a SentencePiece tokenizer adds; a token that starts inside a character
    starts at that character."""
    joined = b"".join(pieces)
    shift = 0
    if joined != data and joined.endswith(data) and not joined[: len(joined) - len(data)].strip(b" "):
        shift = len(joined) - len(data)
    starts = [i for i, b in enumerate(data) if b & 0xC0 != 0x80]  # the first byte of each character
    out, pos = [], 0
    for piece in pieces:
        b = max(0, pos - shift)
        out.append(at + (bisect_right(starts, b) - 1 if b < len(data) else len(starts)))
        pos += len(piece)
    return out


def _generated_entries(
    vocab: Any, captured: list[tuple[int, float, list[tuple[int, float]]]], at: int, text: str, finish: str
) -> list[tuple[str, int, float, list[tuple[int, float]]]]:
    """The logprobs entries of the generated tokens, offsets counted from at: every token generated,
    the end-of-generation token included (OpenAI lists it, and lm-eval drops the last entry as the
    generated one); after a stop sequence, only the tokens that start before it."""
    pieces = [_piece(vocab, t) for t, _, _ in captured]
    offsets = _offsets(b"".join(pieces), pieces, at)
    eog = bool(captured) and llama_cpp.llama_vocab_is_eog(vocab, captured[-1][0])
    cut = finish == "stop" and not eog  # a stop sequence ended it
    out = []
    for (token, value, top), piece, offset in zip(captured, pieces, offsets):
        if cut and offset >= at + len(text):
            break
        out.append((_token_text(piece), min(offset, at + len(text)), value, top + [(token, value)]))
    return out


def _ended_by_limit(answer: Any) -> None:
    """Mark the choices of an answer (or a chunk) that the time limit ended: finish_reason "length"."""
    if isinstance(answer, dict):
        for choice in answer.get("choices") or ():
            if choice.get("finish_reason") is not None:
                choice["finish_reason"] = "length"


# -- the HTTP layer -----------------------------------------------------------------------------


def _keeping_extras(schema: type) -> type:
    """schema with unknown fields kept (in ``model_extra``): plan fields are refused by name, others ignored."""
    return type(schema.__name__, (schema,), {"model_config": {**schema.model_config, "extra": "allow"}})


class _CompletionRequest(CreateCompletionRequest):
    """llama-cpp-python's completion request, whose prompt may also be token ids, as OpenAI's may."""

    prompt: str | list[str] | list[int] | list[list[int]] = ""


CompletionRequest = _keeping_extras(_CompletionRequest)
ChatRequest = _keeping_extras(CreateChatCompletionRequest)
TokenizeRequest = _keeping_extras(TokenizeInputRequest)
DetokenizeRequest = _keeping_extras(DetokenizeInputRequest)


class _TextTokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` request, as lm-evaluation-harness's remote tokenizer sends it."""

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class _TokensDetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize`` request."""

    tokens: list[int]
    model: str | None = None


TextTokenizeRequest = _keeping_extras(_TextTokenizeRequest)
TokensDetokenizeRequest = _keeping_extras(_TokensDetokenizeRequest)


def create_app(server: PlanServer) -> FastAPI:
    """The FastAPI app over a PlanServer: OpenAI's endpoints and llama-cpp-python's extras."""
    app = FastAPI(title="ggufloop", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable) -> Any:
        key = server.config.api_key
        if key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                return ServeError(401, "invalid or missing API key", code="invalid_api_key").response(
                    {"WWW-Authenticate": "Bearer"}
                )
        for key_name in request.query_params:
            try:
                server.refuse_plan_fields({key_name: None})
            except ServeError as err:
                return err.response()
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems, fields = [], []
        for e in err.errors()[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
            fields.append(where)
        param = fields[0] if len(set(fields)) == 1 else None  # the one field at fault, where there is one
        return ServeError(400, scrub("invalid request: " + "; ".join(problems)), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return ServeError(err.status_code, scrub(str(err.detail)), kind=kind).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        traceback.print_exception(err, file=sys.stderr)  # the server's log, not the client's
        return ServeError(500, "internal server error", kind="server_error").response()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server, i) for i in server.models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        server.resolve(model_id)
        return _model_card(server, model_id)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        server.refuse_plan_fields(body.model_extra)
        model_id, _ = server.resolve(body.model)
        if isinstance(body.prompt, list) and not (body.prompt and all(isinstance(t, int) for t in body.prompt)):
            if len(body.prompt) > 1:
                raise ServeError(400, "one prompt per request", param="prompt")
            body.prompt = body.prompt[0] if body.prompt else ""
        if isinstance(body.prompt, list):  # token ids, taken as they are (no BOS added), as OpenAI's API does
            server.check_tokens(body.prompt, "prompt")
        echo_only = body.echo and body.max_tokens == 0  # the prompt's log-likelihood, nothing generated
        kwargs = await run_in_threadpool(server.sampling_kwargs, body)
        kwargs["model"] = model_id  # the answer names the id, not the file
        if body.logprobs is None and not body.echo:
            call = lambda llm: llm.create_completion(**kwargs)  # noqa: E731
        else:
            call = lambda llm: server.scored_completion(llm, kwargs, body.logprobs, body.echo, not echo_only)  # noqa: E731
        return await _answer(server, model_id, body.stream, call, "prompt")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Any:
        server.refuse_plan_fields(body.model_extra)
        model_id, _ = server.resolve(body.model)
        kwargs = await run_in_threadpool(server.sampling_kwargs, body)
        kwargs["model"] = model_id
        call = lambda llm: llm.create_chat_completion(**kwargs)  # noqa: E731
        return await _answer(server, model_id, body.stream, call, "messages")

    # the extras run in the worker threads, answer encoded there too: a long input stalls no other request

    @app.post("/extras/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        server.refuse_plan_fields(body.model_extra)
        server.resolve(body.model)
        return await run_in_threadpool(lambda: JSONResponse({"tokens": server.tokenize(body)}))

    @app.post("/extras/tokenize/count")
    async def count(body: TokenizeRequest) -> JSONResponse:
        server.refuse_plan_fields(body.model_extra)
        server.resolve(body.model)
        return await run_in_threadpool(lambda: JSONResponse({"count": len(server.tokenize(body))}))

    @app.post("/extras/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        server.refuse_plan_fields(body.model_extra)
        server.resolve(body.model)

        return await run_in_threadpool(lambda: JSONResponse({"text": server.detokenize(body)}))

    # vLLM's tokenizer endpoints, which lm-evaluation-harness's local-completions model finds and uses
    # (tokenizer_backend remote, its default where they answer): no Hugging Face tokenizer is needed

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return await run_in_threadpool(lambda: JSONResponse(server.tokenizer_info()))

    @app.post("/tokenize")
    async def tokenize_text(body: TextTokenizeRequest) -> JSONResponse:
        server.refuse_plan_fields(body.model_extra)
        server.resolve(body.model)

        def answer() -> JSONResponse:
            tokens = server.tokenize(body, body.prompt, body.add_special_tokens)
            return JSONResponse({"count": len(tokens), "max_model_len": server.llm.n_ctx(), "tokens": tokens})

        return await run_in_threadpool(answer)

    @app.post("/detokenize")
    async def detokenize_tokens(body: TokensDetokenizeRequest) -> JSONResponse:
        server.refuse_plan_fields(body.model_extra)
        server.resolve(body.model)

        return await run_in_threadpool(lambda: JSONResponse({"prompt": server.detokenize(body)}))

    return app


def _model_card(server: PlanServer, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": server.created,
        "owned_by": "ggufloop",
        "plan": str(server.models[model_id]),
    }


async def _answer(
    server: PlanServer, model: str | None, stream: bool, call: Callable[[LoopedLlama], Any], prompt_field: str
) -> Any:
    """The JSON answer of call, or its chunks as server-sent events ending with [DONE]. A stream's
    first chunk is generated before the answer begins, so an error before it (a prompt longer than
    the context, a failing model) has its own status, not a 200 whose last event is the error."""
    if not stream:
        return JSONResponse(await run_in_threadpool(server.run, model, call, prompt_field))
    chunks = server.stream(model, call, prompt_field)
    try:
        first = await run_in_threadpool(next, chunks, None)
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await run_in_threadpool(chunks.close)
        raise

    async def events() -> Any:
        try:
            if first is not None:
                yield {"data": json.dumps(first)}
            async for chunk in iterate_in_threadpool(chunks):
                yield {"data": json.dumps(chunk)}
        except ServeError as err:  # the answer has begun: the error goes as the last event
            yield {"data": json.dumps(err.body())}
            return
        except Exception as err:
            traceback.print_exception(err, file=sys.stderr)
            yield {"data": json.dumps(ServeError(500, "internal server error", kind="server_error").body())}
            return
        finally:
            with anyio.CancelScope(shield=True):  # a client that left: release the model for the next
                with contextlib.suppress(Exception):
                    await run_in_threadpool(chunks.close)
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())
