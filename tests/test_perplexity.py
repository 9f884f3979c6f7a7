"""`ggufloop perplexity`: llama-perplexity's statistics, checked against a brute-force numpy computation on
a tiny model, against the patched llama-perplexity itself on a real model, and on bad input."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_robustness import ggufloop, one_error

from ggufloop.cli import main
from ggufloop.eval import perplexity as ppl
from ggufloop.eval.store import SCHEMA, TABLES, Store

SHA = "0" * 64  # a stand-in model sha256 for library calls (the CLI computes the real one)


def words(n: int, seed: int = 0) -> str:
    """A text the tiny models' vocabulary spells word by word (and with byte tokens)."""
    rng = random.Random(seed)
    return " ".join(rng.choice([f"w{i}" for i in range(29)] + ["ab", "c."]) for _ in range(n))


@pytest.fixture
def cfg(tmp_path) -> ppl.PerplexityConfig:
    return ppl.PerplexityConfig(n_ctx=32, n_chunks=6, kld_tokens=0, threads=2, cache_dir=tmp_path / "cache")


# -- brute force -------------------------------------------------------------------------------


def brute_force(path: Path, plan: str, text: str, n_ctx: int, n_chunks: int, chunks_for_kld=None) -> dict:
    """The statistics computed the plain way: every position's logits of each chunk (one batch, BOS first),
    full log-softmax in float64, sums written as llama-perplexity writes them."""
    llm = ppl.open_model(path, ppl.PerplexityConfig(threads=2))
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
        n = min(n_chunks, len(tokens) // n_ctx)
        first = n_ctx // 2

        def rows() -> tuple[np.ndarray, np.ndarray, list[int]]:
            out, targets, chunk_of = [], [], []
            with llm.side_context(n_ctx, n_ctx, n_ctx, 1) as ctx:
                for k in range(n):
                    chunk = tokens[k * n_ctx : (k + 1) * n_ctx]
                    ctx.clear()
                    logits = ctx.decode_all([llm.token_bos()] + chunk[1:]).astype(np.float64)
                    for pos in range(first, n_ctx - 1):
                        out.append(logits[pos])
                        targets.append(chunk[pos + 1])
                        chunk_of.append(k)
            return np.array(out), np.array(targets), chunk_of

        base, targets, chunk_of = rows()
        llm.set_loop(plan)
        looped, _, _ = rows()
    finally:
        llm.close()

    def logsoftmax(x):
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))

    lp, lq = logsoftmax(base), logsoftmax(looped)
    idx = np.arange(len(targets))
    nll, nll_base = -lq[idx, targets], -lp[idx, targets]
    kld_all = np.where(lp > -16, np.exp(lp) * (lp - lq), 0.0).sum(1)
    keep = [i for i, k in enumerate(chunk_of) if chunks_for_kld is None or k in chunks_for_kld]
    kld = kld_all[keep]
    dp = np.exp(-nll) - np.exp(-nll_base)
    same = base.argmax(1) == looped.argmax(1)
    N = len(nll)

    def mean_se(x):
        f = x.sum() / len(x)
        return f, np.sqrt(((x * x).sum() / len(x) - f * f) / (len(x) - 1))

    def pct(values, fraction):  # llama-perplexity's lambda
        v = sorted(values)
        p = fraction * (len(v) - 1)
        ip = int(p)
        p -= ip
        return (1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)]

    q, sq = mean_se(nll)
    b, sb = mean_se(nll_base)
    cov = ((nll * nll_base).sum() / N - q * b) / (N - 1)
    mse, smse = mean_se(dp**2)
    s = same.mean()
    return {
        "n_tokens": N,
        "n_kld_tokens": len(kld),
        "ppl": np.exp(q),
        "ppl_se": np.exp(q) * sq,
        "ppl_base": np.exp(b),
        "ln_ratio": q - b,
        "ln_ratio_se": np.sqrt(sq * sq + sb * sb - 2 * cov),
        "cor": cov / (sq * sb),
        "kld_mean": mean_se(kld)[0],
        "kld_se": mean_se(kld)[1],
        "kld_median": pct(kld, 0.5),
        **{f"kld_p{f:g}": pct(kld, f / 100) for f in (90, 95, 99, 99.9)},
        "kld_max": kld.max(),
        "dp_mean": dp.mean(),
        "dp_rms": np.sqrt(mse),
        "dp_rms_se": 0.5 / np.sqrt(mse) * smse,
        **{f"dp_p{f:g}": pct(dp, f / 100) for f in (1, 10, 90, 99)},
        "same_top": s,
        "same_top_se": np.sqrt(s * (1 - s) / (N - 1)),
    }


def flat(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if not isinstance(v, dict)}
    out.update({f"{group}_{k}": v for group in ("kld", "dp") for k, v in stats[group].items()})
    return out


@pytest.mark.parametrize("plan", ["1:4x3/uniform", "2:5x2"])
def test_statistics_match_a_brute_force_computation(tiny_models, cfg, plan):
    path = tiny_models["llama"][2]
    text = ppl.Text.of("words", words(900))
    got = flat(ppl.score(path, plan, text, cfg, SHA).stats)
    want = brute_force(path, plan, text.text, cfg.n_ctx, cfg.n_chunks)
    assert got["n_tokens"] == want["n_tokens"] == 6 * 15 and got["kld_mean"] > 1e-3
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_kld_on_fewer_tokens_is_that_of_evenly_spread_chunks(tiny_models, cfg):
    path = tiny_models["llama"][2]
    text = ppl.Text.of("words", words(900))
    few = ppl.PerplexityConfig(**{**cfg.__dict__, "kld_tokens": 20})  # 2 chunks of 15 scored tokens
    assert ppl.kld_chunks(6, 32, 20).tolist() == [0, 5]
    r = ppl.score(path, "1:4x3/uniform", text, few, SHA)
    got = flat(r.stats)
    want = brute_force(path, "1:4x3/uniform", text.text, 32, 6, chunks_for_kld={0, 5})
    assert got["n_tokens"] == 90 and got["n_kld_tokens"] == 30 and r.kld_tokens == 20
    for key in ("kld_mean", "kld_se", "kld_median", "kld_max", "ppl", "ln_ratio", "same_top"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_the_unlooped_plan_is_exactly_the_base(tiny_models, cfg):
    text = ppl.Text.of("words", words(900))
    s = ppl.score(tiny_models["qwen2"][2], "none", text, cfg, SHA).stats
    assert s["kld"]["mean"] == s["kld"]["max"] == s["kld"]["min"] == 0.0
    assert s["ln_ratio"] == 0.0 and s["ratio"] == 1.0 and s["ppl"] == s["ppl_base"]
    assert s["dp"]["rms"] == s["dp"]["max"] == s["dp"]["min"] == 0.0 and s["same_top"] == 1.0


def test_bos_replaces_the_first_token_of_every_chunk(tiny_models, cfg):
    """The tiny vocabulary adds BOS: every chunk starts with it, as llama-perplexity decodes them."""
    path = tiny_models["llama"][2]
    llm = ppl.open_model(path, cfg)
    try:
        assert ppl._bos(llm) == llm.token_bos() == 1
    finally:
        llm.close()


# -- the cache -----------------------------------------------------------------------------------


def test_the_base_is_cached_and_rebuilt_when_model_text_or_context_change(tiny_models, cfg):
    llama, qwen = tiny_models["llama"][2], tiny_models["qwen2"][2]
    text = ppl.Text.of("words", words(900))
    first = ppl.score(llama, "1:4x2", text, cfg, "a" * 64)
    assert not first.cached and Path(first.cache).is_file()
    again = ppl.score(llama, "1:4x3/uniform", text, cfg, "a" * 64)
    assert again.cached and again.cache == first.cache
    assert again.stats["ppl_base"] == first.stats["ppl_base"]

    other_text = ppl.score(llama, "1:4x2", ppl.Text.of("words", words(900, seed=1)), cfg, "a" * 64)
    other_ctx = ppl.score(llama, "1:4x2", text, ppl.PerplexityConfig(**{**cfg.__dict__, "n_ctx": 48}), "a" * 64)
    assert not other_text.cached and not other_ctx.cached
    assert len({first.cache, other_text.cache, other_ctx.cache}) == 3

    # another model's file under this model's name: its header says so, and it is rebuilt, not reused
    other_model = ppl.score(qwen, "1:4x2", text, cfg, "b" * 64)
    assert not other_model.cached
    shutil.copy(other_model.cache, first.cache)
    rebuilt = ppl.score(llama, "1:4x2", text, cfg, "a" * 64)
    assert not rebuilt.cached and rebuilt.stats == first.stats
    assert ppl.score(llama, "1:4x2", text, cfg, "a" * 64).cached

    # a damaged file is rebuilt too
    Path(first.cache).write_bytes(Path(first.cache).read_bytes()[:300])
    assert not ppl.score(llama, "1:4x2", text, cfg, "a" * 64).cached


def test_a_cache_of_other_tokens_is_not_reused(tiny_models, cfg):
    path = tiny_models["llama"][2]
    text = ppl.Text.of("words", words(900))
    r = ppl.score(path, "1:4x2", text, cfg, SHA)
    key = ppl.CacheKey(SHA, text.sha256, 32, 6, 0)
    base = ppl.load_base(Path(r.cache), key)
    assert base is not None
    other = base.tokens.copy()
    other[0, 5] += 1
    assert ppl.load_base(Path(r.cache), key, other) is None
    assert ppl.load_base(Path(r.cache), ppl.CacheKey(SHA, text.sha256, 32, 6, 20)) is None


# -- texts and bad input -------------------------------------------------------------------------


@pytest.mark.data
def test_lambada_corpus_is_the_passages_joined():
    passages = ppl.lambada_passages()
    text = ppl.corpus("lambada")
    assert len(passages) == 5153 and text.text.startswith(passages[0] + "\n\n" + passages[1])
    assert passages[0].endswith(" signs") and text.default_chunks(512) == 195


def test_read_text_drops_one_trailing_newline(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("héllo\n\n".encode())
    assert ppl.read_text(f).text == "héllo\n"


def test_report_shows_perplexity_after_accuracy(tiny_models, tmp_path):
    path, db = tiny_models["llama"][2], tmp_path / "r.sqlite"
    text = tmp_path / "words.txt"
    text.write_text(words(900))
    out = tmp_path / "r.json"
    args = ["perplexity", str(path), "--loop", "1:4x3", "--mix", "uniform", "--text", str(text), "-c", "32"]
    args += ["--chunks", "6", "--db", str(db), "--cache-dir", str(tmp_path / "c"), "--json", str(out), "-t", "2"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert "Mean    KLD:" in run.output and "Same top p:" in run.output
    record = json.loads(out.read_text())
    assert record["plan"] == "1:4x3/uniform" and record["stats"]["n_tokens"] == 90
    report = CliRunner().invoke(main, ["report", "--db", str(db)])
    assert report.exit_code == 0, report.output
    lines = report.output.splitlines()
    row = next(line for line in lines if "1:4x3/uniform" in line)
    assert "| words.txt | 32 | 6 | 1:4x3/uniform | 90 |" in row
    assert lines.index(row) > lines.index(next(line for line in lines if line.startswith("| model | task")))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\n \n", "is empty"),
        (b"some text\x00\x01\x02binary", "binary data"),
        ("caf\u00e9 au lait".encode("latin-1"), "is not UTF-8"),
        (b"w1 w2 w3", "needs at least 64 (two chunks)"),
    ],
)
def test_bad_text_is_one_error_line(tiny_models, tmp_path, content, message):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    proc = ggufloop(
        "perplexity", str(tiny_models["llama"][2]), "--loop", "1:4x2", "--text", str(f), "-c", "32",
        "--db", str(tmp_path / "r.sqlite"), "--cache-dir", str(tmp_path / "c"),
    )  # fmt: skip
    one_error(proc, message)


def test_bad_options_are_one_error_line(tiny_models, tmp_path):
    path = str(tiny_models["llama"][2])
    f = tmp_path / "t.txt"
    f.write_text(words(900))
    common = ["--db", str(tmp_path / "r.sqlite"), "--cache-dir", str(tmp_path / "c")]
    one_error(ggufloop("perplexity", path, "--loop", "1:4x2", "--text", str(f), "-c", "1024", *common), "trained on")
    one_error(ggufloop("perplexity", path, "--loop", "1:4x2", "--corpus", "wiki", *common), "unknown corpus")
    both = ggufloop("perplexity", path, "--loop", "1:4x2", "--corpus", "lambada", "--text", str(f), *common)
    one_error(both, "not both")
    one_error(ggufloop("perplexity", path, "--loop", "1:9x2", "--text", str(f), *common), "out of range")


# -- the results database ------------------------------------------------------------------------


def test_older_databases_gain_the_perplexity_table(tmp_path):
    db = tmp_path / "v2.sqlite"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA.split("CREATE TABLE imported")[0])
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()
    Store(db).close()
    db3 = tmp_path / "v3-early.sqlite"  # schema 3 before it had the perplexity table
    con = sqlite3.connect(db3)
    con.executescript(SCHEMA.split("CREATE TABLE perplexity")[0])
    con.execute("PRAGMA user_version = 3")
    con.commit()
    con.close()
    Store(db3).close()
    for f in (db, db3):
        tables = {r[0] for r in sqlite3.connect(f).execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == TABLES


# -- the oracle: llama.cpp's own llama-perplexity, built from the patched tree --------------------

# llama-perplexity's base file keeps each log-probability as uint16 over the 16 nats below the row's
# maximum: steps of 16/65535 = 2.4e-4, so its nll_base, p_base and every log p_i it sums the KLD over are
# off by up to 1.2e-4 (ggufloop keeps float64 and float32). A token's KLD, sum_i p_i (log p_i - log q_i),
# moves by about sum_i p_i eps_i (1 + log p_i - log q_i), at most ~1.2e-4 for the small divergences here;
# its printed values have 6 decimals. Hence: KLD statistics within 2.5e-4, ln PPL(base) and ln PPL ratio
# within 2.5e-4, delta-p (printed in % with 3 decimals) within 0.03 points, same top within one token.
# The plan's own logits are those of the same batch shape and threads, so PPL(Q) agrees to rounding.
KLD_TOL, LN_TOL, DP_TOL_PCT = 2.5e-4, 2.5e-4, 0.03


def parse_llama_perplexity(out: str) -> dict:
    try:
        return ppl.read_llama_perplexity(out)
    except ValueError as err:
        raise AssertionError(f"{err}:\n{out[-3000:]}") from None


@pytest.mark.system
@pytest.mark.models
@pytest.mark.data
@pytest.mark.parametrize("plan", ["10:15x3/uniform", "8:14x2"])
def test_agrees_with_the_patched_llama_perplexity(tmp_path, plan):
    from ggufloop import models
    from ggufloop.plan import LoopPlan

    binary = ppl.llama_perplexity_binary()
    model = models.fetch("smollm2-135m-instruct", quiet=True)
    f = tmp_path / "lambada.txt"
    f.write_text("\n\n".join(ppl.lambada_passages()[:40]))  # about 2,700 tokens; 4 chunks of 128 are scored
    c, n, threads = 128, 4, 2
    shape = ["-c", str(c), "-b", str(c), "-ub", str(c), "--chunks", str(n), "-t", str(threads), "-fa", "off"]
    base = tmp_path / "base.kld"
    subprocess.run(
        [str(binary), "-m", str(model), "-f", str(f), *shape, "--kl-divergence-base", str(base)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    overrides = [a for kv in LoopPlan.parse(plan).override_strings() for a in ("--override-kv", kv)]
    proc = subprocess.run(
        [str(binary), "-m", str(model), *shape, "--kl-divergence-base", str(base), "--kl-divergence", *overrides],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = parse_llama_perplexity(proc.stdout + proc.stderr)

    cfg = ppl.PerplexityConfig(n_ctx=c, n_chunks=n, kld_tokens=0, threads=threads, cache_dir=tmp_path / "cache")
    got = flat(ppl.score(model, plan, ppl.read_text(f), cfg, SHA).stats)
    assert got["n_tokens"] == n * (c - 1 - c // 2) and got["kld_mean"] > 1e-3
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert np.log(got["ppl_base"]) == pytest.approx(np.log(want["ppl_base"]), abs=LN_TOL)
    assert got["ln_ratio"] == pytest.approx(want["ln_ratio"], abs=LN_TOL)
    for key in ("kld_mean", "kld_max", "kld_p99.9", "kld_p99", "kld_p95", "kld_p90", "kld_median"):
        assert got[key] == pytest.approx(want[key], abs=KLD_TOL), key
    for key in ("dp_mean", "dp_rms", "dp_p1", "dp_p99"):
        assert got[key] == pytest.approx(want[key], abs=DP_TOL_PCT / 100), key
    assert got["same_top"] == pytest.approx(want["same_top"], abs=1.0 / got["n_tokens"] + 1e-5)


# -- a block window: every (block, K, mix) against one base -----------------------------------------

WINDOW = ["--starts", "1:4", "--sizes", "2:3", "--counts", "2,3", "--mixes", "none,uniform"]  # 3 blocks, 12 plans


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How many base passes and plan passes run (in this process)."""
    calls = {"base": 0, "plan": 0}
    base_pass, plan_pass = ppl.base_pass, ppl.plan_pass

    def count_base(*args, **kwargs):
        calls["base"] += 1
        return base_pass(*args, **kwargs)

    def count_plan(*args, **kwargs):
        calls["plan"] += 1
        return plan_pass(*args, **kwargs)

    monkeypatch.setattr(ppl, "base_pass", count_base)
    monkeypatch.setattr(ppl, "plan_pass", count_plan)
    return calls


def perplexity_cli(path: Path, tmp_path: Path, *args: str, db: str = "r.sqlite", cache: str = "c", chunks: int = 4):
    text = tmp_path / "words.txt"
    if not text.exists():
        text.write_text(words(900))
    common = ["--text", str(text), "-c", "32", "--chunks", str(chunks), "-t", "2"]
    common += ["--db", str(tmp_path / db), "--cache-dir", str(tmp_path / cache)]
    run = CliRunner().invoke(main, ["perplexity", str(path), *args, *common])
    assert run.exit_code == 0, run.output
    return run


def test_window_equals_its_plans_one_by_one_on_one_base(tiny_models, tmp_path, counted):
    path = tiny_models["llama"][2]
    out = tmp_path / "maps"
    run = perplexity_cli(path, tmp_path, *WINDOW, "--out", str(out))
    assert counted == {"base": 1, "plan": 12}
    assert "| 1:3 | 2 | none |" in run.output and "| 3:5 | 3 | uniform |" in run.output
    record = json.loads((out / "kld-llama.json").read_text())
    cells = {c["plan"]: c for c in record["cells"]}
    want = [f"{s}:{s + 2}x{k}{m}" for s in (1, 2, 3) for k in (2, 3) for m in ("", "/uniform")]
    assert sorted(cells) == sorted(want) and record["n_chunk"] == 4 and record["n_layer"] == 6
    assert cells["2:4x3/uniform"]["start"] == 2 and cells["2:4x3/uniform"]["count"] == 3
    for f in ("kld-llama.png", "kld-llama.md"):
        assert (out / f).stat().st_size > 1000
    assert (out / "kld-llama.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2:4 | 3 | uniform |" in (out / "kld-llama.md").read_text()

    for plan, cell in cells.items():  # each plan alone, on a fresh database and cache: the same numbers
        single = tmp_path / "single.json"
        perplexity_cli(path, tmp_path, "--loop", plan, "--json", str(single), db="one.sqlite", cache="c1")
        alone = json.loads(single.read_text())
        assert alone["plan"] == plan and alone["stats"] == cell["stats"], plan
        assert alone["stats"]["kld"]["mean"] > 0
    assert counted == {"base": 2, "plan": 24}  # the single runs' base once, then from their cache


def test_window_resumes_without_recomputing(tiny_models, tmp_path, counted):
    path = tiny_models["llama"][2]
    out = ["--out", str(tmp_path / "maps")]
    perplexity_cli(path, tmp_path, *WINDOW[:4], "--counts", "2", "--mixes", "uniform", *out)  # 3 of the 12
    assert counted == {"base": 1, "plan": 3}
    run = perplexity_cli(path, tmp_path, *WINDOW, *out)
    assert counted == {"base": 1, "plan": 12}  # the cached base, the 9 missing plans
    assert "9 plans scored" in run.output and "3 read from the database" in run.output
    first = json.loads((tmp_path / "maps" / "kld-llama.json").read_text())
    shutil.rmtree(tmp_path / "c")  # every plan stored: the base is not even needed
    run = perplexity_cli(path, tmp_path, *WINDOW, *out)
    assert counted == {"base": 1, "plan": 12} and "0 plans scored" in run.output
    assert json.loads((tmp_path / "maps" / "kld-llama.json").read_text()) == first
    # another chunk count is another base: nothing of it is in the database
    perplexity_cli(path, tmp_path, *WINDOW[:4], "--counts", "2", "--mixes", "none", *out, chunks=3)
    assert counted == {"base": 2, "plan": 15}


def test_window_steps_take_every_nth_block():
    assert ppl.window_blocks(12, "0:9:4", "2:4") == [(0, 2), (0, 3), (4, 6), (4, 7), (8, 10), (8, 11)]
    assert ppl.window_blocks(12, "2:12:3", "2:7:2") == [(s, s + m) for s in (2, 5, 8) for m in (2, 4, 6) if s + m <= 12]
    assert ppl.window_blocks(6, None, "5:6") == [(0, 5), (1, 6)]
    cells = ppl.window_cells(6, "1:2", "2:3", (2, 3), ("none", "ema:0.3"))
    assert [c.plan for c in cells] == ["1:3x2", "1:3x2/ema:0.3", "1:3x3", "1:3x3/ema:0.3"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--starts", "7:9"], "no block in the windows"),
        (["--starts", "2:5", "--sizes", "5:3"], "no block in the windows"),
        (["--starts", "4:2"], "no block in the windows"),
        (["--starts", "a:b"], "bad window"),
        (["--starts", "0:4:0"], "the step must be at least 1"),
        (["--sizes", "2:3", "--counts", "1"], "must be >= 2"),
        (["--sizes", "2:3", "--mixes", "sideways"], "mix"),
        (["--sizes", "2:3", "--loop", "1:4x2"], "not both"),
        ([], "give a plan"),
    ],
)
def test_bad_windows_are_one_error_line(tiny_models, tmp_path, args, message):
    f = tmp_path / "t.txt"
    f.write_text(words(900))
    proc = ggufloop(
        "perplexity", str(tiny_models["llama"][2]), *args, "--text", str(f), "-c", "32", "--chunks", "2",
        "--db", str(tmp_path / "r.sqlite"), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    one_error(proc, message)
