"""Stage two: train a student from a teacher cache (`kdcache train-student`).

The loop, top to bottom (:func:`train_student`):

1. check the caches against the student's tokenizer and the loss, claim ``--output``;
2. load the student (full fine-tuning, LoRA or QLoRA), build AdamW and the LR schedule;
3. on ``--resume``, restore weights, optimizer, scheduler, RNG and the data position;
4. each optimizer step takes ``--global-batch-size`` sequences, packs them into
   micro-batches of at most ``--micro-batch-tokens`` tokens and accumulates gradients;
   the loss is averaged over the *global* batch's supervised tokens, so accumulation gives
   the same gradient as one big batch;
5. every ``--eval-every`` steps: evaluate on ``--eval-cache``, keep ``best/``; every
   ``--save-every`` steps: write ``last/``;
6. at the end: export the final model (``model/``, plus ``adapter/`` for LoRA), plot the
   curves, write ``summary.json`` and, last, ``COMPLETE``.

The forward pass runs the decoder body only and hands the supervised positions' hidden
states to :func:`kdcache.student.chunked.chunked_kd_loss`, which never builds the
full-vocabulary logits of a whole micro-batch.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from kdcache.cache.reader import CacheReader
from kdcache.errors import KdcacheError
from kdcache.student import checkpoint as ckpt
from kdcache.student.chunked import chunked_kd_loss, head_inputs
from kdcache.student.compat import (
    check_loss_needs,
    check_output_rows,
    check_same_tokenizer,
    check_tokenizer,
    ignored_draws_warning,
    load_tokenizer,
    resolve_loss,
)
from kdcache.student.data import GlobalBatches, MicroBatch, micro_batches
from kdcache.student.evaluate import evaluate
from kdcache.student.losses import LOSS_NAMES, KDLossConfig
from kdcache.student.modeling import (
    LoraSettings,
    check_qlora_available,
    checkpoint_dtype,
    DTYPES,
    export_model,
    hidden_states,
    lm_head_params,
    load_student,
    resolve_attn_implementation,
    resolve_device,
    resolve_precision,
)

logger = logging.getLogger("kdcache")

#: Settings that may change between a run and its ``--resume``: they do not change the result
#: beyond float rounding (the loss is normalized by the global batch, so how the batch is split
#: into micro-batches does not matter), e.g. lower --micro-batch-tokens after running out of memory.
RESUME_FREE = frozenset({
    "output", "resume", "overwrite", "progress", "log_every", "save_every", "device",
    "micro_batch_tokens", "gradient_checkpointing", "attn_implementation", "lean_layers",
})


@dataclass
class TrainConfig:
    """Everything `kdcache train-student` takes (field names = option names).

    Units: batch sizes in sequences, ``micro_batch_tokens`` in tokens, steps are optimizer
    steps. ``lr=None`` means 2e-4 with LoRA and 2e-5 for full fine-tuning.
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

    def loss_config(self) -> KDLossConfig:
        try:
            return KDLossConfig(
                loss=self.loss, tau=self.temperature, beta=self.jsd_beta, alpha=self.skew_alpha,
                akl_mu=self.akl_mu, ce_weight=self.ce_weight,
            )
        except ValueError as exc:
            raise KdcacheError(f"loss options: {exc}") from None

    def lora_settings(self) -> LoraSettings | None:
        if not self.use_lora:
            return None
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets, self.load_in_4bit)

    def check(self) -> None:
        if self.loss != "auto" and self.loss not in LOSS_NAMES:
            raise KdcacheError(f"--loss {self.loss!r}: choose auto or one of {', '.join(LOSS_NAMES)}")
        if self.loss != "auto":
            self.loss_config()
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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not on norms and biases); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise KdcacheError("the student has no trainable parameters (check --lora-targets)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
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
    loss_config: KDLossConfig,
    runtime: Runtime,
    num_tokens: int | None = None,
) -> dict[str, float]:
    """Accumulate gradients of one global batch; returns its metrics.

    Each micro-batch's loss is a sum over its supervised tokens divided by ``num_tokens``
    (default: all supervised tokens in ``batches``), so the accumulated gradient is that of
    the mean over the global batch.
    """
    num_tokens = num_tokens or sum(mb.num_targets for mb in batches)
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    for mb in batches:
        mb = mb.to(runtime.device)
        with runtime.autocast():
            hidden = hidden_states(model, mb, runtime.attn_implementation, runtime.autocast_dtype or runtime.compute_dtype)
        weight, bias, scale = lm_head_params(model)
        h, w, b = head_inputs(hidden, weight, bias, scale, runtime.autocast_dtype)
        loss, metrics = chunked_kd_loss(h, w, mb.targets, mb.gold_ids, loss_config, bias=b, num_tokens=num_tokens)
        loss.backward()
        for key in ("loss", "kd", "ce", "rs_kl"):
            if key in metrics:
                totals[key] = totals.get(key, 0.0) + metrics[key]
    return totals


def _oom_message(cfg: TrainConfig, where: str) -> str:
    hint = f"lower --micro-batch-tokens (now {cfg.micro_batch_tokens})"
    if not cfg.lean_layers:
        hint += ", drop --no-lean-layers"
    if not cfg.gradient_checkpointing:
        hint += ", pass --gradient-checkpointing"
    if not cfg.use_lora:
        hint += ", or train LoRA adapters (--lora-r 16)"
    return f"out of GPU memory {where}; {hint}"


def run_settings(cfg: TrainConfig, reader: CacheReader, eval_reader: CacheReader | None) -> dict:
    """The settings recorded in ``run.json``; a resumed run must match them."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    settings["cache_settings_hash"] = reader.manifest["settings_hash"]
    settings["eval_cache_settings_hash"] = eval_reader.manifest["settings_hash"] if eval_reader else None
    return settings


def _best_metric(cfg: TrainConfig, loss_config: KDLossConfig, eval_reader: CacheReader) -> str:
    """The eval metric that picks ``best/``: ``--best-metric`` if the eval cache can give it.

    ``loss`` needs what the loss needs (top-k, or samples of the right kind for rs_kd and
    tail_rs); without them such a run falls back to ``kl`` with a warning. ``kl`` needs a
    top-k cache.
    """
    available = {"ce"}
    if eval_reader.top_k > 0:
        available.add("kl")
    if (eval_reader.sampling_mode == loss_config.sampling_mode) if loss_config.needs_samples else (eval_reader.top_k > 0):
        available.add("loss")
    if cfg.best_metric in available:
        return cfg.best_metric
    if cfg.best_metric == "loss" and "kl" in available:
        _warn([f"{cfg.eval_cache} has no {loss_config.sampling_mode}-sampled tokens for the {loss_config.loss} loss; "
               "best checkpoint chosen by eval kl"])
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

    ``on_step(step, record)`` is called after every optimizer step (tests use it to
    interrupt a run).
    """
    cfg.check()
    out = Path(cfg.output)

    # 1. Inputs: caches, tokenizer, compatibility. Nothing is written before these pass.
    reader = CacheReader(cfg.cache)
    cfg = replace(cfg, loss=resolve_loss(cfg.loss, reader.manifest))
    loss_config = cfg.loss_config()
    check_loss_needs(cfg.loss, reader.manifest, cfg.cache)
    draws_warning = ignored_draws_warning(cfg.loss, reader.manifest, cfg.cache)
    _warn(([draws_warning] if draws_warning else []) + cfg.ignored_options())
    eval_reader = CacheReader(cfg.eval_cache) if cfg.eval_cache else None
    best_metric = cfg.best_metric
    if eval_reader is not None:
        check_same_tokenizer(reader.manifest, eval_reader.manifest, cfg.eval_cache)
        best_metric = _best_metric(cfg, loss_config, eval_reader)
    for cache_reader in (reader, eval_reader):
        if cache_reader is not None:
            check_micro_batch_fits(cache_reader, cfg.micro_batch_tokens)
    tokenizer = load_tokenizer(cfg.student)
    _warn(check_tokenizer(tokenizer, reader.manifest, cfg.cache, cfg.student))

    device = resolve_device(cfg.device)
    weight_dtype, amp = resolve_precision(cfg.dtype, cfg.autocast, device, cfg.use_lora)
    if weight_dtype == torch.float16 and amp is None and not cfg.use_lora:
        raise KdcacheError("full fine-tuning in float16 without loss scaling is unstable; use --dtype bfloat16 or float32")
    if cfg.load_in_4bit:
        check_qlora_available(device)
    compute_dtype = weight_dtype
    if cfg.load_in_4bit and weight_dtype == torch.float32:
        compute_dtype = torch.bfloat16  # load_student's bnb_4bit_compute_dtype
    runtime = Runtime(device, amp, resolve_attn_implementation(cfg.attn_implementation, device), compute_dtype)

    resuming = ckpt.claim_output(out, run_settings(cfg, reader, eval_reader), resume=cfg.resume, overwrite=cfg.overwrite)
    last_dir, best_dir = out / "last", out / "best"
    ckpt.recover(last_dir)
    ckpt.recover(best_dir)
    resuming = resuming and (last_dir / "trainer_state.json").exists()

    # 2. Model, optimizer, schedule.
    ckpt.seed_everything(cfg.seed)
    lora = cfg.lora_settings()
    source = last_dir / "model" if (resuming and lora is None) else cfg.student
    try:
        model = load_student(
            source, device=device, dtype=weight_dtype, attn_implementation=runtime.attn_implementation, lora=lora,
            gradient_checkpointing=cfg.gradient_checkpointing, lean_layers=cfg.lean_layers, adapter=(last_dir / "adapter") if (resuming and lora) else None,
        )
    except torch.OutOfMemoryError:
        raise KdcacheError(_oom_message(cfg, "while loading the student")) from None
    check_output_rows(int(lm_head_params(model)[0].shape[0]), reader.manifest, cfg.student)
    model.train()
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, device)
    steps_per_epoch = math.ceil(len(reader) / cfg.global_batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, cfg.lr_scheduler, cfg.min_lr_ratio)
    )

    # 3. Resume.
    state = ckpt.TrainerState()
    if resuming:
        state = ckpt.load_training_state(last_dir, optimizer, scheduler)
        best_json = best_dir / "eval.json"
        if best_json.exists() and ckpt.load_json_quiet(best_json).get("step", 0) > state.step:
            shutil.rmtree(best_dir)  # saved by the interrupted part of the run, after last/
    log = ckpt.MetricsLog(out / ckpt.METRICS_FILE, keep_until_step=state.step if resuming else None)
    batches = GlobalBatches(reader, cfg.global_batch_size, cfg.seed, state.position, cfg.shuffle_window, cfg.shuffle)

    # 4. The loop.
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state.step, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    start_time = time.perf_counter()
    last_eval: dict | None = None
    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            seqs, epoch = next(batches)
            micro = micro_batches(seqs, cfg.micro_batch_tokens, reader.top_k, reader.num_samples, loss_config.needs_samples)
            num_tokens = sum(mb.num_targets for mb in micro)
            try:
                metrics = forward_backward(model, micro, loss_config, runtime, num_tokens)
            except torch.OutOfMemoryError:
                raise KdcacheError(_oom_message(cfg, f"at step {state.step + 1}")) from None
            params = [p for group in optimizer.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.position = batches.position
            state.sequences += len(seqs)
            state.tokens += num_tokens
            elapsed = time.perf_counter() - t0
            record = {
                "type": "train", "step": state.step, "epoch": epoch, "lr": lr, **metrics,
                "grad_norm": float(grad_norm), "sequences": len(seqs), "tokens": num_tokens,
                "micro_batches": len(micro), "tokens_per_s": sum(mb.num_tokens for mb in micro) / max(elapsed, 1e-9),
                "elapsed_s": time.perf_counter() - start_time,
            }
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                log.write(record)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

            improved = False
            if eval_reader is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == total_steps):
                last_eval = evaluate(
                    model, eval_reader, micro_batch_tokens=cfg.micro_batch_tokens, device=device, autocast_dtype=amp,
                    attn_implementation=runtime.attn_implementation, loss_config=loss_config,
                    max_sequences=cfg.eval_sequences,
                )
                log.write({"type": "eval", "step": state.step, **{f"eval_{k}": v for k, v in last_eval.items()}})
                value = last_eval[best_metric]
                if state.best_value is None or value < state.best_value:
                    state.best_value, state.best_step, improved = value, state.step, True
                    ckpt.save_best(best_dir, model=model, tokenizer=tokenizer, lora=lora is not None,
                                   metrics={"step": state.step, "metric": best_metric, **last_eval})
            if improved or state.step == total_steps or (cfg.save_every and state.step % cfg.save_every == 0):
                ckpt.save_checkpoint(last_dir, model=model, tokenizer=tokenizer, lora=lora is not None,
                                     optimizer=optimizer, scheduler=scheduler, state=state)
            if on_step is not None:
                on_step(state.step, record)
    except torch.OutOfMemoryError:
        raise KdcacheError(_oom_message(cfg, f"at step {state.step + 1}")) from None
    finally:
        bar.close()

    # 5. Final model, plots, summary; COMPLETE last.
    del model, optimizer, scheduler
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    chosen = best_dir if (cfg.final_model == "best" and (best_dir / "eval.json").exists()) else last_dir
    save_dtype = DTYPES[cfg.save_dtype] if cfg.save_dtype != "auto" else checkpoint_dtype(cfg.student)
    if lora is not None:
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
        "steps": state.step,
        "sequences": state.sequences,
        "supervised_tokens": state.tokens,
        "best_step": state.best_step,
        "best_metric": best_metric if eval_reader is not None else None,
        "best_value": state.best_value,
        "final_model_from": chosen.name,
        "final_eval": last_eval,
        "model": str(out / "model"),
        "adapter": str(out / "adapter") if lora is not None else None,
    }
    from kdcache.cache.manifest import write_json_atomic

    write_json_atomic(out / "summary.json", summary)
    (out / ckpt.COMPLETE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return summary


def config_fields() -> list[str]:
    """Names of :class:`TrainConfig` fields (= the CLI's option names)."""
    return [f.name for f in fields(TrainConfig)]
