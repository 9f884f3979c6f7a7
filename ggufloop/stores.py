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

import errno
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
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


def _not_regular(path: Path) -> str | None:
    """Why path (a symlink followed) is not a regular file to read: None when it is one, "missing" when nothing
    is there (or the name cannot exist: longer than the file system allows), else a phrase such as
    "is a FIFO, not a regular file". Nothing is opened, so a FIFO or a device never blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return "missing"
        if err.errno == errno.ELOOP:
            return "is a symlink loop, not a regular file"
        return f"cannot be read ({os.strerror(err.errno or 0)})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"))
    kinds += ((stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "something else")
    return f"is {kind}, not a regular file"


def _is_dir(path: Path) -> bool:
    """Whether path is a folder (a symlink followed); False, not OSError, for a name too long to exist."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _read_regular(path: Path, limit: int = -1) -> bytes:
    """The bytes of a regular file (at most limit), or OSError: a FIFO, device or folder is refused without
    blocking, even one put in the file's place after it was checked."""
    why = _not_regular(path)
    if why is not None:
        raise OSError(errno.ENOENT, "no such file") if why == "missing" else OSError(errno.EINVAL, why)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file")
        return f.read(limit)


def _is_gguf(path: Path) -> bool:
    try:
        return _read_regular(path, 4) == b"GGUF"
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
_REPO_ID_MAX = 96  # huggingface_hub's validate_repo_id: the Hub takes no longer ORG/REPO


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
        if not _REPO_ID.fullmatch(repo_id) or len(repo_id) > _REPO_ID_MAX or (colon and not selector):
            shown = spec if len(spec) <= 120 else f"{spec[:100]}...({len(spec)} characters)"
            raise ModelFileError(
                f"{shown!r} is not a Hugging Face model name: use hf:ORG/REPO[:FILE or QUANT] "
                f"(ORG/REPO at most {_REPO_ID_MAX} characters)"
            )
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
    stray: tuple[str, ...] = ()  # files named as parts of it whose number is 0 or above n_parts

    @property
    def complete(self) -> bool:
        return not self.stray and len(self.parts) == self.n_parts and bool(self.parts) and self.parts[0] == self.relpath

    @property
    def stray_problem(self) -> str | None:
        """What is wrong with the first stray part, as a phrase: "X is numbered part 2 of 1"."""
        if not self.stray:
            return None
        m = _SPLIT.match(self.stray[0])
        return f"{self.stray[0]} is numbered part {int(m['i'])} of {self.n_parts}, outside 1..{self.n_parts}"

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
        inside = tuple(rel for i, rel in sorted(parts) if 1 <= i <= int(n))
        stray = tuple(rel for i, rel in sorted(parts) if not 1 <= i <= int(n))
        single.append(GGUFFile(first, inside, int(n), stray))
    return sorted(single, key=lambda f: f.relpath)


def _matches_quant(file: GGUFFile, quant: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", file.relpath, re.IGNORECASE) is not None


def _by_file(files: list[GGUFFile], name: str) -> list[GGUFFile]:
    """Files named name: by path in the repository, else by base name, else by base name in any case;
    a split model by any of its parts."""
    for key in (str, os.path.basename, lambda rel: os.path.basename(rel).lower()):
        hits = [f for f in files if any(key(p) == key(name) for p in (f.relpath, *f.parts, *f.stray))]
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
    def broken(self) -> list[tuple[Path, str]]:
        """Parts that are not regular files, each with why: a symlink to a missing blob, a FIFO, a folder..."""
        why = ((self.snapshot / p, _not_regular(self.snapshot / p)) for p in self.file.parts)
        return [(path, reason) for path, reason in why if reason is not None]

    @property
    def size_bytes(self) -> int:
        return sum(
            (self.snapshot / p).stat().st_size for p in self.file.parts if _not_regular(self.snapshot / p) is None
        )


def _snapshots(repo_dir: Path) -> list[Path]:
    """The repository's snapshot folders, main's first, then the newest first. A snapshot that is a symlink
    is passed over (huggingface_hub never makes one, and it could lead anywhere: to / and the whole file
    system), and refs/main is read only when it is a regular file (a FIFO there would block for ever)."""
    folder = repo_dir / "snapshots"
    if folder.is_symlink() or not folder.is_dir():
        return []
    snaps = [p for p in folder.iterdir() if not p.is_symlink() and p.is_dir()]
    snaps.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    try:
        main = _read_regular(repo_dir / "refs" / "main", 1024).decode("utf-8", "replace").strip()
    except OSError:
        main = ""
    return sorted(snaps, key=lambda p: p.name != main)


def _snapshot_files(snap: Path) -> list[str]:
    """The paths of a snapshot's files (symlinks included), found without following any symlinked folder."""
    out = []
    for top, dirs, files in os.walk(snap, followlinks=False):
        rel = Path(top).relative_to(snap)
        out += [(rel / name).as_posix() for name in files]
        out += [(rel / name).as_posix() for name in dirs if os.path.islink(os.path.join(top, name))]
    return out


def cached_gguf(repo_dir: Path) -> list[CachedGGUF]:
    """Every model in a cached repository: over all its snapshots, each file once, taken from main's snapshot
    unless only an older snapshot holds it whole."""
    best: dict[str, CachedGGUF] = {}
    for snap in _snapshots(repo_dir):
        rels = _snapshot_files(snap)
        for f in group_gguf(rels):
            entry = CachedGGUF(f, snap)
            held = best.get(f.relpath)
            if held is None or (not (held.file.complete and not held.broken) and f.complete and not entry.broken):
                best[f.relpath] = entry
    return sorted(best.values(), key=lambda c: c.file.relpath)


def _check_cached(ref: HFRef, hit: CachedGGUF) -> Path:
    fetch = f"`ggufloop models fetch {ref}`"
    if hit.file.stray:
        raise ModelFileError(
            f"{ref}: {hit.file.stray_problem} in the Hugging Face cache ({hit.snapshot}); remove that file"
        )
    if not hit.file.complete:
        raise ModelNotFoundError(
            f"{ref}: only {len(hit.file.parts)} of the {hit.file.n_parts} parts of {hit.file.relpath} are in the "
            f"Hugging Face cache ({hit.snapshot}); get the rest with {fetch}"
        )
    for path, why in hit.broken:
        if why == "missing":
            raise ModelFileError(
                f"{ref}: {path} in the Hugging Face cache points to a missing file (a broken symlink); "
                f"download it again with {fetch}"
            )
        raise ModelFileError(f"{ref}: {path} in the Hugging Face cache {why}; download it again with {fetch}")
    if not _is_gguf(hit.path):
        raise ModelFileError(f"{ref}: {hit.path} in the Hugging Face cache is not a GGUF file")
    return hit.path


def resolve_hf(spec: str | HFRef) -> Path:
    """The cached GGUF file of ``hf:ORG/REPO[:FILE or QUANT]`` (a split model's first part), read from the
    local cache alone; ModelNotFoundError, saying how to fetch it, when it is not there."""
    ref = spec if isinstance(spec, HFRef) else HFRef.parse(spec)
    cache = hf_cache_dir()
    repo_dir = cache / ref.repo_folder
    if not _is_dir(repo_dir):
        raise ModelNotFoundError(
            f"{ref} is not in the Hugging Face cache ({cache}): download it with `ggufloop models fetch {ref}`"
        )
    cached = cached_gguf(repo_dir)
    hit = _pick(ref, [c.file for c in cached], f"in the Hugging Face cache ({cache})")
    return _check_cached(ref, next(c for c in cached if c.file == hit))


HUB_TIMEOUT_ENV = "GGUFLOOP_HUB_TIMEOUT"
HUB_TIMEOUT = 30.0  # seconds without an answer from the Hub before a fetch gives up, unless HUB_TIMEOUT_ENV says


def hub_timeout() -> float:
    """How long to wait for the Hub to answer, in seconds: $GGUFLOOP_HUB_TIMEOUT, else 30. huggingface_hub
    itself waits for ever on a server that accepts a connection and never answers."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if not text:
        return HUB_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:
        raise ModelFetchError(f"{HUB_TIMEOUT_ENV}={text!r} is not a number of seconds above 0 (at most 86400)")
    return value


def hub_endpoint() -> str:
    """The Hub that fetches go to, as huggingface_hub reads it ($HF_ENDPOINT, else huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


class HubTimeoutError(TimeoutError):
    """The Hub has not answered within hub_timeout() seconds, retries included."""


_hub_deadline: float | None = None  # when the Hub must have answered the request under way (time.monotonic)


def _before_request(request) -> None:
    """Bound a request to the Hub by what is left of hub_timeout() since the Hub last answered: a retry
    after a time-out ends the fetch rather than waiting again (huggingface_hub passes timeout=None to
    httpx, which waits for ever, and retries a time-out five times)."""
    global _hub_deadline
    limit = hub_timeout()
    now = time.monotonic()
    if _hub_deadline is None:
        _hub_deadline = now + limit
    left = _hub_deadline - now
    if left <= 0:
        raise HubTimeoutError(f"no answer within {limit:g} s")
    wanted = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        k: left if wanted.get(k) is None else min(wanted[k], left) for k in ("connect", "read", "write", "pool")
    }


def _after_response(response) -> None:
    global _hub_deadline
    _hub_deadline = None  # it answered: the next request has the whole limit again


def _timed_client():
    """huggingface_hub's own HTTP client, with _before_request and _after_response hooked in."""
    from huggingface_hub.utils._http import default_client_factory  # huggingface-hub is pinned

    client = default_client_factory()
    hooks = client.event_hooks
    client.event_hooks = {
        "request": [*hooks.get("request", []), _before_request],
        "response": [*hooks.get("response", []), _after_response],
    }
    return client


def _hub_session() -> None:
    """Make every request huggingface_hub sends from now on wait at most hub_timeout() for an answer: its
    shared client (made again after a connection error) comes from _timed_client."""
    global _hub_deadline
    from huggingface_hub import set_client_factory

    _hub_deadline = None
    set_client_factory(_timed_client)


def _hub_list_files(repo_id: str) -> list[str]:
    """The files of a repository's main branch on the Hub (network)."""
    from huggingface_hub import HfApi

    _hub_session()
    return HfApi().list_repo_files(repo_id)


def _hub_download(repo_id: str, filename: str, cache_dir: Path) -> Path:
    """One file of a repository into the cache, as huggingface_hub stores it; its snapshot path (network)."""
    from huggingface_hub import hf_hub_download

    _hub_session()
    return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, etag_timeout=hub_timeout()))


def _hub_failure(err: BaseException) -> str:
    """Why a request to the Hub failed, in a phrase: a time-out says how long it waited and how to wait longer."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, TimeoutError) or "timeout" in type(seen).__name__.lower():
            return f"no answer within {hub_timeout():g} s (set {HUB_TIMEOUT_ENV} to wait longer)"
        seen = seen.__cause__ or seen.__context__
    return _one_line(err)


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
    hub_timeout()  # a bad GGUFLOOP_HUB_TIMEOUT is refused before anything is tried
    try:
        remote = _hub_list_files(ref.repo_id)
    except Exception as err:  # huggingface_hub raises many types: HTTP, gated, not found, connection
        raise ModelFetchError(
            f"cannot list {ref.repo_id} on the Hugging Face Hub ({hub_endpoint()}): {_hub_failure(err)}"
        ) from None
    file = _pick(ref, group_gguf(remote), "on the Hugging Face Hub")
    if file.stray:
        raise ModelFetchError(f"{ref}: on the Hugging Face Hub, {file.stray_problem}")
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
            raise ModelFetchError(
                f"cannot download {part} of {ref.repo_id} from the Hugging Face Hub ({hub_endpoint()}): "
                f"{_hub_failure(err)}"
            ) from None
    if not _is_gguf(paths[0]):
        raise ModelFileError(f"{ref}: the downloaded {paths[0]} is not a GGUF file")
    return paths[0]


# -- ollama ----------------------------------------------------------------------------------

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OLLAMA_MAX = {"host": 350, "namespace": 80, "name": 80, "tag": 80}  # ollama's own limits (types/model/name.go)


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
        kinds = ("host", "namespace", "name")[3 - len(parts) :] if 1 <= len(parts) <= 3 else ()
        named = zip((*parts, tag or "latest"), (*kinds, "tag"))
        if not kinds or not all(_OLLAMA_PART.fullmatch(p) and len(p) <= _OLLAMA_MAX[k] for p, k in named):
            shown = spec if len(spec) <= 120 else f"{spec[:100]}...({len(spec)} characters)"
            raise ModelFileError(
                f"{shown!r} is not an ollama model name: use ollama:NAME[:TAG] or ollama:NAMESPACE/NAME "
                "(letters, digits, '.', '_' and '-'; a name or tag at most 80 characters)"
            )
        return cls(tag=tag or "latest", **dict(zip(kinds, parts)))

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
        text = _read_regular(manifest).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else _one_line(err)
        raise ModelFileError(f"{ref}: cannot read its manifest {manifest}: {why}") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ModelFileError(
            f"{ref}: its manifest {manifest} nests too deeply to be one ollama writes; pull it again with {pull}"
        ) from None
    except json.JSONDecodeError as err:
        raise ModelFileError(
            f"{ref}: its manifest {manifest} is not valid JSON ({err}); pull it again with {pull}"
        ) from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        layers = []
    model = [x for x in layers if isinstance(x, dict) and x.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE]
    if not model:
        raise ModelFileError(f"{ref}: its manifest {manifest} has no model layer ({OLLAMA_MODEL_MEDIA_TYPE})")
    digest = str(model[0].get("digest", ""))
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ModelFileError(f"{ref}: its manifest {manifest} gives the model layer a bad digest {digest!r}")
    blob = store / "blobs" / digest.replace(":", "-")
    why = _not_regular(blob)
    if why == "missing":
        raise ModelFileError(f"{ref}: the model blob {blob} is missing; pull it again with {pull}")
    if why is not None:
        raise ModelFileError(f"{ref}: the model blob {blob} {why}; pull it again with {pull}")
    if not _is_gguf(blob):
        raise ModelFileError(f"{ref}: the model blob {blob} is not a GGUF file")
    return blob


def resolve_ollama(spec: str | OllamaRef) -> Path:
    """The GGUF blob of ``ollama:NAME[:TAG]`` in ollama's store, read from its manifest; no ollama needed."""
    ref = spec if isinstance(spec, OllamaRef) else OllamaRef.parse(spec)
    store = ollama_store()
    manifest = ref.manifest(store)
    if _not_regular(manifest) == "missing":
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


def _entry(name: str, locate: Callable[[], Path]) -> StoreEntry:
    """The entry of one model: its architecture and size, or, whatever goes wrong, one line saying why."""
    from .gguf_io import model_info

    try:
        path = locate()
        info = model_info(path)
    except (UserError, OSError) as err:
        return StoreEntry(name, None, 0, problem=str(err).removeprefix(f"{name}: "))
    except Exception as err:  # a hostile file must cost its own line, never the whole listing
        return StoreEntry(name, None, 0, problem=_one_line(err))
    return StoreEntry(name, path, info.size_bytes, info.arch)


def _repo_entries(repo_dir: Path, repo_id: str) -> list[StoreEntry]:
    cached = cached_gguf(repo_dir)
    files = [c.file for c in cached]
    out = []
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


def hf_entries(cache: Path | None = None) -> list[StoreEntry]:
    """Every GGUF model in the Hugging Face cache, named as ``hf:`` takes it (projectors left out); a
    repository that cannot be read is one entry saying why."""
    cache = cache or hf_cache_dir()
    out = []
    for repo_dir in sorted(cache.glob("models--*--*")) if _is_dir(cache) else []:
        repo_id = repo_dir.name[len("models--") :].replace("--", "/", 1)
        if not _REPO_ID.fullmatch(repo_id):
            continue
        try:
            out += _repo_entries(repo_dir, repo_id)
        except (UserError, OSError, RecursionError) as err:
            out.append(
                StoreEntry(f"{HF_PREFIX}{repo_id}", None, 0, problem=f"cannot read {repo_dir}: {_one_line(err)}")
            )
    return out


def _manifests(root: Path) -> list[Path]:
    """What sits where ollama keeps manifests, root/HOST/NAMESPACE/NAME/TAG, found without following a
    symlinked folder above the tag (a link to / or a loop could lead anywhere)."""
    out = []
    for top, dirs, files in os.walk(root, followlinks=False):
        depth = len(Path(top).relative_to(root).parts)
        if depth == 3:
            out += [Path(top) / name for name in (*files, *dirs)]
            dirs.clear()
    return sorted(out)


def ollama_entries(store: Path | None = None) -> list[StoreEntry]:
    """Every model in ollama's store with a manifest, named as ``ollama:`` takes it; a manifest whose name
    ``ollama:`` cannot take, or that cannot be read, is one entry saying why."""
    store = store or ollama_store()
    root = store / "manifests"
    out = []
    for manifest in _manifests(root) if _is_dir(root) else []:
        ref = OllamaRef.from_manifest(store, manifest)
        try:
            typable = OllamaRef.parse(str(ref)) == ref
        except ModelFileError:
            typable = False
        if not typable:
            problem = f"ollama: takes no such name; rename or remove {manifest}"
            out.append(StoreEntry(str(ref), None, 0, problem=problem))
            continue
        out.append(_entry(str(ref), lambda ref=ref, manifest=manifest: _ollama_blob(ref, store, manifest)))
    return out
