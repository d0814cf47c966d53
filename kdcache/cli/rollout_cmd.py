"""`kdcache rollout`: a student samples responses that generate-teacher then scores."""

from __future__ import annotations

import click

from kdcache.config import apply_config
from kdcache.rollout.run import RolloutConfig, run_rollout


def quiet_transformers() -> None:
    """No weight-loading bars or generation warnings from transformers: our own bar and summary say what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def engine_options(func):
    """The engine flags shared by `rollout` and `eval --generate`."""
    options = [
        click.option("--backend", type=click.Choice(["auto", "vllm", "hf"]), default="auto", show_default=True,
                     help="Sampling engine: vLLM, or transformers (hf); auto uses vLLM when it is installed and loads "
                          "the model."),
        click.option("--dtype", default="auto", show_default=True,
                     help="Weight dtype: auto (the checkpoint's; float32 on a CPU without bf16), bfloat16, float16, float32."),
        click.option("--quantization", default=None, help="vLLM quantization method (detected from the checkpoint if omitted)."),
        click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM tensor parallelism."),
        click.option("--gpu-memory-utilization", type=float, default=None,
                     help="vLLM share of GPU memory [default: 0.85 on GPU, 0.3 on CPU]."),
        click.option("--max-model-len", type=int, default=None,
                     help="vLLM context length (default: --max-length, capped at the model's)."),
        click.option("--max-num-batched-tokens", type=int, default=None,
                     help="vLLM tokens per scheduler step (on CPU, vLLM 0.32 fails on seeded samples whose prompt is "
                          "split over steps: make it at least the prompts' total tokens)."),
        click.option("--enforce-eager/--no-enforce-eager", default=None,
                     help="vLLM: skip graph compilation [default: on for CPU, off for GPU]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_options(func, samples_default: int = 4):
    options = [
        click.option("--samples-per-prompt", type=int, default=samples_default, show_default=True,
                     help="Responses per prompt (each with its own seed)."),
        click.option("--temperature", type=float, default=1.0, show_default=True,
                     help="Sampling temperature (0 = greedy). The stored log-probs are those of the distribution sampled "
                          "from, after temperature and top-p."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling."),
        click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Longest response."),
        click.option("--max-length", type=int, default=2048, show_default=True,
                     help="Bound on prompt + response tokens; longer prompts are bad rows."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Base seed; sample j of prompt i draws with a seed of (seed, i, j)."),
        click.option("--format", "data_format", type=click.Choice(["text", "prompt_response", "alpaca", "messages", "rollout"]),
                     default=None, help="Prompt format (default: detected). Chat rows end with a user turn; a final "
                                        "assistant turn is the reference and is not shown to the model."),
        click.option("--split", default="train", show_default=True, help="Split of a `datasets` directory or hub dataset."),
        click.option("--max-prompts", type=int, default=None, help="Use only the first N prompts."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    apply_config(ctx, ctx.command, value)
    return value


@click.command("rollout")
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True, expose_value=False,
              help="Pipeline YAML; its `rollout:` section supplies defaults for these flags.")
@click.option("--student", required=True,
              help="Model that samples: an HF directory (e.g. run/model), or a LoRA adapter directory (merged into its "
                   "base in a temporary directory first).")
@click.option("--dataset", required=True, help="Prompts: JSONL, .jsonl.zst, Parquet, a directory/glob of them, a `datasets` "
                                               "directory, or a hub dataset (chat `messages`, `prompt`, or Alpaca rows).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Rollout directory (created; rerun the same command to resume). Pass it to generate-teacher --dataset.")
@sampling_options
@click.option("--round", "round_", type=int, default=0, show_default=True,
              help="On-policy round this rollout belongs to; recorded, and train-student refuses caches of mixed rounds.")
@engine_options
@click.option("--shard-size", type=int, default=256, show_default=True, help="Prompts per shard (the unit of resume and scale-out).")
@click.option("--num-workers", type=int, default=1, show_default=True, help="Processes/machines sharing this output directory.")
@click.option("--worker-index", type=int, default=0, show_default=True, help="This worker's index in [0, num-workers).")
@click.option("--output-format", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True,
              help="Row files: zstd Parquet, or JSON Lines.")
@click.option("--skip-bad-rows", is_flag=True, help="Skip (and record) prompts that cannot be used, instead of stopping.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def rollout(round_: int, **options) -> None:
    """Sample responses from STUDENT for the prompts of DATASET into OUTPUT.

    Each row holds the prompt and response token ids, their text, and the log-prob of every
    sampled token under the distribution it was drawn from (for importance weights).
    `kdcache generate-teacher --dataset OUTPUT` scores the rows as they are, and its cache
    records the student and round. Safe to kill and rerun: finished shards are kept, and
    rerunning gives the same rows.
    """
    quiet_transformers()
    manifest = run_rollout(RolloutConfig(round=round_, **options))
    if manifest is None:
        click.echo("worker finished; the rollout completes when the other workers finish (the last one writes rollout.json)")
        return
    totals = manifest["totals"]
    click.echo(f"rollout {options['output']}: {totals['rows']:,} responses to {totals['prompts'] - totals['skipped_prompts']:,} "
               f"prompts, {totals['response_tokens']:,} tokens ({totals['stopped']:,} ended at EOS), round {manifest['round']}, "
               f"{manifest['engine'].get('backend')} {manifest['engine'].get('dtype')}")
