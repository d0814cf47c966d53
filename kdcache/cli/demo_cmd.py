"""`kdcache demo`: both stages offline on the real SmolLM2 teacher, then the eval table."""

from __future__ import annotations

import json

import click

from kdcache.cli.output import verbose_option


@click.command("demo")
@verbose_option
@click.option("--output", default="demo-output", show_default=True, type=click.Path(file_okay=False), help="Where data, caches and the run go.")
@click.option("--train-rows", type=int, default=160, show_default=True, help="Wikipedia articles to distill on.")
@click.option("--eval-rows", type=int, default=40, show_default=True, help="Held-out articles for the eval table.")
@click.option("--backend", type=click.Choice(["auto", "vllm", "hf"]), default=None, help="Teacher backend (default: the demo config's).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of a table.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(output: str, train_rows: int, eval_rows: int, backend: str | None, as_json: bool, progress: bool) -> None:
    """Cache SmolLM2-135M-Instruct's distributions over Wikipedia (stage one), distill a
    10-layer student cut from it (stage two), and print held-out metrics before and after."""
    from kdcache.cache.stats import format_summary, summarize
    from kdcache.demo import format_demo_table, run_demo

    result = run_demo(output, train_rows, eval_rows, backend=backend, progress=progress)
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("before", "after", "caches")}, indent=2, default=str))
        return
    click.echo("\nStage one: the training cache\n" + format_summary(summarize(result["caches"]["train"])))
    click.echo("\nStage two: held-out metrics on the eval cache\n" + format_demo_table(result))
