"""`ggufloop eval`: benchmark accuracy of a plan against the unlooped model, item by item."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .options import placement_options, plan_from, plan_options, quiet_llama_logs, store_options


@click.command("eval")
@click.argument("model")
@click.option(
    "--tasks",
    default="winogrande,arc_easy",
    show_default=True,
    help="Comma-separated: winogrande, arc_easy, arc_challenge, hellaswag, piqa, boolq, openbookqa, "
    "mmlu (57 subjects) or mmlu:SUBJECT, and gsm8k (generative: greedy chain-of-thought answers, scored "
    "strict-match and flexible-extract as lm-evaluation-harness does; it combines with the others, not with "
    "--cluster).",
)
@plan_options(required=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Score only the first N items of each task.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1),
    default=None,
    help="gsm8k: most tokens per answer (default 256, lm-eval's); an answer that reaches it is scored as it "
    "stands and counted.",
)
@click.option(
    "--gsm8k-format",
    type=click.Choice(["auto", "chat", "plain"]),
    default="auto",
    show_default=True,
    help="gsm8k's prompt: chat (lm-eval gsm8k_cot, 8-shot, through the model's chat template, exemplars as "
    "turns) or plain (the same 8 exemplars as Question/Answer text, OLMES's prompt); auto: chat when the model "
    "has a chat template.",
)
@store_options
@placement_options
def command(
    model: str,
    tasks: str,
    loop: str,
    mix: str | None,
    decode: str | None,
    moe: str | None,
    limit: int | None,
    shots: int | None,
    db: str,
    json_out: str | None,
    threads: int | None,
    max_new_tokens: int | None,
    gsm8k_format: str,
    cluster: str | None,
    n_gpu_layers: int | None,
    rpc: str | None,
    tensor_split: str | None,
) -> None:
    """Score MODEL on benchmarks with and without a loop plan, item by item, resumably.

    gsm8k generates a greedy answer per item under each (the stored text and both filters' scores are
    kept, so nothing is generated twice)."""
    from ..errors import OptionError
    from ..eval import gsm8k
    from ..eval.evaluate import comparison_table, evaluate, evaluate_gsm8k, generation_table
    from ..eval.ray_executor import ClusterConfig
    from ..eval.tasks import resolve_tasks
    from ..models import resolve
    from ..rpc import Placement

    placement = Placement.from_options(rpc, tensor_split, n_gpu_layers)
    quiet_llama_logs()
    plan = plan_from(loop, mix, decode=decode, moe=moe)
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    generative = gsm8k.TASK in names
    task_list = resolve_tasks(",".join(n for n in names if n != gsm8k.TASK))
    path = resolve(model)
    problems = []
    if generative:  # every refusal before anything is scored
        if cluster:
            raise OptionError("gsm8k generates in this process: --cluster serves the multiple-choice tasks only")
        fmt = gsm8k.format_for(path, gsm8k_format)
        gsm8k.check_shots(shots)
        problems = gsm8k.problems(limit)
    total = 2 * sum(len(t.items(shots, limit)) for t in task_list) + 2 * len(problems)
    results, generated = [], []
    with click.progressbar(length=total, label="scoring", file=sys.stderr, show_eta=True) as bar:
        on = ClusterConfig(cluster, threads or 1) if cluster else None
        if task_list:
            results = evaluate(
                path, task_list, plan, shots, limit, db, threads, progress=bar.update, cluster=on, placement=placement
            )
        if generative:
            generated = [
                evaluate_gsm8k(
                    path, plan, fmt, shots, limit, db, threads, max_new_tokens, progress=bar.update, placement=placement
                )
            ]
    click.echo(f"\n{path.name}: plan {plan} against the unlooped model (paired bootstrap 95% CI, exact McNemar p)\n")
    if results:
        click.echo(comparison_table(results))
    for r in results:
        if r["imported"]:
            n = 2 * r["acc"]["n"]
            click.echo(
                f"  {r['task']}: {r['imported']} of the {n} rows used were imported (report --import), not scored here",
                err=True,
            )
        if r["fewshot_source"] and r["shots"]:
            click.echo(f"  {r['task']}: few-shot examples from {r['fewshot_source']}", err=True)
    if generated:
        click.echo(("\n" if results else "") + generation_table(generated))
    for r in generated:
        b, p = r["baseline"], r["plan"]
        click.echo(f"  {r['task']}: prompt {r['prompt']}, {r['shots']}-shot, greedy: {r['lm_eval']}", err=True)
        click.echo(
            f"  {r['task']}: {b['hit_limit'] + p['hit_limit']} of the {2 * b['n']} answers reached --max-new-tokens "
            f"{r['max_new_tokens']} and were scored as they stand; {b['mean_tokens']:.0f} and "
            f"{p['mean_tokens']:.0f} tokens per answer (unlooped, plan)",
            err=True,
        )
    out = Path(json_out) if json_out else Path(db).parent / f"eval-{path.stem}-{str(plan).replace('/', '_')}.json"
    record = {"model": str(path), "plan": str(plan), "results": results}
    if generative:
        record["generative"] = generated
    out.write_text(json.dumps(record, indent=1))
    click.echo(f"\nwrote {out}", err=True)
