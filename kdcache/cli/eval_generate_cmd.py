"""`kdcache eval --generate`: evaluation on the model's own generations, scored by the teacher.

`kdcache eval` itself (kdcache.cli.train_cmds) evaluates a model on a cache; this module adds
the generative evaluation under the same name: :func:`with_generate` returns an `eval`
command that hands a command line containing ``--generate`` to :data:`eval_generate` and
every other one to the cache evaluation, unchanged.
"""

from __future__ import annotations

import copy
import functools
import json

import click

from kdcache.cli.rollout_cmd import engine_options, quiet_transformers, sampling_options


@click.command("eval")
@click.option("--generate", is_flag=True, required=True,
              help="Evaluate on generations (this command); without it, `kdcache eval` evaluates on a cache.")
@click.option("--model", required=True, help="Model to evaluate: an HF directory or a LoRA adapter directory.")
@click.option("--prompts", required=True, help="Held-out prompts (chat `messages`, `prompt`, Alpaca...); rows that also "
                                               "hold a response give the ROUGE-L reference.")
@click.option("--teacher", required=True, help="Teacher that scores the samples (as for generate-teacher; same tokenizer).")
@functools.partial(sampling_options, samples_default=1)
@engine_options
@click.option("--teacher-backend", type=click.Choice(["auto", "vllm", "hf"]), default="auto", show_default=True,
              help="Engine that scores the samples (generate-teacher --backend).")
@click.option("--teacher-dtype", default="auto", show_default=True, help="Teacher dtype (generate-teacher --dtype).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the samples (WORK_DIR/rollout) and the teacher's cache of them (WORK_DIR/cache); rerunning "
                   "reuses them. Default: a temporary directory, deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--progress/--no-progress", default=False, show_default=True, help="Show progress bars.")
def eval_generate(generate: bool, model: str, prompts: str, teacher: str, as_json: bool, backend: str, dtype: str,
                  teacher_backend: str, teacher_dtype: str, work_dir: str | None, progress: bool, **options) -> None:
    """Sample from MODEL on held-out PROMPTS, score the samples with TEACHER, report:

    rkl, the teacher-scored per-token reverse KL of the model's own samples (mean of
    log mu(x) - log p(x) over response tokens, mu the sampling distribution); rkl_seq, the same
    summed per response; teacher_ce and model_ce; rouge_l (ROUGE-L F1 against the prompts'
    reference responses, where rows have one); response lengths and the share that ended at EOS.
    """
    from kdcache.rollout.evaluate import evaluate_generations, format_metrics

    quiet_transformers()
    settings = {k: options.pop(k) for k in ("samples_per_prompt", "temperature", "top_p", "max_new_tokens", "max_length",
                                            "seed", "max_prompts", "data_format", "split")}
    metrics = evaluate_generations(model, prompts, teacher, work_dir=work_dir, backend=backend, dtype=dtype,
                                   teacher_backend=teacher_backend, teacher_dtype=teacher_dtype, engine_options=options,
                                   progress=progress, **settings)
    if as_json:
        click.echo(json.dumps({"model": model, "teacher": teacher, "prompt_dataset": prompts, **metrics}, indent=2))
    else:
        click.echo(format_metrics(metrics))


class _EvalDispatch(click.Command):
    """`eval` that dispatches on ``--generate`` (see the module docstring)."""

    def __init__(self, on_cache: click.Command, on_generations: click.Command) -> None:
        super().__init__(on_cache.name, help=on_cache.help, short_help=on_cache.short_help)
        self.on_cache, self.on_generations = on_cache, on_generations

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: ANN001 - click's signature
        target = self.on_generations if "--generate" in args else self.on_cache
        return target.make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context):
        return ctx.command.invoke(ctx)


def with_generate(eval_on_cache: click.Command) -> click.Command:
    """The `eval` command: ``eval_on_cache`` as it is, or :data:`eval_generate` with ``--generate``."""
    on_cache = copy.copy(eval_on_cache)
    on_cache.epilog = ((on_cache.epilog or "") + "\n\nWith --generate: evaluation on the model's own generations, scored "
                       "by a teacher (see `kdcache eval --generate --help`).").strip()
    return _EvalDispatch(on_cache, eval_generate)
