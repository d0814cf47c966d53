"""Hyper-parameters shared by every arm, and the two scale presets.

All arms -- the in-benchmark references and the ``kdcache train-student`` cache arms -- get the
same values: one epoch over the same budget-limited training file (a prefix of the seeded,
source-balanced shuffle of :mod:`benchmarks.quality.data`), visited in ``kdcache
train-student``'s seeded order for the arm's seed (the references reproduce it, see
:func:`benchmarks.quality.tokens.stage_two_order`; the seed changes only this order and, for
random-sampling caches, the draws: the init is the pruned teacher and Llama has no dropout),
``rows_per_step`` rows per optimizer step (``--global-batch-size``), micro-batches of at most ``micro_batch_tokens``
tokens, AdamW with betas (0.9, 0.999) and eps 1e-8 (``train-student``'s fixed values), linear
warmup over ``round(warmup_ratio * steps)`` steps, then cosine decay to ``min_lr_ratio * lr``
(``train-student``'s :func:`~kdcache.student.train.lr_multiplier`, re-implemented), gradient
clipping at ``max_grad_norm``, float32 weights (optionally bf16 autocast), and a loss averaged
over the supervised tokens of the whole optimizer step. How a step is split into micro-batches
does not change the result beyond float rounding (the loss is normalized by the step's token
count), so the references pad rows where ``train-student`` packs them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class TrainHParams:
    """Optimizer, schedule and batching. Units: tokens are supervised (target) tokens unless
    named ``padded``; ``micro_batch_tokens`` counts padded tokens (rows x longest row)."""

    train_tokens: int
    max_length: int = 256
    rows_per_step: int = 8
    micro_batch_tokens: int = 2048
    lr: float = 3e-4
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # "float32", or "bfloat16" = autocast with float32 master weights

    def to_dict(self) -> dict:
        return asdict(self)

    def warmup_steps(self, total_steps: int) -> int:
        return int(round(self.warmup_ratio * total_steps))

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based)."""
        warmup = self.warmup_steps(total_steps)
        if step < warmup:  # warmup == 0: no warmup
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


@dataclass(frozen=True)
class Scale:
    """A benchmark size: training and evaluation budgets plus the hyper-parameters."""

    name: str
    hparams: TrainHParams
    eval_text_tokens: int  # held-out text tokens for the final metrics
    eval_chat_tokens: int  # held-out chat (response) tokens for the final metrics
    curve_tokens: int  # held-out text tokens for the loss-vs-tokens curve
    curve_points: int  # evaluations during training (plus one before the first step)
    eval_batch_tokens: int  # padded tokens per evaluation forward
    logit_chunk: int  # positions per full-vocabulary logits chunk
    cache_dtype: str = "float32"  # teacher dtype for generate-teacher (the metric teacher: float32 weights)
    seeds: tuple[int, ...] = (0, 1)


SCALES: dict[str, Scale] = {
    "cpu": Scale(
        name="cpu",
        hparams=TrainHParams(train_tokens=10_000, rows_per_step=4, micro_batch_tokens=2048, lr=1e-3),
        eval_text_tokens=4_000,
        eval_chat_tokens=1_500,
        curve_tokens=1_000,
        curve_points=4,
        eval_batch_tokens=2048,
        logit_chunk=512,
    ),
    "gpu": Scale(
        name="gpu",
        hparams=TrainHParams(
            train_tokens=2_000_000, rows_per_step=64, micro_batch_tokens=16_384, lr=6e-4, dtype="bfloat16"
        ),
        eval_text_tokens=100_000,
        eval_chat_tokens=30_000,
        curve_tokens=20_000,
        curve_points=8,
        eval_batch_tokens=16_384,
        logit_chunk=4096,
        cache_dtype="bfloat16",
    ),
}


def scale_with(scale: Scale, **overrides) -> Scale:
    """``scale`` with hyper-parameter overrides (keys of :class:`TrainHParams`; None = keep)."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(scale, hparams=replace(scale.hparams, **changes)) if changes else scale
