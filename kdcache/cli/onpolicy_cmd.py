"""`kdcache onpolicy`: rounds of rollout, teacher scoring and training (kdcache.onpolicy)."""

from __future__ import annotations

import click

from kdcache.cli.output import verbose_option


@click.command("onpolicy")
@verbose_option
@click.option("--config", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Pipeline YAML with `rollout:`, `teacher:` and `student:` sections (and `onpolicy:`: work-dir, "
                   "train-launcher).")
@click.option("--rounds", required=True, type=int, help="Rounds to have finished: 0 .. ROUNDS-1.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the rounds go (WORK_DIR/round-R/{rollout,cache,train}); default: the `onpolicy:` section's.")
@click.option("--dry-run", is_flag=True, help="Print each step's command (what separate machines run) and stop.")
def onpolicy(config: str, rounds: int, work_dir: str | None, dry_run: bool) -> None:
    """On-policy distillation in rounds: student_r samples (kdcache rollout), the teacher scores
    the samples (kdcache generate-teacher), student_r trains on them (kdcache train-student) into
    student_{r+1} = WORK_DIR/round-r/train/model.

    Each step runs as its own process and frees its model when done; finished steps are never
    run again, so after an interruption (even kill -9) the same command continues. Every step
    is the command --dry-run prints: run them alone on separate machines for the same result.
    """
    from kdcache.onpolicy import run_onpolicy

    result = run_onpolicy(config, rounds, work_dir=work_dir, dry_run=dry_run, echo=click.echo)
    if dry_run:
        return
    skipped = f" ({len(result['skipped'])} finished step(s) skipped)" if result["skipped"] else ""
    click.echo(f"{rounds} round(s) done in {result['work_dir']}{skipped}; final student: {result['student']}")
