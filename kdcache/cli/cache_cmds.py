"""`kdcache inspect` and `kdcache verify`."""

from __future__ import annotations

import json
import sys

import click

from kdcache.cli.output import verbose_option

from kdcache.cache.stats import format_summary, summarize, verify_cache
from kdcache.cli.types import CACHE


@click.command()
@verbose_option
@click.argument("cache_dir", type=CACHE)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(cache_dir: str, as_json: bool) -> None:
    """Summarize a cache: sequences, supervised tokens, bytes per token, top-k mass, shards."""
    summary = summarize(cache_dir)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@click.command()
@verbose_option
@click.argument("cache_dir", type=CACHE)
def verify(cache_dir: str) -> None:
    """Check every shard's checksum, schema and counts against the manifest.

    Exits 1 and names each damaged shard if anything is wrong.
    """
    problems = verify_cache(cache_dir)
    for problem in problems:
        click.echo(f"DAMAGED {problem}", err=True)
    if problems:
        click.echo(f"kdcache: verify failed: {len(problems)} problem(s); copy the named shards again, or delete them and "
                   "rerun the same generate-teacher command to rescore them", err=True)
        sys.exit(1)
    click.echo(f"OK {cache_dir}: all shards match the manifest")
