"""Held-out metrics against the real teacher: exact, over the full vocabulary, streamed in chunks.

Per supervised position (target token ``y``, teacher ``p``, student ``q``, both full softmaxes
over the models' output rows, temperature 1, float32 log-softmax, sums in float64):

* ``ce``  -- gold-token cross-entropy ``-log q(y)`` in nats, averaged over positions.
* ``kl``  -- ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats, averaged over positions.
* ``ece`` -- expected calibration error of the student's top-1 prediction: positions are binned
  by confidence ``max_v q_v`` into 15 equal-width bins over [0, 1] (a confidence of exactly 1
  goes to the last bin); ``ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|``, where
  accuracy is the share of positions whose ``argmax q`` equals ``y``.
* ``top1`` -- that accuracy over all positions.

Storage and the headline number:

* bytes per supervised token of a cache = ``manifest["totals"]["bytes"] /
  manifest["totals"]["supervised_tokens"]``.
* gap closed = ``(CE_sft - CE_arm) / (CE_sft - CE_online)``: 0 for plain SFT, 1 for online
  full-vocabulary KD (the reference), can leave [0, 1].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from benchmarks.quality.modeling import autocast, head_logprobs, selected_hidden
from benchmarks.quality.tokens import Example, collate, micro_batches

ECE_BINS = 15


# --------------------------------------------------------------------------- pure arithmetic


def ece_bin_index(confidence: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Bin of each confidence in [0, 1]: ``min(floor(c * bins), bins - 1)`` (int64, same shape)."""
    return torch.clamp((confidence.double() * bins).floor().long(), 0, bins - 1)


def expected_calibration_error(confidence: Sequence[float] | np.ndarray | torch.Tensor,
                               correct: Sequence[bool] | np.ndarray | torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE of top-1 predictions (see the module docstring) from per-position arrays [N]."""
    acc = CalibrationBins(bins)
    acc.add(torch.as_tensor(np.asarray(confidence), dtype=torch.float64),
            torch.as_tensor(np.asarray(correct), dtype=torch.bool))
    return acc.ece()


def gap_closed(ce_sft: float, ce_arm: float, ce_online: float) -> float:
    """``(CE_sft - CE_arm) / (CE_sft - CE_online)``; NaN if the references are equal."""
    denominator = ce_sft - ce_online
    if denominator == 0 or not math.isfinite(denominator):
        return float("nan")
    return (ce_sft - ce_arm) / denominator


def cache_bytes_per_token(cache: str | Path | Mapping) -> float:
    """``totals.bytes / totals.supervised_tokens`` of a cache manifest (a dict, a
    ``manifest.json`` path, or a cache directory)."""
    manifest = cache
    if not isinstance(cache, Mapping):
        path = Path(cache)
        manifest = json.loads((path / "manifest.json" if path.is_dir() else path).read_text())
    totals = manifest["totals"]
    return totals["bytes"] / totals["supervised_tokens"]


def full_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from log-probs ``[C, V]``: ``[C]``. Terms with ``p = 0`` count 0."""
    p = teacher_logprobs.exp()
    terms = p * (teacher_logprobs - student_logprobs)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


# --------------------------------------------------------------------------- accumulators


@dataclass
class CalibrationBins:
    """Streaming ECE: per-bin position count, confidence sum and correct count (float64)."""

    bins: int = ECE_BINS
    count: torch.Tensor = field(init=False)
    conf_sum: torch.Tensor = field(init=False)
    correct_sum: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(self.bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(self.bins, dtype=torch.float64)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add positions: ``confidence`` [N] in [0, 1], ``correct`` [N] bool."""
        confidence = confidence.detach().double().cpu()
        index = ece_bin_index(confidence, self.bins)
        self.count.index_add_(0, index, torch.ones_like(confidence))
        self.conf_sum.index_add_(0, index, confidence)
        self.correct_sum.index_add_(0, index, correct.detach().double().cpu())

    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        return float((self.correct_sum - self.conf_sum).abs().sum() / total)


@dataclass
class MetricSums:
    """Running sums for one model on one evaluation set."""

    tokens: int = 0
    ce_sum: float = 0.0
    kl_sum: float = 0.0
    top1_sum: float = 0.0
    calibration: CalibrationBins = field(default_factory=CalibrationBins)

    def add(self, student_logprobs: torch.Tensor, gold: torch.Tensor, teacher_logprobs: torch.Tensor | None) -> None:
        """One chunk: log-probs ``[C, V]`` (float32), gold ids ``[C]``."""
        self.tokens += int(gold.shape[0])
        self.ce_sum -= float(student_logprobs.gather(1, gold[:, None]).double().sum())
        if teacher_logprobs is not None:
            self.kl_sum += float(full_kl(teacher_logprobs, student_logprobs).double().sum())
        top_logprob, top_id = student_logprobs.max(dim=-1)
        correct = top_id == gold
        self.top1_sum += float(correct.double().sum())
        self.calibration.add(top_logprob.exp(), correct)

    def result(self, with_kl: bool) -> dict:
        n = max(self.tokens, 1)
        out = {"tokens": self.tokens, "ce": self.ce_sum / n, "ece": self.calibration.ece(), "top1": self.top1_sum / n}
        if with_kl:
            out["kl"] = self.kl_sum / n
        return out


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    models: Mapping[str, torch.nn.Module],
    examples: Sequence[Example],
    *,
    teacher: torch.nn.Module | None = None,
    batch_tokens: int = 2048,
    logit_chunk: int = 512,
    dtype: str = "float32",
) -> dict[str, dict]:
    """Metrics of each model in ``models`` on ``examples`` (one pass; the teacher runs once per
    batch and is shared by all models). With a teacher, the result also has ``"teacher"`` (its
    own CE/ECE/top-1, KL 0) and each model gets ``kl``; without one, only CE/ECE/top-1.

    Returns ``{name: {"tokens", "ce", "kl"?, "ece", "top1"}}``.
    """
    names = list(models)
    sums = {name: MetricSums() for name in names}
    teacher_sums = MetricSums()
    device = next(iter(models.values())).device if models else teacher.device
    for group in micro_batches(examples, batch_tokens):
        batch = collate(group).to(device)
        with autocast(device, dtype):
            t_hidden = selected_hidden(teacher, batch) if teacher is not None else None
            hidden = {name: selected_hidden(model, batch) for name, model in models.items()}
        for start in range(0, batch.num_targets, logit_chunk):
            stop = min(start + logit_chunk, batch.num_targets)
            gold = batch.gold[start:stop]
            t_logp = None
            if teacher is not None:
                with autocast(device, dtype):
                    t_logp = head_logprobs(teacher, t_hidden[start:stop])
                teacher_sums.add(t_logp, gold, t_logp)
            for name, model in models.items():
                with autocast(device, dtype):
                    s_logp = head_logprobs(model, hidden[name][start:stop])
                sums[name].add(s_logp, gold, t_logp)
    results = {name: sums[name].result(with_kl=teacher is not None) for name in names}
    if teacher is not None:
        results["teacher"] = teacher_sums.result(with_kl=True)
    return results


def evaluate_sets(
    models: Mapping[str, torch.nn.Module],
    sets: Mapping[str, Sequence[Example]],
    **kwargs,
) -> dict[str, dict[str, dict]]:
    """:func:`evaluate` on each named evaluation set: ``{model: {set: metrics}}``."""
    out: dict[str, dict[str, dict]] = {}
    for set_name, examples in sets.items():
        for model_name, metrics in evaluate(models, examples, **kwargs).items():
            out.setdefault(model_name, {})[set_name] = metrics
    return out


def standard_error(values: Iterable[float]) -> float:
    """Sample standard deviation / sqrt(n) of the finite values; NaN for fewer than two."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < 2:
        return float("nan")
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))


def mean_and_spread(values: Iterable[float]) -> tuple[float, float]:
    """Mean and half-range (0 for one value) of finite values; NaNs if none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2
