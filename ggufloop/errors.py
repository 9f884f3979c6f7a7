"""The errors a user can cause, each ending a command with one ``error:`` line.

They live here, away from the modules that raise them, so the command line can catch them
without importing llama.cpp.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for or gave; its message says what and how to fix it."""


class PlanError(UserError, ValueError):
    """A plan that cannot be parsed or does not fit the model."""


class ModelFileError(UserError, ValueError):
    """The path is not a usable GGUF file."""


class ModelFetchError(UserError, RuntimeError):
    """A packaged model could not be installed."""


class TaskError(UserError, ValueError):
    """An unknown task, or its data is missing."""


class BackendError(UserError, RuntimeError):
    """The installed llama-cpp-python cannot run a loop plan, or refused one (with llama.cpp's reason)."""


class StoreError(UserError, RuntimeError):
    """The results database cannot be used (not SQLite, damaged, another schema, read-only)."""


class OptionError(UserError, ValueError):
    """An option whose value does not fit the model or the machine (a context larger than either)."""


class RpcError(UserError, RuntimeError):
    """An RPC server (``--rpc``) that cannot be reached, spoken to or used as asked."""


class TextError(UserError, ValueError):
    """A text to score (``perplexity --text``) that cannot be used: empty, binary, not UTF-8, too short."""
