"""llama.cpp's own programs, built from the patched tree with the installed backend and shipped in the
wheel next to its libraries (patches/tools.cmake): they run loop plans as llama.cpp runs any metadata
override, ``--override-kv ggufloop.loop.start=int:S ...`` (``LoopPlan.override_strings``)."""

from __future__ import annotations

from pathlib import Path

from .errors import BackendError

# the name a user knows -> the file names it may have in the wheel, and what it is for
PROGRAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "rpc-server": (("ggml-rpc-server", "rpc-server"), "this machine's devices for a split model (ggufloop rpc-server)"),
    "llama-perplexity": (("llama-perplexity",), "perplexity and KL divergence (the oracle of ggufloop perplexity)"),
    "llama-quantize": (("llama-quantize",), "requantize a model (the quantization scale)"),
    "llama-bench": (("llama-bench",), "prompt and generation throughput"),
    "llama-completion": (("llama-completion",), "one prompt, non-interactively"),
    "llama-server": (("llama-server",), "llama.cpp's OpenAI-compatible server (no web UI)"),
    "llama-cli": (("llama-cli",), "llama.cpp's chat program (-p PROMPT -st: one turn)"),
}


def lib_dir() -> Path:
    """The installed backend's library folder, where the programs are."""
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


def find(name: str) -> Path | None:
    """The path of one of PROGRAMS in the installed backend, or None if the backend lacks it."""
    folder = lib_dir()
    for file in PROGRAMS[name][0]:
        for candidate in (folder / file, folder / f"{file}.exe"):
            if candidate.is_file():
                return candidate
    return None


def program(name: str) -> Path:
    """The path of one of PROGRAMS; BackendError (saying how to get it) if the backend lacks it."""
    if name not in PROGRAMS:
        raise BackendError(f"unknown program {name!r}: ggufloop ships {', '.join(PROGRAMS)}")
    path = find(name)
    if path is None:
        raise BackendError(
            f"the installed backend has no {name} (looked in {lib_dir()}): rebuild it with `make backend`"
        )
    return path
