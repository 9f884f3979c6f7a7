"""The one module that touches llama-cpp-python's private code (tests/test_layout.py checks that no other does).

llama-cpp-python 0.3.36 gives no public way to do five things ggufloop needs:

- replace the native context under a ``Llama`` (a schedule changes only while no context exists, so
  ``LoopedLlama.set_loop`` frees it and makes a new one, keeping the wrapper and its sampler state);
- give a load the devices of RPC servers (``Llama`` builds its model parameters itself);
- load a file whose chat template jinja2 cannot compile (``Llama`` compiles every template while it loads);
- tell whether ``Llama.__init__`` got far enough for ``close`` to work;
- tell its "the context is full" errors from others (they are plain ValueError and RuntimeError).

The two load-time substitutions replace a llama-cpp-python class for the duration of one load. They are
scoped to the thread that asks (a lock serializes such loads, and the substitute acts for its own thread
only), so a load in another thread meanwhile gets llama-cpp-python's own behaviour.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

import llama_cpp

_swap_lock = threading.RLock()  # a load can take both substitutions


def free_context(llm: llama_cpp.Llama) -> None:
    """Free llm's native context, keeping its Python wrapper (install_context gives it a new one)."""
    llama_cpp.llama_free(llm._ctx.ctx)
    llm._ctx.ctx = None


def install_context(llm: llama_cpp.Llama, ctx: Any) -> None:
    """Put a native context made with llm's own parameters under llm's wrapper."""
    llm._ctx.ctx, llm._ctx.memory = ctx, llama_cpp.llama_get_memory(ctx)


def initialized(llm: llama_cpp.Llama) -> bool:
    """Whether Llama.__init__ got as far as the resources that close() releases."""
    return "_stack" in llm.__dict__


def vocab(llm: llama_cpp.Llama) -> Any:
    """The model's llama_vocab pointer."""
    return llama_cpp.llama_model_get_vocab(llm.model)


def adds_bos(llm: llama_cpp.Llama) -> bool:
    """Whether the model's tokenizer adds a BOS token to a prompt."""
    return bool(llama_cpp.llama_vocab_get_add_bos(vocab(llm)))


def context_is_full(err: BaseException) -> bool:
    """A generation's decode found no room in the KV cache for the next token (llama_decode's status 1)."""
    return isinstance(err, RuntimeError) and "llama_decode returned 1" in str(err)


_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def prompt_exceeds_context(err: BaseException) -> tuple[int, int] | None:
    """(prompt tokens, context size) when err is Llama's refusal of a prompt longer than the context (its
    check before it decodes), else None."""
    match = _TOO_LONG.search(str(err)) if isinstance(err, ValueError) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


@contextlib.contextmanager
def _substituted(module: Any, name: str, make: Any, state: threading.local, value: Any) -> Iterator[None]:
    """module.name replaced by make(original) while this thread's state.value is set; one such load at a time."""
    with _swap_lock:
        plain = getattr(module, name)
        setattr(module, name, make(plain))
        state.value = value
        try:
            yield
        finally:
            state.value = None
            setattr(module, name, plain)


_devices = threading.local()


@contextlib.contextmanager
def loading_with_devices(pointer: Any) -> Iterator[None]:
    """While llama-cpp-python loads a model in this thread, give the load these devices (a NULL-ended
    ggml_backend_dev_t array): its model wrapper sets ``params.devices`` just before the load."""
    from llama_cpp import _internals

    def make(plain: type) -> type:
        class WithDevices(plain):
            def __init__(self, *args: Any, params: Any, **kwargs: Any) -> None:
                if getattr(_devices, "value", None) is not None:
                    params.devices = _devices.value
                super().__init__(*args, params=params, **kwargs)

        return WithDevices

    with _substituted(_internals, "LlamaModel", make, _devices, pointer):
        yield


_templates = threading.local()


@contextlib.contextmanager
def tolerating_broken_templates(error: str) -> Iterator[None]:
    """While llama-cpp-python loads a model in this thread, a chat template that does not compile loads as
    a formatter that raises ``error`` (a BackendError) when a chat asks for it; completions need none."""
    from llama_cpp import llama_chat_format

    from .errors import BackendError

    def make(plain: type) -> type:
        class Tolerant(plain):
            def __init__(self, template: str, *args: Any, **kwargs: Any) -> None:
                try:
                    super().__init__(template, *args, **kwargs)
                    self.error = None
                except Exception:  # jinja2 raises several types for a broken template
                    if getattr(_templates, "value", None) is None:
                        raise
                    self.template, self.error = template, _templates.value

            def __call__(self, **kwargs: Any) -> Any:
                if self.error:
                    raise BackendError(self.error)
                return super().__call__(**kwargs)

        return Tolerant

    with _substituted(llama_chat_format, "Jinja2ChatFormatter", make, _templates, error):
        yield
