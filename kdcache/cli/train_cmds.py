"""`kdcache train-student` and `kdcache eval`: stage two."""

from __future__ import annotations

import functools
import json
import sys

import click

from kdcache.cli.output import verbose_option
from kdcache.cli.types import CACHE
from kdcache.config import apply_config, load_section
from kdcache.student.losses import ALL_LOSS_NAMES


class ClipRatio(click.ParamType):
    """A positive float, or ``none`` (no clipping)."""

    name = "FLOAT|none"

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off")):
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor none", param, ctx)


def _load_train_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    apply_config(ctx, ctx.command, value)
    return value


def _load_eval_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """The `student:` section's loss and runtime keys become eval defaults; training-only keys
    (and model/cache/output, which name the training inputs) are ignored."""
    if value:
        names = {p.name for p in ctx.command.params if isinstance(p, click.Option)} - {"config", "model", "cache"}
        values = {k: v for k, v in load_section(value, "student").items() if k in names}
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _quiet_transformers() -> None:
    """No weight-loading progress bars from transformers (for --no-progress and scripts)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _loss_options(func):
    options = [
        click.option("--loss", type=click.Choice(["auto", *ALL_LOSS_NAMES]), default="auto", show_default=True,
                     help="KD loss: auto (rs_kd for a cache of samples only, tail_rs for a --sampling tail cache, else tail), "
                          "tail (= forward KL on top-k + tail bucket), forward_kl, reverse_kl, jsd, skew_forward, "
                          "skew_reverse, tv, akl, topk_renorm (biased, for comparison), rs_kd (needs a --sampling random "
                          "cache), tail_rs (exact top-k + tail bucket, the tail's shape from a --sampling tail cache), "
                          "sampled_rkl (on-policy: the sampled-token reverse KL with importance weights; needs a cache of "
                          "`kdcache rollout` samples)."),
        click.option("--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature (KD term x T^2); tail_rs and rs_kd (the default losses of sampling caches) need 1."),
        click.option("--jsd-beta", type=float, default=0.5, show_default=True, help="--loss jsd: mixture weight (0 = forward KL, 1 = reverse KL)."),
        click.option("--skew-alpha", type=float, default=0.1, show_default=True, help="--loss skew_forward/skew_reverse: skew in [0, 1)."),
        click.option("--akl-mu", type=float, default=0.5, show_default=True, help="--loss akl: head/tail threshold on cumulative teacher mass."),
        click.option("--ce-weight", type=float, default=0.0, show_default=True,
                     help="Mix in CE on gold tokens: loss = (1 - w) * KD + w * CE (torchtune's kd_ratio = 1 - w)."),
        click.option("--clip-ratio", type=ClipRatio(), default=0.2, show_default=True,
                     help="--loss sampled_rkl: PPO clip of the importance weight q/mu to [1 - c, 1 + c]; none = plain "
                          "importance sampling."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _runtime_options(func, dtype_help: str = "Weight dtype: auto (float32 master weights; bfloat16 frozen base for "
                                                 "LoRA on GPUs), float32, bfloat16, float16."):
    options = [
        click.option("--micro-batch-tokens", type=int, default=8192, show_default=True,
                     help="Tokens per forward pass (sequences are packed up to this budget); the main memory knob."),
        click.option("--device", default="auto", show_default=True, help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ... Under a launcher: auto, cuda (the GPU of LOCAL_RANK) or cpu."),
        click.option("--dtype", default="auto", show_default=True, help=dtype_help),
        click.option("--autocast", type=click.Choice(["auto", "bf16", "none"]), default="auto", show_default=True,
                     help="bf16 autocast of the forward pass (auto: on CUDA GPUs with bf16)."),
        click.option("--attn-implementation", default="auto", show_default=True,
                     help="auto (flash_attention_2 if installed on CUDA, else sdpa), sdpa, eager, flash_attention_2, "
                          "flex_attention. Packed sequences: sdpa/eager use a T x T mask; flash/flex use varlen kernels "
                          "(faster; flex compiles for ~2 min first)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("train-student")
@verbose_option
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_train_config, is_eager=True, expose_value=False,
              help="Pipeline YAML; its `student:` section supplies defaults for these flags.")
@click.option("--student", required=True, help="Student: HF model directory or hub id (the base model for LoRA).")
@click.option("--cache", required=True, type=CACHE, help="Teacher cache from generate-teacher: a directory or an object-store URL (s3://..., gs://...).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics, final model).")
@click.option("--eval-cache", type=CACHE, default=None, help="Held-out cache for evaluation and best-checkpoint selection.")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Evaluate every N steps (0: only at the end).")
@click.option("--eval-sequences", type=int, default=None, help="Evaluate on the first N sequences of --eval-cache only.")
@_loss_options
@click.option("--mix-cache", type=click.Path(file_okay=False), default=None,
              help="A second training cache (e.g. fixed data next to a --cache of student samples); each global batch "
                   "takes the share --lmbda from --cache and the rest from here.")
@click.option("--lmbda", type=float, default=None,
              help="With --mix-cache: share of each global batch drawn from --cache, in (0, 1) (GKD's lambda when "
                   "--cache holds the student's samples): round(lmbda * --global-batch-size) sequences.")
@click.option("--mix-loss", type=click.Choice(["auto", *ALL_LOSS_NAMES]), default="auto", show_default=True,
              help="Loss on the --mix-cache sequences (auto: from that cache, as for --loss); the loss options are shared.")
@click.option("--allow-mixed-rounds", is_flag=True,
              help="Train on caches of samples from different rollout rounds or students (refused by default).")
@click.option("--epochs", type=int, default=1, show_default=True, help="Passes over --cache (ignored with --max-steps).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps to run (overrides --epochs).")
@click.option("--global-batch-size", type=int, default=32, show_default=True, help="Sequences per optimizer step over all ranks (each rank packs its share into micro-batches and accumulates).")
@click.option("--lr", type=float, default=None, help="Peak learning rate  [default: 2e-4 with LoRA, 2e-5 full fine-tuning]")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay (matrices only).")
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True, help="Share of the steps spent in linear warmup.")
@click.option("--lr-scheduler", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True, help="Decay after warmup.")
@click.option("--min-lr-ratio", type=float, default=0.0, show_default=True, help="Final LR as a fraction of --lr.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for data order, LoRA init and dropout.")
@_runtime_options
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True, help="Recompute activations in backward (less memory, ~30% slower).")
@click.option("--lean-layers/--no-lean-layers", default=True, show_default=True, help="RMSNorm and SwiGLU layers that keep fewer activations for backward (same math; fused kernels on CUDA).")
@click.option("--lora-r", type=int, default=0, show_default=True, help="LoRA rank; 0 = full fine-tuning.")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="LoRA alpha.")
@click.option("--lora-dropout", type=float, default=0.05, show_default=True, help="LoRA dropout.")
@click.option("--lora-targets", default="all-linear", show_default=True, help="Modules to adapt: all-linear or comma-separated names (q_proj,v_proj,...).")
@click.option("--load-in-4bit", is_flag=True, help="QLoRA: 4-bit NF4 base (needs CUDA and bitsandbytes; with --lora-r).")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True, help="Shuffle shards and sequences (per epoch, from --seed).")
@click.option("--shuffle-window", type=int, default=1, show_default=True, help="Shards decoded and shuffled together (memory: this many shards).")
@click.option("--log-every", type=int, default=1, show_default=True, help="Write a metrics.jsonl line every N steps.")
@click.option("--save-every", type=int, default=500, show_default=True, help="Write the resume checkpoint last/ every N steps (0: only at the end and at new bests).")
@click.option("--best-metric", type=click.Choice(["loss", "kl", "ce"]), default="loss", show_default=True, help="Eval metric that picks best/.")
@click.option("--final-model", type=click.Choice(["best", "last"]), default="best", show_default=True, help="Which checkpoint becomes model/ (best needs --eval-cache).")
@click.option("--save-dtype", default="auto", show_default=True, help="dtype of the exported model/ (auto: the student checkpoint's).")
@click.option("--resume", is_flag=True, help="Continue the run in --output from last/ (same settings required).")
@click.option("--overwrite", is_flag=True, help="Delete the run in --output and start over.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def train_student(**options) -> None:
    """Train STUDENT on the teacher distributions in CACHE; write checkpoints and the final model to OUTPUT.

    OUTPUT/model is a standalone model (LoRA merged in) loadable by transformers and vLLM;
    OUTPUT/COMPLETE marks a finished run. Interrupted runs continue with --resume.

    Multi-GPU: start it with a launcher, e.g. `torchrun --nproc_per_node 8 -m kdcache train-student ...`
    or `srun python -m kdcache train-student ...`: full fine-tuning is sharded with FSDP2, LoRA
    runs under DDP, and --global-batch-size counts sequences over all ranks.
    """
    from kdcache.student.distributed import RankError, detect_launch
    from kdcache.student.train import TrainConfig, train_student as run

    if not options["progress"]:
        _quiet_transformers()
    try:
        summary = run(TrainConfig(**options))
    except RankError as exc:
        # Under a launcher: the rank that failed says why; ranks that only repeat it stay quiet.
        if not exc.quiet:
            click.echo(f"kdcache: error: {exc}", err=True)
        sys.exit(2)
    launch = detect_launch()
    if launch is not None and launch.rank != 0:
        return  # rank 0 reports the run
    best = ""
    if summary.get("best_step") is not None:
        best = f"; best eval {summary['best_metric']} {summary['best_value']:.4f} at step {summary['best_step']}"
    mix = f" (--lmbda {summary['lmbda']:g}; --mix-loss {summary['mix_loss']} on --mix-cache)" if summary.get("mix_loss") else ""
    click.echo(f"trained {summary['steps']} steps with --loss {summary['loss']}{mix} on {summary['supervised_tokens']:,} "
               f"supervised tokens{best}")
    click.echo(f"model: {summary['model']}" + (f"  adapter: {summary['adapter']}" if summary.get("adapter") else ""))


@click.command("eval")
@verbose_option
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_eval_config, is_eager=True, expose_value=False,
              help="Pipeline YAML; loss and runtime keys of its `student:` section supply defaults.")
@click.option("--model", required=True, help="Model directory, hub id, or a LoRA adapter directory (e.g. OUTPUT/model, OUTPUT/adapter).")
@click.option("--cache", required=True, type=CACHE, help="Teacher cache to evaluate against (a directory or an object-store URL).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--max-sequences", type=int, default=None, help="Evaluate the first N sequences only.")
@_loss_options
@functools.partial(_runtime_options, dtype_help="Weight dtype: auto (the checkpoint's own dtype; float32 on CPU), "
                                              "float32, bfloat16, float16.")
@click.option("--progress/--no-progress", default=False, show_default=True, help="Show a progress bar.")
def eval_cmd(model: str, cache: str, as_json: bool, max_sequences: int | None, loss: str, temperature: float,
             jsd_beta: float, skew_alpha: float, akl_mu: float, ce_weight: float, clip_ratio: float | None,
             micro_batch_tokens: int,
             device: str, dtype: str, autocast: str, attn_implementation: str, progress: bool) -> None:
    """KL to the teacher (top-k + tail bucket), CE and perplexity of MODEL on CACHE.

    Also the teacher's own CE/perplexity, top-1 agreement, and `loss` (the --loss objective;
    for tail_rs and rs_kd a sample estimate biased upward at small N, not a KL; rs_kd adds
    rs_kl, its KL estimate). kl covers the top-k ids plus one bucket: a lower bound of the
    full-vocabulary KL, loose at small k. See the README's stage-two section.
    """
    from kdcache.cache.manifest import load_manifest
    from kdcache.errors import KdcacheError
    from kdcache.student.compat import check_loss_needs, ignored_draws_warning, resolve_loss
    from kdcache.student.evaluate import evaluate_model, format_metrics
    from kdcache.student.losses import KDLossConfig

    if not progress:
        _quiet_transformers()
    if max_sequences is not None and max_sequences < 1:
        raise KdcacheError(f"--max-sequences must be >= 1, got {max_sequences}")
    manifest = load_manifest(cache)
    loss = resolve_loss(loss, manifest)
    check_loss_needs(loss, manifest, cache)
    if (warning := ignored_draws_warning(loss, manifest, cache)) is not None:
        click.echo(f"kdcache: warning: {warning}", err=True)

    try:
        loss_config = KDLossConfig(loss=loss, tau=temperature, beta=jsd_beta, alpha=skew_alpha, akl_mu=akl_mu,
                                   ce_weight=ce_weight, clip_ratio=clip_ratio)
    except ValueError as exc:
        raise KdcacheError(f"loss options: {exc}") from None
    metrics = evaluate_model(
        model, cache, device=device, dtype=dtype, autocast=autocast, attn_implementation=attn_implementation,
        micro_batch_tokens=micro_batch_tokens, loss_config=loss_config, max_sequences=max_sequences, progress=progress,
    )
    if as_json:
        click.echo(json.dumps({"model": model, "cache": cache, **metrics}, indent=2))
    else:
        click.echo(format_metrics(metrics))


COMMANDS = [train_student, eval_cmd]
