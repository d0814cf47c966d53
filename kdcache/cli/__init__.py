"""`kdcache` command line: a thin layer over the Python API (see README for a reference)."""

from __future__ import annotations

import sys

import click

from kdcache import __version__
from kdcache.errors import KdcacheError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdcache")
def cli() -> None:
    """Offline knowledge distillation: cache a teacher's sparse distributions once
    (generate-teacher), then train students from the cache (train-student)."""


def _register() -> None:
    from kdcache.cli import cache_cmds, demo_cmd, generate_cmd, rollout_cmd

    cli.add_command(generate_cmd.generate_teacher)
    cli.add_command(rollout_cmd.rollout)
    cli.add_command(demo_cmd.demo)
    cli.add_command(cache_cmds.inspect)
    cli.add_command(cache_cmds.verify)
    try:
        from kdcache.cli import train_cmds
    except ImportError:  # stage two not installed in this build
        return
    for command in train_cmds.COMMANDS:
        cli.add_command(command)
    from kdcache.cli.eval_generate_cmd import with_generate

    cli.add_command(with_generate(train_cmds.eval_cmd))  # `eval --generate`: evaluation on generations
    from kdcache.cli.onpolicy_cmd import onpolicy

    cli.add_command(onpolicy)  # rounds of rollout, scoring and training


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    from kdcache.cli import output

    args = sys.argv[1:] if argv is None else list(argv)
    # Before any library is imported: kdcache's own output only, unless --verbose.
    output.configure("--verbose" in args)
    try:
        cli.main(args=args, prog_name="kdcache", standalone_mode=False)
    except KdcacheError as exc:
        click.echo(f"kdcache: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("kdcache: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(
            "kdcache: interrupted; generate-teacher keeps finished shards (rerun the same command), "
            "train-student continues from its last checkpoint with --resume",
            err=True,
        )
        sys.exit(130)
    except OSError as exc:
        # Disk full or permissions anywhere outside the paths that already say so: one line.
        import errno

        where = f"{exc.filename}: " if exc.filename else ""
        hint = ("free space and rerun the same command (finished shards and checkpoints are kept)"
                if exc.errno == errno.ENOSPC else "check the path and its permissions, then rerun the same command")
        click.echo(f"kdcache: error: {where}{exc.strerror or exc}; {hint}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo("kdcache: error: out of memory; lower --batch-tokens / --max-num-batched-tokens / --shard-size", err=True)
        sys.exit(2)
