"""Models where users already keep them: the Hugging Face cache and ollama's model store.

``hf:ORG/REPO[:FILE or QUANT]`` and ``ollama:NAME[:TAG]`` are resolved by reading those stores'
folders exactly as huggingface_hub and ollama write them, never over the network and without an
ollama process. ``fetch_hf`` is the one place that downloads, and only when the user asks for it
(``ggufloop models fetch hf:...``). ``entries`` lists what both stores hold, for ``models list``.

Hugging Face cache::

    <cache>/models--ORG--REPO/refs/main                      the commit of main
    <cache>/models--ORG--REPO/snapshots/<commit>/<file>      symlink to ../../blobs/<hash>

ollama store::

    <store>/manifests/<host>/<namespace>/<name>/<tag>        JSON; one layer is the model
    <store>/blobs/sha256-<hex>                               the model's GGUF file
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFetchError, ModelFileError, UserError

HF_PREFIX = "hf:"
OLLAMA_PREFIX = "ollama:"


class ModelNotFoundError(UserError, LookupError):
    """A model named by hf: or ollama: is not (or not wholly) in its store; the message says how to get it."""


class AmbiguousModelError(UserError, ValueError):
    """A name that matches several GGUF files; the message lists the names that pick one."""


def is_store_ref(model: str) -> bool:
    """Whether a model argument names a model in the Hugging Face cache or ollama's store."""
    return model.startswith((HF_PREFIX, OLLAMA_PREFIX))


def resolve(model: str) -> Path:
    """The local GGUF file (first part, when split) of an ``hf:`` or ``ollama:`` name; never downloads."""
    if model.startswith(HF_PREFIX):
        return resolve_hf(model)
    if model.startswith(OLLAMA_PREFIX):
        return resolve_ollama(model)
    raise ModelFileError(f"{model!r} is neither hf:ORG/REPO[:FILE or QUANT] nor ollama:NAME[:TAG]")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- Hugging Face cache ----------------------------------------------------------------------

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's ENV_VARS_TRUE_VALUES
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)
# the quantization tag in a file name: Q4_K_M, IQ4_XS, Q8_0, TQ1_0, F16, BF16, F32, MXFP4
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Za-z0-9]+)*|TQ\d_\d|B?F16|F32|MXFP4)(?![A-Za-z0-9])", re.IGNORECASE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hf_cache_dir() -> Path:
    """The hub cache folder, chosen from the environment as huggingface_hub does, but read now rather than
    at import: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""

    def expand(p: str) -> str:
        return os.path.expandvars(os.path.expanduser(p))

    home = expand(
        os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"))
    )
    return Path(expand(os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))))


def hf_offline() -> bool:
    """Whether the user has switched the Hub off (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE, as huggingface_hub)."""
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE


@dataclass(frozen=True)
class HFRef:
    """``hf:ORG/REPO[:FILE or QUANT]``: a repository and, optionally, which of its GGUF files."""

    repo_id: str
    selector: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HFRef:
        rest = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
        repo_id, colon, selector = rest.partition(":")
        if not _REPO_ID.match(repo_id) or (colon and not selector):
            raise ModelFileError(f"{spec!r} is not a Hugging Face model name: use hf:ORG/REPO[:FILE or QUANT]")
        return cls(repo_id, selector or None)

    @property
    def by_file(self) -> bool:
        """Whether the selector names a file (it ends in .gguf) rather than a quantization."""
        return self.selector is not None and self.selector.lower().endswith(".gguf")

    @property
    def repo_folder(self) -> str:
        """The repository's folder in the cache, named as huggingface_hub names it."""
        return "models--" + self.repo_id.replace("/", "--")

    def __str__(self) -> str:
        return f"{HF_PREFIX}{self.repo_id}" + (f":{self.selector}" if self.selector else "")


@dataclass(frozen=True)
class GGUFFile:
    """One model in a repository: a .gguf file, or a split one, named by its first part."""

    relpath: str  # inside the repository; the first part's name for a split model
    parts: tuple[str, ...]  # the parts present, in order (just relpath when unsplit)
    n_parts: int = 1  # how many parts the names announce

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.n_parts and self.parts[0] == self.relpath

    @property
    def quant(self) -> str | None:
        """The quantization tag in the file's name (or its folder's), as written there."""
        tags = _QUANT.findall(self.relpath)
        return tags[-1] if tags else None

    @property
    def projector(self) -> bool:
        """A multimodal projector (mmproj-*.gguf) that ships beside a model and is not one."""
        return os.path.basename(self.relpath).lower().startswith("mmproj")


def group_gguf(relpaths: Iterable[str]) -> list[GGUFFile]:
    """The models among a repository's files: each .gguf file, with split parts gathered under their first."""
    single: list[GGUFFile] = []
    split: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for rel in relpaths:
        if not rel.lower().endswith(".gguf"):
            continue
        m = _SPLIT.match(rel)
        if m:
            split.setdefault((m["stem"], m["n"]), []).append((int(m["i"]), rel))
        else:
            single.append(GGUFFile(rel, (rel,)))
    for (stem, n), parts in split.items():
        first = f"{stem}-{1:05d}-of-{n}.gguf"
        single.append(GGUFFile(first, tuple(rel for _, rel in sorted(parts)), int(n)))
    return sorted(single, key=lambda f: f.relpath)


def _matches_quant(file: GGUFFile, quant: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", file.relpath, re.IGNORECASE) is not None


def _by_file(files: list[GGUFFile], name: str) -> list[GGUFFile]:
    """Files named name: by path in the repository, else by base name, else by base name in any case;
    a split model by any of its parts."""
    for key in (str, os.path.basename, lambda rel: os.path.basename(rel).lower()):
        hits = [f for f in files if any(key(p) == key(name) for p in (f.relpath, *f.parts))]
        if hits:
            return hits
    return []


def hf_name(repo_id: str, file: GGUFFile, files: list[GGUFFile]) -> str:
    """How the user picks file among files: hf:REPO:QUANT when the tag picks it alone, else by file name."""
    models = [f for f in files if not f.projector]
    if file.quant and not file.projector and select_gguf(models, file.quant, by_file=False) == [file]:
        return f"{HF_PREFIX}{repo_id}:{file.quant}"
    if models == [file]:
        return f"{HF_PREFIX}{repo_id}"
    return f"{HF_PREFIX}{repo_id}:{file.relpath}"


def select_gguf(files: list[GGUFFile], selector: str | None, by_file: bool) -> list[GGUFFile]:
    """The files a selector picks: by file name, by quantization tag (case-insensitive, whole tag), or all
    models when there is none. Projectors are picked only by file name."""
    if selector is None:
        return [f for f in files if not f.projector]
    if by_file:
        return _by_file(files, selector)
    return [f for f in files if not f.projector and _matches_quant(f, selector)]


def _pick(ref: HFRef, files: list[GGUFFile], where: str) -> GGUFFile:
    """The one file ref names among files, or an error naming the candidates."""
    hits = select_gguf(files, ref.selector, ref.by_file)
    fetch = f"`ggufloop models fetch {ref}`"
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(hf_name(ref.repo_id, f, files) for f in (hits or files))
    if not hits:
        if not files:
            raise ModelNotFoundError(f"{ref.repo_id} has no GGUF file {where}: get one with {fetch}")
        what = f"matching {ref.selector!r} " if ref.selector else ""
        raise ModelNotFoundError(f"{ref.repo_id} has no GGUF file {what}{where} (there: {names}); get it with {fetch}")
    raise AmbiguousModelError(f"{ref} matches several GGUF files {where}; choose one: {names}")


@dataclass(frozen=True)
class CachedGGUF:
    """A model in the cache: the file and the snapshot folder that holds it."""

    file: GGUFFile
    snapshot: Path

    @property
    def path(self) -> Path:
        return self.snapshot / self.file.relpath

    @property
    def broken(self) -> list[Path]:
        """Parts whose symlink points to a missing blob (or that are missing)."""
        return [self.snapshot / p for p in self.file.parts if not (self.snapshot / p).is_file()]

    @property
    def size_bytes(self) -> int:
        return sum((self.snapshot / p).stat().st_size for p in self.file.parts if (self.snapshot / p).is_file())


def _snapshots(repo_dir: Path) -> list[Path]:
    """The repository's snapshot folders, main's first, then the newest first."""
    folder = repo_dir / "snapshots"
    if not folder.is_dir():
        return []
    snaps = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    try:
        main = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    return sorted(snaps, key=lambda p: p.name != main)


def cached_gguf(repo_dir: Path) -> list[CachedGGUF]:
    """Every model in a cached repository: over all its snapshots, each file once, taken from main's snapshot
    unless only an older snapshot holds it whole."""
    best: dict[str, CachedGGUF] = {}
    for snap in _snapshots(repo_dir):
        rels = [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_symlink() or p.is_file()]
        for f in group_gguf(rels):
            entry = CachedGGUF(f, snap)
            held = best.get(f.relpath)
            if held is None or (not (held.file.complete and not held.broken) and f.complete and not entry.broken):
                best[f.relpath] = entry
    return sorted(best.values(), key=lambda c: c.file.relpath)


def _check_cached(ref: HFRef, hit: CachedGGUF) -> Path:
    fetch = f"`ggufloop models fetch {ref}`"
    if not hit.file.complete:
        raise ModelNotFoundError(
            f"{ref}: only {len(hit.file.parts)} of the {hit.file.n_parts} parts of {hit.file.relpath} are in the "
            f"Hugging Face cache ({hit.snapshot}); get the rest with {fetch}"
        )
    if hit.broken:
        raise ModelFileError(
            f"{ref}: {hit.broken[0]} in the Hugging Face cache points to a missing file (a broken symlink); "
            f"download it again with {fetch}"
        )
    if not _is_gguf(hit.path):
        raise ModelFileError(f"{ref}: {hit.path} in the Hugging Face cache is not a GGUF file")
    return hit.path


def resolve_hf(spec: str | HFRef) -> Path:
    """The cached GGUF file of ``hf:ORG/REPO[:FILE or QUANT]`` (a split model's first part), read from the
    local cache alone; ModelNotFoundError, saying how to fetch it, when it is not there."""
    ref = spec if isinstance(spec, HFRef) else HFRef.parse(spec)
    cache = hf_cache_dir()
    repo_dir = cache / ref.repo_folder
    if not repo_dir.is_dir():
        raise ModelNotFoundError(
            f"{ref} is not in the Hugging Face cache ({cache}): download it with `ggufloop models fetch {ref}`"
        )
    cached = cached_gguf(repo_dir)
    hit = _pick(ref, [c.file for c in cached], f"in the Hugging Face cache ({cache})")
    return _check_cached(ref, next(c for c in cached if c.file == hit))


def _hub_list_files(repo_id: str) -> list[str]:
    """The files of a repository's main branch on the Hub (network)."""
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo_id)


def _hub_download(repo_id: str, filename: str, cache_dir: Path) -> Path:
    """One file of a repository into the cache, as huggingface_hub stores it; its snapshot path (network)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))


def fetch_hf(spec: str, quiet: bool = False) -> Path:
    """``hf:ORG/REPO[:FILE or QUANT]`` from the cache, downloading it (every part) first when it is not there.

    The only function that reaches the network, and only when the user asked for it; it refuses when
    HF_HUB_OFFLINE is set."""
    ref = HFRef.parse(spec)
    try:
        return resolve_hf(ref)
    except (ModelNotFoundError, ModelFileError):
        pass
    if hf_offline():
        raise ModelFetchError(
            f"{ref} is not usable from the Hugging Face cache ({hf_cache_dir()}) and HF_HUB_OFFLINE is set: "
            "unset it to download"
        )
    try:
        remote = _hub_list_files(ref.repo_id)
    except Exception as err:  # huggingface_hub raises many types: HTTP, gated, not found, connection
        raise ModelFetchError(f"cannot list {ref.repo_id} on the Hugging Face Hub: {_one_line(err)}") from None
    file = _pick(ref, group_gguf(remote), "on the Hugging Face Hub")
    if not file.complete:
        raise ModelFetchError(f"{ref}: the Hub lists {len(file.parts)} of the {file.n_parts} parts of {file.relpath}")
    cache = hf_cache_dir()
    paths = []
    for part in file.parts:
        if not quiet:
            print(f"downloading {part} from {ref.repo_id} into {cache} ...", flush=True)
        try:
            paths.append(_hub_download(ref.repo_id, part, cache))
        except Exception as err:
            raise ModelFetchError(f"cannot download {part} of {ref.repo_id}: {_one_line(err)}") from None
    if not _is_gguf(paths[0]):
        raise ModelFileError(f"{ref}: the downloaded {paths[0]} is not a GGUF file")
    return paths[0]


# -- ollama ----------------------------------------------------------------------------------

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def ollama_store() -> Path:
    """ollama's model folder: $OLLAMA_MODELS, else ~/.ollama/models."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(os.path.expanduser(env)) if env else Path.home() / ".ollama" / "models"


@dataclass(frozen=True)
class OllamaRef:
    """``ollama:[[HOST/]NAMESPACE/]NAME[:TAG]``, with ollama's defaults filled in."""

    name: str
    tag: str = "latest"
    namespace: str = "library"
    host: str = OLLAMA_REGISTRY

    @classmethod
    def parse(cls, spec: str) -> OllamaRef:
        rest = spec[len(OLLAMA_PREFIX) :] if spec.startswith(OLLAMA_PREFIX) else spec
        path, _, tag = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "")
        parts = path.split("/")
        if not 1 <= len(parts) <= 3 or not all(_OLLAMA_PART.match(p) for p in (*parts, tag or "latest")):
            raise ModelFileError(
                f"{spec!r} is not an ollama model name: use ollama:NAME[:TAG] or ollama:NAMESPACE/NAME"
            )
        fields = dict(zip(("host", "namespace", "name")[3 - len(parts) :], parts))
        return cls(tag=tag or "latest", **fields)

    @classmethod
    def from_manifest(cls, store: Path, manifest: Path) -> OllamaRef:
        host, namespace, name, tag = manifest.relative_to(store / "manifests").parts
        return cls(name, tag, namespace, host)

    def manifest(self, store: Path) -> Path:
        return store / "manifests" / self.host / self.namespace / self.name / self.tag

    @property
    def pull_name(self) -> str:
        """The name as ``ollama pull`` takes it, defaults left out."""
        if self.host != OLLAMA_REGISTRY:
            return f"{self.host}/{self.namespace}/{self.name}:{self.tag}"
        return (f"{self.namespace}/" if self.namespace != "library" else "") + f"{self.name}:{self.tag}"

    def __str__(self) -> str:
        return OLLAMA_PREFIX + self.pull_name


def _ollama_blob(ref: OllamaRef, store: Path, manifest: Path) -> Path:
    """The model blob a manifest names, checked to exist and to be GGUF."""
    pull = f"`ollama pull {ref.pull_name}`"
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{ref}: cannot read its manifest {manifest}: {_one_line(err)}") from None
    except json.JSONDecodeError as err:
        raise ModelFileError(
            f"{ref}: its manifest {manifest} is not valid JSON ({err}); pull it again with {pull}"
        ) from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    model = [x for x in layers or [] if isinstance(x, dict) and x.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE]
    if not model:
        raise ModelFileError(f"{ref}: its manifest {manifest} has no model layer ({OLLAMA_MODEL_MEDIA_TYPE})")
    digest = str(model[0].get("digest", ""))
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ModelFileError(f"{ref}: its manifest {manifest} gives the model layer a bad digest {digest!r}")
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelFileError(f"{ref}: the model blob {blob} is missing; pull it again with {pull}")
    if not _is_gguf(blob):
        raise ModelFileError(f"{ref}: the model blob {blob} is not a GGUF file")
    return blob


def resolve_ollama(spec: str | OllamaRef) -> Path:
    """The GGUF blob of ``ollama:NAME[:TAG]`` in ollama's store, read from its manifest; no ollama needed."""
    ref = spec if isinstance(spec, OllamaRef) else OllamaRef.parse(spec)
    store = ollama_store()
    manifest = ref.manifest(store)
    if not manifest.is_file():
        raise ModelNotFoundError(
            f"{ref} is not in the ollama store ({store}): get it with `ollama pull {ref.pull_name}`"
        )
    return _ollama_blob(ref, store, manifest)


# -- listing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreEntry:
    """A model found in a store, as ``models list`` shows it: problem says why it cannot be used, if so."""

    name: str  # as the user types it
    path: Path | None
    size_bytes: int
    arch: str = "?"
    problem: str | None = None


def _entry(name: str, locate) -> StoreEntry:
    from .gguf_io import model_info

    try:
        path = locate()
        info = model_info(path)
    except (UserError, OSError) as err:
        return StoreEntry(name, None, 0, problem=str(err).removeprefix(f"{name}: "))
    return StoreEntry(name, path, info.size_bytes, info.arch)


def hf_entries(cache: Path | None = None) -> list[StoreEntry]:
    """Every GGUF model in the Hugging Face cache, named as ``hf:`` takes it (projectors left out)."""
    cache = cache or hf_cache_dir()
    out = []
    for repo_dir in sorted(cache.glob("models--*--*")) if cache.is_dir() else []:
        repo_id = repo_dir.name[len("models--") :].replace("--", "/", 1)
        if not _REPO_ID.match(repo_id):
            continue
        cached = cached_gguf(repo_dir)
        files = [c.file for c in cached]
        for c in cached:
            if c.file.projector:
                continue
            name = hf_name(repo_id, c.file, files)
            ref = HFRef.parse(name)
            entry = _entry(name, lambda c=c, ref=ref: _check_cached(ref, c))
            if entry.problem is None and c.file.n_parts > 1:
                entry = StoreEntry(entry.name, entry.path, c.size_bytes, entry.arch)
            out.append(entry)
    return out


def ollama_entries(store: Path | None = None) -> list[StoreEntry]:
    """Every model in ollama's store with a manifest, named as ``ollama:`` takes it."""
    store = store or ollama_store()
    root = store / "manifests"
    out = []
    for manifest in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
        if len(manifest.relative_to(root).parts) != 4:
            continue
        ref = OllamaRef.from_manifest(store, manifest)
        out.append(_entry(str(ref), lambda ref=ref, manifest=manifest: _ollama_blob(ref, store, manifest)))
    return out
