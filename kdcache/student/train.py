"""Stage two: train a student from a teacher cache (`kdcache train-student`).

The loop, top to bottom (:func:`train_student`):

1. check the caches against the student's tokenizer, the loss and each other (samples of
   one rollout round only, unless ``--allow-mixed-rounds``), claim ``--output``;
2. load the student (full fine-tuning, LoRA or QLoRA), build AdamW and the LR schedule;
3. on ``--resume``, restore weights, optimizer, scheduler, RNG and the data position(s);
4. each optimizer step takes ``--global-batch-size`` sequences (from ``--cache``, or a share
   ``--lmbda`` of them from ``--cache`` and the rest from ``--mix-cache``, each with its own
   loss: :mod:`kdcache.student.sources`), packs them into micro-batches of at most
   ``--micro-batch-tokens`` tokens and accumulates gradients; the loss is averaged over the
   *global* batch's supervised tokens, so accumulation gives the same gradient as one big batch;
5. every ``--eval-every`` steps: evaluate on ``--eval-cache``, keep ``best/``; every
   ``--save-every`` steps: write ``last/``;
6. at the end: export the final model (``model/``, plus ``adapter/`` for LoRA), plot the
   curves, write ``summary.json`` and, last, ``COMPLETE``.

The forward pass runs the decoder body only and hands the supervised positions' hidden
states to :func:`kdcache.student.chunked.chunked_kd_loss`, which never builds the
full-vocabulary logits of a whole micro-batch.

Under a launcher (``torchrun ... -m kdcache train-student``, ``srun``, ``accelerate launch``;
see :mod:`kdcache.student.distributed`) the same loop runs on every rank: full fine-tuning is
sharded with FSDP2 and LoRA wrapped in DDP; each rank reads and trains on its share of every
global batch (:class:`~kdcache.student.data.RankBatches`); token counts and metrics are summed
over ranks, so the loss is the mean over the global batch's supervised tokens as in one
process; evaluation is split over ranks and reduced; rank 0 writes metrics, ``best/``, the
final model and ``COMPLETE``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import secrets
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.cache.reader import CacheReader
from kdcache.errors import KdcacheError
from kdcache.student import checkpoint as ckpt
from kdcache.student.chunked import chunked_kd_loss, head_inputs
from kdcache.student.compat import (
    check_loss_needs,
    check_rollout_caches,
    check_output_rows,
    check_same_tokenizer,
    check_tokenizer,
    ignored_draws_warning,
    load_tokenizer,
    resolve_loss,
)
from kdcache.student.data import DataPosition, MicroBatch
from kdcache.student.distributed import (
    DistEnv,
    LauncherStop,
    RankError,
    init_distributed,
    shard_fsdp2,
    sigterm_raises,
    wrap_ddp,
)
from kdcache.student.evaluate import evaluate, loss_available
from kdcache.student.losses import ALL_LOSS_NAMES, KDLossConfig
from kdcache.student.modeling import (
    LoraSettings,
    StudentStep,
    check_qlora_available,
    checkpoint_dtype,
    DTYPES,
    export_model,
    lm_head_params,
    load_student,
    resolve_attn_implementation,
    resolve_device,
    resolve_precision,
    uses_dropout,
)
from kdcache.student.sources import SOURCE_LABELS, Source, SourceBatches, batch_shares, check_lmbda, source_metrics

logger = logging.getLogger("kdcache")

#: Settings that may change between a run and its ``--resume``: they do not change the result
#: beyond float rounding (the loss is normalized by the global batch, so how the batch is split
#: into micro-batches does not matter), e.g. lower --micro-batch-tokens after running out of memory.
RESUME_FREE = frozenset({
    "output", "resume", "overwrite", "progress", "log_every", "save_every", "device",
    "micro_batch_tokens", "gradient_checkpointing", "attn_implementation", "lean_layers", "allow_mixed_rounds",
})


@dataclass
class TrainConfig:
    """Everything `kdcache train-student` takes (field names = option names).

    Units: batch sizes in sequences, ``micro_batch_tokens`` in tokens, steps are optimizer
    steps. ``lr=None`` means 2e-4 with LoRA and 2e-5 for full fine-tuning. ``clip_ratio=None``:
    ``sampled_rkl`` without clipping. ``mix_cache``/``lmbda``/``mix_loss``: see
    :mod:`kdcache.student.sources`.
    """

    student: str
    cache: str
    output: str
    eval_cache: str | None = None
    eval_every: int = 0
    eval_sequences: int | None = None
    loss: str = "auto"  # resolved from the cache by compat.resolve_loss
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    akl_mu: float = 0.5
    ce_weight: float = 0.0
    clip_ratio: float | None = 0.2
    mix_cache: str | None = None
    lmbda: float | None = None
    mix_loss: str = "auto"  # resolved from the mix cache
    allow_mixed_rounds: bool = False
    epochs: int = 1
    max_steps: int | None = None
    global_batch_size: int = 32
    micro_batch_tokens: int = 8192
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    autocast: str = "auto"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    lean_layers: bool = True
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    load_in_4bit: bool = False
    shuffle: bool = True
    shuffle_window: int = 1
    log_every: int = 1
    save_every: int = 500
    best_metric: str = "loss"
    final_model: str = "best"
    save_dtype: str = "auto"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    @property
    def use_lora(self) -> bool:
        return self.lora_r > 0

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 2e-4 if self.use_lora else 2e-5

    def loss_config(self, loss: str | None = None) -> KDLossConfig:
        """The loss of ``--cache`` (or ``loss``, e.g. ``--mix-loss``) with this run's loss options."""
        try:
            return KDLossConfig(
                loss=loss or self.loss, tau=self.temperature, beta=self.jsd_beta, alpha=self.skew_alpha,
                akl_mu=self.akl_mu, ce_weight=self.ce_weight, clip_ratio=self.clip_ratio,
            )
        except ValueError as exc:
            flag = "--mix-loss" if loss is not None and loss != self.loss else "loss options"
            raise KdcacheError(f"{flag}: {exc}") from None

    def lora_settings(self) -> LoraSettings | None:
        if not self.use_lora:
            return None
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets, self.load_in_4bit)

    def check(self) -> None:
        if self.clip_ratio is not None and not self.clip_ratio > 0:
            raise KdcacheError(f"--clip-ratio must be > 0 (or none for no clipping), got {self.clip_ratio}")
        for flag, name in (("--loss", self.loss), ("--mix-loss", self.mix_loss)):
            if name != "auto" and name not in ALL_LOSS_NAMES:
                raise KdcacheError(f"{flag} {name!r}: choose auto or one of {', '.join(ALL_LOSS_NAMES)}")
            if name != "auto":
                self.loss_config(name)
        check_lmbda(self.lmbda, self.mix_cache)
        if self.mix_cache is not None:
            batch_shares(self.global_batch_size, self.lmbda)
        positive = {"global_batch_size": self.global_batch_size, "micro_batch_tokens": self.micro_batch_tokens,
                    "epochs": self.epochs, "shuffle_window": self.shuffle_window, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise KdcacheError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise KdcacheError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.eval_sequences is not None and self.eval_sequences < 1:
            raise KdcacheError(f"--eval-sequences must be >= 1 (or left out for the whole eval cache), got {self.eval_sequences}")
        if self.eval_every < 0 or self.save_every < 0 or self.lora_r < 0:
            raise KdcacheError("--eval-every, --save-every and --lora-r must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise KdcacheError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise KdcacheError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise KdcacheError(f"--lr-scheduler {self.lr_scheduler!r}: use cosine, linear or constant")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise KdcacheError("--lr must be > 0, --weight-decay and --max-grad-norm >= 0")
        if self.load_in_4bit and not self.use_lora:
            raise KdcacheError("--load-in-4bit (QLoRA) trains LoRA adapters: also pass --lora-r (e.g. 16)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise KdcacheError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.best_metric not in ("loss", "kl", "ce"):
            raise KdcacheError(f"--best-metric {self.best_metric!r}: use loss, kl or ce")
        if self.final_model not in ("best", "last"):
            raise KdcacheError(f"--final-model {self.final_model!r}: use best or last")
        if self.save_dtype != "auto" and self.save_dtype not in DTYPES:
            raise KdcacheError(f"--save-dtype {self.save_dtype!r}: use auto, float32, bfloat16 or float16")
        if self.resume and self.overwrite:
            raise KdcacheError("--resume and --overwrite exclude each other")

    def ignored_options(self) -> list[str]:
        """Warnings for options set away from their defaults that this run cannot use."""
        defaults = type(self)(student="", cache="", output="")
        notes = []
        for names, enabled, needs in (
            (("eval_every", "eval_sequences", "best_metric"), self.eval_cache,
             "--eval-cache (the final model is the last step's)"),
            (("lora_alpha", "lora_dropout", "lora_targets"), self.lora_r,
             "--lora-r (this run fine-tunes every weight)"),
            (("mix_loss",), self.mix_cache, "--mix-cache"),
        ):
            flags = [f"--{n.replace('_', '-')}" for n in names if getattr(self, n) != getattr(defaults, n)]
            if flags and not enabled:
                notes.append(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect without {needs}")
        return notes


# ------------------------------------------------------------------------------ pieces


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warmup, then decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                    fused: bool = True) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not on norms and biases); fused on CUDA unless
    ``fused`` is False (FSDP2's sharded parameters use the foreach implementation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise KdcacheError("the student has no trainable parameters (check --lora-targets)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = fused and device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


@dataclass(frozen=True)
class Runtime:
    """Where and how the forward pass runs.

    ``compute_dtype`` is the dtype attention runs in (the autocast dtype, else the weights'
    or, for QLoRA, the 4-bit layers' compute dtype); packed-sequence masks are built in it.
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    attn_implementation: str
    compute_dtype: torch.dtype = torch.float32

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)


def forward_backward(
    model: nn.Module,
    batches: list[MicroBatch],
    loss_config: KDLossConfig | Sequence[KDLossConfig],
    runtime: Runtime,
    num_tokens: int | None = None,
    sources: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accumulate gradients of one global batch; returns its metrics.

    Each micro-batch's loss is a sum over its supervised tokens divided by ``num_tokens``
    (default: all supervised tokens in ``batches``), so the accumulated gradient is that of
    the mean over the global batch. In a distributed run ``num_tokens`` is the count over all
    ranks and the ranks' gradients are summed. ``model`` is the student, or a
    :class:`~kdcache.student.modeling.StudentStep` (sharded with FSDP2 or wrapped in DDP;
    DDP then synchronizes gradients only in the last micro-batch).

    Args:
        loss_config: the loss of every micro-batch, or one per micro-batch (a run mixing two
            caches, each with its own loss).
        sources: a label per micro-batch; the metrics then also hold ``kd_<label>`` and
            ``ce_<label>``, that label's sums divided by ``num_tokens`` like the totals.

    Returns ``loss``, ``kd``, ``ce`` and, where the losses give them, ``rs_kl``, ``rkl`` and
    ``clip_frac``: sums over the micro-batches of their sums divided by ``num_tokens``.
    """
    ddp = isinstance(model, DistributedDataParallel)
    step = model if ddp or isinstance(model, StudentStep) else StudentStep(model)
    num_tokens = num_tokens or sum(mb.num_targets for mb in batches)
    configs = [loss_config] * len(batches) if isinstance(loss_config, KDLossConfig) else list(loss_config)
    mask_dtype = runtime.autocast_dtype or runtime.compute_dtype
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    for i, (mb, config) in enumerate(zip(batches, configs, strict=True)):
        mb = mb.to(runtime.device)

        def head(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float, mb: MicroBatch = mb,
                 config: KDLossConfig = config):
            h, w, b = head_inputs(hidden, weight, bias, scale, runtime.autocast_dtype)
            return chunked_kd_loss(h, w, mb.targets, mb.gold_ids, config, bias=b, num_tokens=num_tokens)

        last = i == len(batches) - 1
        with step.no_sync() if ddp and not last else nullcontext():
            loss, metrics = step(mb, head, runtime.attn_implementation, mask_dtype, runtime.autocast_dtype)
            loss.backward()
        for key in ("loss", "kd", "ce", "rs_kl", "rkl", "clip_frac"):
            if key in metrics:
                totals[key] = totals.get(key, 0.0) + metrics[key]
        if sources is not None:
            for key in ("kd", "ce"):
                label = f"{key}_{sources[i]}"
                totals[label] = totals.get(label, 0.0) + metrics[key]
    return totals


def check_finite(step: int, loss: float, grad_norm: float, saved_step: int | None) -> None:
    """Stop before a non-finite loss or gradient reaches the weights, naming the step.

    Every rank sees the same global loss and gradient norm, so every rank stops here.
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    resume = ("no checkpoint was written yet" if saved_step is None
              else f"the last checkpoint (step {saved_step}) is intact")
    raise KdcacheError(
        f"step {step}: non-finite {what}; nothing from this step was applied or saved and {resume}. Check the cache "
        "with `kdcache verify`, lower --lr, or use --dtype bfloat16/float32 instead of float16, then rerun"
        + (" with --resume" if saved_step is not None else "")
    )


def _oom_message(cfg: TrainConfig, where: str, distributed: bool = False) -> str:
    hint = f"lower --micro-batch-tokens (now {cfg.micro_batch_tokens})"
    if not cfg.lean_layers:
        hint += ", drop --no-lean-layers"
    if not cfg.gradient_checkpointing:
        hint += ", pass --gradient-checkpointing"
    if not cfg.use_lora:
        hint += ", add ranks (FSDP2 shards weights and optimizer state over them)" if distributed else ""
        hint += ", or train LoRA adapters (--lora-r 16)"
    return f"out of GPU memory {where}; {hint}"


def run_settings(cfg: TrainConfig, reader: CacheReader, eval_reader: CacheReader | None,
                 mix_reader: CacheReader | None = None) -> dict:
    """The settings recorded in ``run.json``; a resumed run must match them."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    settings["cache_settings_hash"] = reader.manifest["settings_hash"]
    settings["eval_cache_settings_hash"] = eval_reader.manifest["settings_hash"] if eval_reader else None
    if mix_reader is not None:
        settings["mix_cache_settings_hash"] = mix_reader.manifest["settings_hash"]
    return settings


def _best_metric(cfg: TrainConfig, loss_config: KDLossConfig, eval_reader: CacheReader) -> str:
    """The eval metric that picks ``best/``: ``--best-metric`` if the eval cache can give it.

    ``loss`` needs what the loss needs (top-k, samples of the right kind for rs_kd and
    tail_rs, a rollout's log-probs for sampled_rkl); without them such a run falls back to
    ``kl`` with a warning. ``kl`` needs a top-k cache.
    """
    available = {"ce"}
    if eval_reader.top_k > 0:
        available.add("kl")
    if loss_available(loss_config, eval_reader)[0]:
        available.add("loss")
    if cfg.best_metric in available:
        return cfg.best_metric
    if cfg.best_metric == "loss" and "kl" in available:
        lacks = ("rollout log-probs (it is no cache of `kdcache rollout` samples)" if loss_config.needs_rollout
                 else f"{loss_config.sampling_mode}-sampled tokens")
        _warn([f"{cfg.eval_cache} has no {lacks} for the {loss_config.loss} loss; best checkpoint chosen by eval kl"])
        return "kl"
    raise KdcacheError(
        f"{cfg.eval_cache}: --best-metric {cfg.best_metric} cannot be computed on this eval cache "
        f"(top_k {eval_reader.top_k}, samples {eval_reader.num_samples}); use --best-metric ce"
    )


def check_micro_batch_fits(reader: CacheReader, micro_batch_tokens: int) -> None:
    """Refuse up front a --micro-batch-tokens that a cached sequence cannot fit in (caches of
    kdcache >= 0.3 record each shard's longest input), instead of failing when it is reached."""
    longest = max(reader.shards, key=lambda s: s.get("max_input_tokens", 0), default=None)
    if longest is not None and longest.get("max_input_tokens", 0) > micro_batch_tokens:
        raise KdcacheError(
            f"{reader.shard_path(longest)}: holds a sequence of {longest['max_input_tokens']} tokens, more than "
            f"--micro-batch-tokens {micro_batch_tokens}; raise --micro-batch-tokens to at least "
            f"{longest['max_input_tokens']} (with --gradient-checkpointing if memory is short)"
        )


def _warn(messages: list[str]) -> None:
    for message in messages:
        logger.warning("warning: %s", message)


# ------------------------------------------------------------------------------- train


def train_student(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``cfg.student`` on ``cfg.cache``; returns the summary (also in ``summary.json``).

    Started by a launcher (torchrun, srun, accelerate launch), every rank calls this and the
    run is distributed (see the module docstring); errors are then :class:`RankError` naming
    the rank. ``on_step(step, record)`` is called after every optimizer step (tests use it to
    interrupt a run).
    """
    cfg.check()
    env = init_distributed(cfg.device)
    if env is None:
        return _train(cfg, DistEnv(), on_step)
    if not env.is_main:
        logger.setLevel(logging.ERROR)  # rank 0 speaks for the run
    try:
        with sigterm_raises():
            summary = _train(cfg, env, on_step)
    except RankError:
        raise
    except KdcacheError as exc:
        raise RankError(f"rank {env.rank}: {exc}") from None
    env.close()
    return summary


def _train(cfg: TrainConfig, env: DistEnv, on_step: Callable[[int, dict], None] | None) -> dict:
    out = Path(cfg.output)
    distributed = env.enabled

    # 1. Inputs: caches, tokenizer, compatibility. Nothing is written before these pass (on any rank).
    def check_inputs():
        reader = CacheReader(cfg.cache)
        mix_reader = CacheReader(cfg.mix_cache) if cfg.mix_cache else None
        run_cfg = replace(cfg, loss=resolve_loss(cfg.loss, reader.manifest),
                          mix_loss=resolve_loss(cfg.mix_loss, mix_reader.manifest) if mix_reader else cfg.mix_loss)
        loss_config = run_cfg.loss_config()
        warnings = []
        for path, cache_reader, loss, flag in ((cfg.cache, reader, run_cfg.loss, "--loss"),
                                               (cfg.mix_cache, mix_reader, run_cfg.mix_loss, "--mix-loss")):
            if cache_reader is not None:
                check_loss_needs(loss, cache_reader.manifest, path, flag)
                warnings.append(ignored_draws_warning(loss, cache_reader.manifest, path))
        _warn([w for w in warnings if w] + run_cfg.ignored_options())
        eval_reader = CacheReader(cfg.eval_cache) if cfg.eval_cache else None
        best_metric = cfg.best_metric
        if mix_reader is not None:
            check_same_tokenizer(reader.manifest, mix_reader.manifest, cfg.mix_cache, what="--mix-cache")
        if eval_reader is not None:
            check_same_tokenizer(reader.manifest, eval_reader.manifest, cfg.eval_cache)
            best_metric = _best_metric(run_cfg, loss_config, eval_reader)
        _warn(check_rollout_caches([(cfg.cache, reader), (cfg.mix_cache, mix_reader)], [(cfg.eval_cache, eval_reader)],
                                   cfg.student, cfg.allow_mixed_rounds))
        for cache_reader in (reader, mix_reader, eval_reader):
            if cache_reader is not None:
                check_micro_batch_fits(cache_reader, cfg.micro_batch_tokens)
        tokenizer = load_tokenizer(cfg.student)
        _warn(check_tokenizer(tokenizer, reader.manifest, cfg.cache, cfg.student))

        device = env.device if distributed else resolve_device(cfg.device)
        weight_dtype, amp = resolve_precision(cfg.dtype, cfg.autocast, device, cfg.use_lora)
        if weight_dtype == torch.float16 and amp is None and not cfg.use_lora:
            raise KdcacheError("full fine-tuning in float16 without loss scaling is unstable; use --dtype bfloat16 or float32")
        if cfg.load_in_4bit:
            check_qlora_available(device)
        compute_dtype = weight_dtype
        if cfg.load_in_4bit and weight_dtype == torch.float32:
            compute_dtype = torch.bfloat16  # load_student's bnb_4bit_compute_dtype
        runtime = Runtime(device, amp, resolve_attn_implementation(cfg.attn_implementation, device), compute_dtype)
        if mix_reader is None:
            sources = [Source("--cache", reader, loss_config, cfg.global_batch_size)]
        else:
            shares = batch_shares(cfg.global_batch_size, cfg.lmbda)
            sources = [Source("--cache", reader, loss_config, shares[0]),
                       Source("--mix-cache", mix_reader, run_cfg.loss_config(run_cfg.mix_loss), shares[1])]
        return sources, eval_reader, run_cfg, loss_config, best_metric, tokenizer, weight_dtype, runtime

    sources, eval_reader, cfg, loss_config, best_metric, tokenizer, weight_dtype, runtime = env.agree(check_inputs)
    reader = sources[0].reader
    mix_reader = sources[1].reader if len(sources) > 1 else None
    device, amp = runtime.device, runtime.autocast_dtype

    last_dir, best_dir = out / "last", out / "best"

    def claim() -> tuple[bool, str]:
        resuming = ckpt.claim_output(out, run_settings(cfg, reader, eval_reader, mix_reader), resume=cfg.resume,
                                     overwrite=cfg.overwrite)
        ckpt.recover(last_dir)
        ckpt.recover(best_dir)
        token = secrets.token_hex(8) if distributed else ""
        if distributed:  # every rank writes checkpoints here: it must be one filesystem for all
            (out / SHARED_CHECK_FILE).write_text(token)
        return resuming and (last_dir / "trainer_state.json").exists(), token

    resuming, token = env.on_main(claim)
    if resuming:  # before loading anything from last/
        env.agree(lambda: ckpt.check_storage(last_dir, "dcp" if distributed and not cfg.use_lora else "files"))
    if distributed:
        env.agree(lambda: _check_shared_output(out, token))
        env.on_main(lambda: (out / SHARED_CHECK_FILE).unlink(missing_ok=True))

    # 2. Model, optimizer, schedule.
    ckpt.seed_everything(cfg.seed)
    lora = cfg.lora_settings()
    fsdp = distributed and lora is None

    def load() -> nn.Module:
        # FSDP2 weights come from dcp/ on resume; it shards a CPU copy onto the device unit by unit.
        source = last_dir / "model" if (resuming and lora is None and not fsdp) else cfg.student
        try:
            net = load_student(
                source, device=torch.device("cpu") if fsdp else device, dtype=weight_dtype,
                attn_implementation=runtime.attn_implementation, lora=lora, gradient_checkpointing=cfg.gradient_checkpointing,
                lean_layers=cfg.lean_layers, adapter=(last_dir / "adapter") if (resuming and lora) else None,
            )
        except torch.OutOfMemoryError:
            raise KdcacheError(_oom_message(cfg, "while loading the student", distributed)) from None
        check_output_rows(int(lm_head_params(net)[0].shape[0]), reader.manifest, cfg.student)
        return net

    model = env.agree(load)
    model.train()
    random_ops = uses_dropout(model)
    step_module: nn.Module = model  # what forward_backward / evaluate / checkpoints get
    if fsdp:
        step_module = shard_fsdp2(StudentStep(model), amp, device)
    elif distributed:
        step_module = wrap_ddp(StudentStep(model), device)
    if env.rank:
        torch.manual_seed(cfg.seed + env.rank)  # each rank its own dropout stream (rank 0: a single process's)
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, device, fused=not fsdp)
    steps_per_epoch = math.ceil(len(reader) / sources[0].batch_size)  # --epochs counts passes over --cache
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, cfg.lr_scheduler, cfg.min_lr_ratio)
    )

    # 3. Resume.
    state = ckpt.TrainerState()
    if resuming:
        restore_rng = env.agree(lambda: ckpt.check_resume_layout(
            last_dir, storage="dcp" if fsdp else "files", world_size=env.world_size, random_ops=random_ops))
        if distributed:
            state = ckpt.load_checkpoint_distributed(last_dir, env=env, step=step_module, optimizer=optimizer,
                                                     scheduler=scheduler, lora=lora is not None, restore_rng=restore_rng)
        else:
            state = ckpt.load_training_state(last_dir, optimizer, scheduler, restore_rng=restore_rng)

        def prune_best() -> None:
            best_json = best_dir / "eval.json"
            if best_json.exists() and ckpt.load_json_quiet(best_json).get("step", 0) > state.step:
                shutil.rmtree(best_dir)  # saved by the interrupted part of the run, after last/

        env.on_main(prune_best)
    log = ckpt.MetricsLog(out / ckpt.METRICS_FILE, keep_until_step=state.step if resuming else None) if env.is_main else None
    batches = SourceBatches(sources, [state.position, state.mix_position or DataPosition()][: len(sources)],
                            seed=cfg.seed, window_shards=cfg.shuffle_window, shuffle=cfg.shuffle,
                            micro_batch_tokens=cfg.micro_batch_tokens, rank=env.rank, world_size=env.world_size)
    saved_step = state.step if resuming else None

    # 4. The loop.
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state.step, unit="step", disable=not (cfg.progress and env.is_main),
               dynamic_ncols=True)
    start_time = time.perf_counter()
    last_eval: dict | None = None
    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            # Global counts; every rank runs as many micro-batches as the busiest (FSDP2 gathers in each).
            per_rank = env.all_gather([*batch.tokens(len(sources)), len(batch.micro), sum(mb.num_tokens for mb in batch.micro)])
            tokens_by_source = [int(sum(r[i] for r in per_rank)) for i in range(len(sources))]
            num_tokens = sum(tokens_by_source)
            num_micro = int(max(r[-2] for r in per_rank))
            batches.pad(batch, num_micro)
            labels = [SOURCE_LABELS[i] for i in batch.source_of] if mix_reader is not None else None
            metrics = forward_backward(step_module, batch.micro, batch.loss_configs, runtime, num_tokens, sources=labels)
            if distributed:
                keys = sorted(metrics)
                metrics = dict(zip(keys, env.sum([metrics[k] for k in keys])))
            metrics = source_metrics(metrics, sources, tokens_by_source)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            check_finite(state.step + 1, metrics["loss"], float(grad_norm), saved_step)  # before the update
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            positions = batches.positions
            state.position = positions[0]
            state.mix_position = positions[1] if mix_reader is not None else None
            num_seqs = sum(batch.sequences)
            state.sequences += num_seqs
            state.tokens += num_tokens
            elapsed = time.perf_counter() - t0
            record = {
                "type": "train", "step": state.step, "epoch": batch.epochs[0], "lr": lr, **metrics,
                "grad_norm": float(grad_norm), "sequences": num_seqs, "tokens": num_tokens,
                "micro_batches": num_micro, "tokens_per_s": sum(r[-1] for r in per_rank) / max(elapsed, 1e-9),
                "elapsed_s": time.perf_counter() - start_time,
            }
            if mix_reader is not None:
                record.update(mix_epoch=batch.epochs[1], sequences_mix=batch.sequences[1], tokens_mix=tokens_by_source[1])
            if log is not None and (state.step % cfg.log_every == 0 or state.step == total_steps):
                log.write(record)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

            improved = False
            if eval_reader is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == total_steps):
                last_eval = evaluate(
                    step_module, eval_reader, micro_batch_tokens=cfg.micro_batch_tokens, device=device, autocast_dtype=amp,
                    attn_implementation=runtime.attn_implementation, loss_config=loss_config,
                    max_sequences=cfg.eval_sequences, env=env,
                )
                if log is not None:
                    log.write({"type": "eval", "step": state.step, **{f"eval_{k}": v for k, v in last_eval.items()}})
                value = last_eval[best_metric]
                if state.best_value is None or value < state.best_value:
                    state.best_value, state.best_step, improved = value, state.step, True
                    best = {"step": state.step, "metric": best_metric, **last_eval}
                    if distributed:
                        ckpt.save_best_distributed(best_dir, env=env, step=step_module, tokenizer=tokenizer,
                                                   lora=lora is not None, metrics=best)
                    else:
                        ckpt.save_best(best_dir, model=model, tokenizer=tokenizer, lora=lora is not None, metrics=best)
            if improved or state.step == total_steps or (cfg.save_every and state.step % cfg.save_every == 0):
                if distributed:
                    ckpt.save_checkpoint_distributed(
                        last_dir, env=env, step=step_module, optimizer=optimizer, scheduler=scheduler, state=state,
                        tokenizer=tokenizer, lora=lora is not None, full_model=fsdp and state.step == total_steps)
                else:
                    ckpt.save_checkpoint(last_dir, model=model, tokenizer=tokenizer, lora=lora is not None,
                                         optimizer=optimizer, scheduler=scheduler, state=state)
                saved_step = state.step
            if on_step is not None:
                on_step(state.step, record)
    except torch.OutOfMemoryError:
        raise _rank_failure(env, _oom_message(cfg, f"at step {state.step + 1}", distributed)) from None
    except RankError:
        raise
    except KdcacheError as exc:
        raise _rank_failure(env, str(exc)) from None
    except LauncherStop:
        raise RankError(env.lost_peer_message(f"at step {state.step + 1}", _resume_hint(saved_step))) from None
    except Exception as exc:
        if distributed and _is_lost_peer(exc):
            raise RankError(env.lost_peer_message(f"at step {state.step + 1}", _resume_hint(saved_step))) from None
        env.report_failure(f"{type(exc).__name__} at step {state.step + 1}")
        raise
    finally:
        bar.close()

    # 5. Final model, plots, summary (rank 0, after every rank is done); COMPLETE last.
    env.barrier()
    del model, step_module, optimizer, scheduler
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return env.on_main(lambda: _finish(cfg, out, state, tokenizer, lora is not None, best_metric if eval_reader is not None else None,
                                       last_eval))


SHARED_CHECK_FILE = ".kdcache-shared-check"


def _check_shared_output(out: Path, token: str) -> None:
    try:
        seen = (out / SHARED_CHECK_FILE).read_text()
    except OSError:
        seen = None
    if seen != token:
        raise KdcacheError(f"{out}: this rank does not see what rank 0 wrote there; --output must be on a filesystem "
                           "every rank shares (all ranks write checkpoint shards into it)")


def _resume_hint(saved_step: int | None) -> str:
    if saved_step is None:
        return "no checkpoint was written yet: rerun the same command"
    return f"rerun the same command with --resume to continue from the checkpoint of step {saved_step}"


_LOST_PEER = re.compile(r"connection (closed|reset)|broken pipe|socket|nccl|gloo|timed? ?out|peer", re.IGNORECASE)


def _is_lost_peer(exc: BaseException) -> bool:
    """Whether a collective broke (another rank died), as gloo and NCCL report it."""
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", ())) or bool(_LOST_PEER.search(str(exc)))


def _rank_failure(env: DistEnv, message: str) -> KdcacheError:
    """This rank's own failure: one line, left for the other ranks to name too."""
    if not env.enabled:
        return KdcacheError(message)
    env.report_failure(message)
    return RankError(f"rank {env.rank}: {message}")


def teacher_chat_template(student_tokenizer, cache: str) -> str | None:
    """The chat template to export with a student that has none: the teacher's, when the
    cache's rows were rendered with it (chat or prompt/response rows), else None."""
    from kdcache.cache.manifest import load_manifest
    from kdcache.data.tokenize import chat_template_of
    from kdcache.student.compat import _teacher_tokenizer

    if chat_template_of(student_tokenizer) is not None:
        return None
    manifest = load_manifest(cache)
    if not manifest["tokenizer"].get("chat_template_sha256") or manifest["dataset"]["format"] == "text":
        return None
    teacher = _teacher_tokenizer(Path(cache), manifest)
    return getattr(teacher, "chat_template", None) if teacher is not None else None


def _finish(cfg: TrainConfig, out: Path, state: ckpt.TrainerState, tokenizer, lora: bool, best_metric: str | None,
            last_eval: dict | None) -> dict:
    """Export the final model (and adapter), draw the curves, write summary.json and, last, COMPLETE."""
    last_dir, best_dir = out / "last", out / "best"
    chosen = best_dir if (cfg.final_model == "best" and (best_dir / "eval.json").exists()) else last_dir
    save_dtype = DTYPES[cfg.save_dtype] if cfg.save_dtype != "auto" else checkpoint_dtype(cfg.student)
    template = teacher_chat_template(tokenizer, cfg.cache)
    if template is not None:
        tokenizer.chat_template = template
        _warn([f"{cfg.student} has no chat template; model/ gets the teacher's, which rendered the cache's rows"])
    if lora:
        tmp = out / f".adapter.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(chosen / "adapter", tmp)
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(tmp, out / "adapter")
        export_model(out / "adapter", out / "model", tokenizer=tokenizer, dtype=save_dtype, base=cfg.student)
    else:
        export_model(chosen / "model", out / "model", tokenizer=tokenizer, dtype=save_dtype)
    try:
        from kdcache.student.plots import plot_metrics

        plot_metrics(out / ckpt.METRICS_FILE, out / "loss_curves.png")
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
        _warn([f"could not draw loss_curves.png ({type(exc).__name__}: {exc})"])
    summary = {
        "loss": cfg.loss,
        "mix_loss": cfg.mix_loss if cfg.mix_cache else None,
        "lmbda": cfg.lmbda,
        "steps": state.step,
        "sequences": state.sequences,
        "supervised_tokens": state.tokens,
        "best_step": state.best_step,
        "best_metric": best_metric,
        "best_value": state.best_value,
        "final_model_from": chosen.name,
        "final_eval": last_eval,
        "model": str(out / "model"),
        "adapter": str(out / "adapter") if lora else None,
    }
    from kdcache.cache.manifest import write_json_atomic

    write_json_atomic(out / "summary.json", summary)
    (out / ckpt.COMPLETE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return summary


def config_fields() -> list[str]:
    """Names of :class:`TrainConfig` fields (= the CLI's option names)."""
    return [f.name for f in fields(TrainConfig)]
