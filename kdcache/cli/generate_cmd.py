"""`kdcache generate-teacher`: stage one."""

from __future__ import annotations

import click

from kdcache.cli.output import verbose_option

from kdcache.cache import format as fmt
from kdcache.cli.types import CACHE
from kdcache.config import apply_config
from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    apply_config(ctx, ctx.command, value)
    return value


@click.command("generate-teacher")
@verbose_option
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True, expose_value=False,
              help="Pipeline YAML; its `teacher:` section supplies defaults for these flags.")
@click.option("--teacher", required=True, help="HF model directory or hub id, a .gguf file, or an AWQ/GPTQ checkpoint.")
@click.option("--dataset", required=True, help="JSONL, .jsonl.zst, Parquet, a directory/glob of them, a `datasets` save_to_disk directory, or a hub dataset name.")
@click.option("--output", required=True, type=CACHE, help="Cache directory (created; rerun the same command to resume), or an object-store URL: s3://bucket/prefix, gs://..., any fsspec URL.")
@click.option("--backend", type=click.Choice(["auto", "vllm", "hf"]), default="auto", show_default=True, help="vLLM engine or transformers forward; auto prefers vLLM, but transformers for --sampling tail/random (vLLM hands draws over as whole vocabulary rows) unless the teacher is quantized or tensor-parallel.")
@click.option("--top-k", type=int, default=4, show_default=True, help="Top log-probs stored per supervised token (0 with --sampling random stores samples only). The default 4 + tail draws is the quality benchmark's winner; use --top-k 64 --sampling none for temperature != 1 or the other divergences.")
@click.option("--sampling", type=click.Choice(["none", "random", "tail"]), default="tail", show_default=True,
              help="Also store sampled teacher tokens: random = N draws from the full distribution (Random-Sampling KD); "
                   "tail = N draws from outside the top-k only (for --loss tail_rs: exact top-k, unbiased tail).")
@click.option("--samples", type=int, default=8, show_default=True, help="Draws per token for --sampling random/tail (Random-Sampling KD used 50 with --sampling random).")
@click.option("--draws", type=click.Choice(["systematic", "iid"]), default="systematic", show_default=True,
              help="How the --samples draws are made: systematic = N evenly spaced points on the teacher's CDF from one "
                   "random offset (each id's count is floor or ceil of N*p: unbiased, low variance); iid = independent draws.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling (per sequence: [seed, seq_id]).")
@click.option("--split", default="train", show_default=True, help="Split of a `datasets` DatasetDict directory or hub dataset.")
@click.option("--max-length", type=int, default=None, help="Truncate sequences to this many tokens (--mode generate: prompt + response)  [default: 2048, or the teacher's context if shorter].")
@click.option("--format", "data_format", type=click.Choice(["text", "prompt_response", "alpaca", "messages", "rollout"]), default=None, help="Input format (default: detected from the first row; a `kdcache rollout` directory is read as rollout rows).")
@click.option("--mode", type=click.Choice(["score", "generate"]), default="score", show_default=True, help="score: teacher-forced on the dataset's responses; generate: the teacher writes the responses (sequence-level KD).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="--mode generate: response length limit.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="--mode generate: sampling temperature (stored log-probs stay raw, T=1).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="--mode generate: nucleus sampling.")
@click.option("--shard-size", type=int, default=1024, show_default=True, help="Input rows per shard (the unit of resume and scale-out).")
@click.option("--num-workers", type=int, default=None, help="Processes/machines sharing this output directory [default: from a SLURM array job (SLURM_ARRAY_TASK_COUNT), an srun step (SLURM_STEP_NUM_TASKS) or torchrun (WORLD_SIZE), else 1].")
@click.option("--worker-index", type=int, default=None, help="This worker's index in [0, num-workers) [default: from SLURM_ARRAY_TASK_ID, SLURM_PROCID or RANK, else 0].")
@click.option("--skip-bad-rows", is_flag=True, help="Skip (and count in the manifest) rows that cannot be used, instead of stopping.")
@click.option("--dtype", default="auto", show_default=True, help="Teacher dtype: auto, bfloat16, float16, float32.")
@click.option("--quantization", default=None, help="vLLM quantization method (awq, gptq, ...); detected from the checkpoint if omitted.")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM tensor parallelism (GPUs per teacher).")
@click.option("--gpu-memory-utilization", type=float, default=None, help="vLLM share of GPU memory [default: 0.85 on GPU, 0.3 on CPU].")
@click.option("--max-num-batched-tokens", type=int, default=None, help="vLLM tokens per scheduler step; bounds the full-vocab fp32 log-prob buffer (~10 B x tokens x vocab).")
@click.option("--max-model-len", type=int, default=None, help="vLLM context length (default: --max-length + 1 when scoring, --max-length with --mode generate).")
@click.option("--enforce-eager/--no-enforce-eager", default=None, help="vLLM: skip graph compilation (faster start) [default: on for CPU, off for GPU].")
@click.option("--zstd-level", type=int, default=fmt.ZSTD_LEVEL, show_default=True, help="Parquet zstd level of the shards (1 measured best: higher levels barely shrink the high-entropy byte planes and write slower).")
@click.option("--overlap/--no-overlap", default=True, show_default=True, help="Tokenize the next shard and write the previous one in background threads while the teacher scores (holds two shards' results in host memory, about 1 GiB per 2M tokens at top-64).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def generate_teacher(**options) -> None:
    """Score DATASET with TEACHER and write its sparse next-token distributions to OUTPUT.

    Writes zstd Parquet shards plus manifest.json. Safe to kill and rerun: finished shards
    are kept. Split across machines with --num-workers/--worker-index on a shared OUTPUT.
    """
    manifest = generate_teacher_cache(GenerateConfig(**options))
    if manifest is None:
        click.echo("worker finished; the cache completes when the other workers finish (the last one writes manifest.json)")
        return
    from kdcache.cache.stats import format_summary, summarize

    click.echo(format_summary(summarize(options["output"])))
