"""Sparse knowledge-distillation losses against a cache of teacher top-k / samples.

Notation (per supervised position; ``T`` positions are already gathered and flattened):

* ``K`` = the teacher's cached top-k ids (``k`` unique, valid ids per row).
* Teacher: ``p_i = exp(topk_logprobs[i])`` for ``i`` in ``K`` and the tail mass
  ``p_tail = exp(tail_logmass) = 1 - sum_K p_i`` (``tail_logmass`` may be ``-inf``).
* Student: ``q = softmax(z)`` over its *full* output rows (padded vocab rows beyond the
  tokenizer included: they are ordinary softmax outcomes and land in the tail bucket).
  ``q_i`` at the ids in ``K`` and ``q_tail = 1 - sum_K q_i``.

Coarse-grained ("k+1 outcome") distributions
--------------------------------------------
Every loss except ``topk_renorm`` and ``rs_kd`` compares the *exact* (k+1)-outcome
distributions ``P = (p_K, p_tail)`` and ``Q = (q_K, q_tail)``. Merging outcomes never
increases an f-divergence, so these are lower bounds of the full-vocabulary divergences,
and they are exact when ``k`` equals the vocabulary. ``tail`` is the default name and is
identical to ``forward_kl``:

* ``tail`` / ``forward_kl``: ``KL(P || Q) = sum P (log P - log Q)``.
* ``reverse_kl``: ``KL(Q || P)``.
* ``jsd``: generalized JSD in TRL's GKD convention: with ``M = beta P + (1 - beta) Q``,
  ``JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)`` for ``0 < beta < 1``;
  ``beta = 0`` is *defined* as ``KL(P || Q)`` and ``beta = 1`` as ``KL(Q || P)``
  (the mixture formula itself tends to ``beta * KL(P || Q)`` as ``beta -> 0``, so the
  value is discontinuous in scale at the end points, as in TRL).
* ``skew_forward`` (DistiLLM SKL): ``KL(P || alpha P + (1 - alpha) Q)``.
* ``skew_reverse`` (DistiLLM SRKL): ``KL(Q || (1 - alpha) P + alpha Q)``.
  ``alpha = 0`` gives forward / reverse KL.
* ``tv``: total variation ``0.5 sum |P - Q|``.
* ``akl`` (Adaptive KL, Wu et al. 2024): sort the k+1 outcomes by teacher probability
  (descending); the *head* is every outcome whose inclusive cumulative teacher mass is
  ``<= mu`` plus always the first one, the rest is the *tail part*.
  ``g_head = sum_head |P - Q|``, ``g_tail = sum_rest |P - Q|`` (student side detached,
  as published), ``AKL = g_head / (g_head + g_tail) KL(P||Q) + g_tail / (g_head + g_tail)
  KL(Q||P)``. The tail bucket takes part in the sort as one outcome.

Other losses
------------
* ``topk_renorm`` (DistillKit / Axolotl style, for comparison only): renormalize the
  teacher top-k to sum to 1 and the student over the same ids, forward KL. It is biased:
  it ignores the tail mass on both sides, so the student can move probability into or
  out of the tail without any change in the loss.
* ``rs_kd`` (Random-Sampling KD, Anshumann et al., ACL 2025): with ``N`` tokens drawn
  from the teacher (temperature 1) and ``w_i = count_i / N`` for the unique sampled ids,
  the loss is ``-sum_i w_i log q_i`` with the student's *full* softmax ``q``. Because
  ``E[w_i] = p_i`` this is an unbiased estimate of the cross-entropy ``CE(p, q) =
  H(p) + KL(p || q)``, so its gradient is an unbiased estimate of ``grad KL(p || q)``.
  ``H(p)`` is unknown from samples; the metric ``rs_kl`` reports
  ``KL(w || q) = sum_i w_i log w_i - sum_i w_i log q_i`` (same gradient; it is >= 0, but
  as an estimate of ``KL(p || q)`` it is biased upward by ``H(p) - E[H(w)] >= 0``).
* ``tail_rs`` (top-k + tail bucket + tail samples; needs a ``--sampling tail`` cache,
  whose ``N`` draws per position come from the teacher restricted to the ids outside
  ``K``, ``w_j = count_j / N``): the exact identity
  ``KL(p || q) = KL(P || Q) + p_tail KL(p_tail-shape || q_tail-shape)``, with the
  teacher's tail shape ``p_j / p_tail`` replaced by ``w``:
  ``KL(P || Q) + p_tail * sum_j w_j (log w_j - log(q_j / q_tail))``. Since
  ``E[w_j] = p_j / p_tail``, its gradient is an unbiased estimate of the gradient of the
  full-vocabulary ``KL(p || q)``, with the top-k part exact (no sampling noise where
  most of the mass is). ``sum w log w`` is a constant that keeps the value ``>= 0``; the
  value is biased upward like ``rs_kl``. With exact weights it *is* the full KL.

On-policy: the sampled-token reverse KL (``sampled_rkl``)
--------------------------------------------------------
For a cache of ``kdcache rollout`` samples (format v3), where each gold token ``x`` is a
token the student sampled at a position, with prefix ``c`` (prompt and earlier sampled
tokens) fixed. Per such token, with the student's current log-prob ``log q(x) =
log q_theta(x | c)`` (full softmax, temperature 1), the teacher's cached ``log p(x)``
(``TeacherScores.target_logprobs``: the gold token of a rollout cache is the sampled one)
and the rollout's ``log mu(x)`` (``rollout_logprobs``: the distribution the token was drawn
from, i.e. the student of the previous round after the rollout's temperature and top-p):

    A = log p(x) - log q(x)              advantage, held constant (no gradient through A)
    r = exp(log q(x) - log mu(x))        importance weight, differentiable through log q(x)
    L = -min(r A, clip(r, 1 - eps, 1 + eps) A)                     (PPO; eps = ``clip_ratio``)

and the loss is ``sum L / num_tokens`` (``clip_ratio=None``: ``L = -r A``, plain importance
sampling as in the Tinker cookbook's default). Gradient: ``dL/dlog q(x) = -r A`` where the
token is not clipped, ``0`` where it is (``A > 0`` and ``r > 1 + eps``, or ``A < 0`` and
``r < 1 - eps``), so only the student's log-prob of the gold token carries gradient, which
:mod:`kdcache.student.chunked` turns into logit gradients in closed form like every other
loss. The value of ``L`` at ``r = 1`` is ``log q(x) - log p(x)``: the single-sample estimate
of the per-token reverse KL; the ``rkl`` metric reports it (mean over tokens, no weights)
and ``clip_frac`` the share of clipped tokens.

Properties. ``grad KL(q || p) = E_{x~q}[(log q(x) - log p(x)) grad log q(x)]`` over one
position's next token (the ``E[grad log q] = 0`` term drops), so at ``r = 1`` (``mu = q``)
the gradient of ``L`` is a single-sample score-function (REINFORCE) estimate of the
gradient of the position's reverse KL, unbiased given the prefix; with ``mu != q`` the
weight ``r`` keeps it unbiased as long as ``mu > 0`` wherever ``q > 0`` (top-p < 1 breaks
that: tokens outside the rollout's nucleus are never seen). The weight is per token: it
corrects the token's own sampling distribution, not the probability of the prefix (the
product of all earlier ratios would, at a variance that grows with the length), as in PPO.
The advantage is *per token* (discount 0), as in the Tinker cookbook's on-policy
distillation: the sum over a response is an unbiased gradient of
``sum_t KL(q(.|c_t) || p(.|c_t))`` with the prefixes' distribution held fixed, which is
what GKD (Agarwal et al., 2024) also optimizes on student samples; it ignores how a token
changes the prefixes the student visits later. The *per-sequence* reverse KL
``KL(q(y) || p(y))`` of whole responses has the gradient with the reward-to-go advantage
``A_t = -sum_{t' >= t} (log q(x_t') - log p(x_t'))`` (MiniLLM, Gu et al., 2024): unbiased
for the sequence-level objective, but its variance grows with the response length; the
per-token form trades that bias for far less variance. Clipping (Schulman et al., 2017)
bounds how far one round's updates move a token's probability from the rollout policy
(the rollout policy is one round old); it biases the estimate wherever it acts and does
nothing while ``r`` stays in ``[1 - eps, 1 + eps]``. For ``A < 0`` and large ``r`` the
clipped objective is unbounded (as in PPO; dual clipping would bound it). Next to the
divergences above on the rollout's top-k (GKD with ``lambda = 1``), this estimator needs
only the teacher's log-prob of the sampled token, but is noisier: one sample per position
instead of a (k+1)-outcome expectation. Quantization of ``log mu`` (at most 0.00195 nats for
``mu >= 1e-4``) moves ``r`` by at most 0.2%. The Qwen3 technical report (2025) finishes its
small models with on-policy distillation (student samples, teacher log-probs).

Temperature ``tau``
-------------------
The cache holds temperature-1 log-probs. For ``tau != 1`` each side's (k+1)-vector of
log-probs ``x`` is tempered as ``log_softmax(x / tau)``: every top-k outcome gets its
exact tempered logit (``log p_i / tau`` up to a constant) and the tail bucket is treated
*as if it were a single token* with log-mass ``tail_logmass / tau``. The exact tempered
tail would need the individual tail logits (``sum_j p_j^(1/tau)``), which the cache does
not hold; the single-token rule underestimates the tail for ``tau > 1`` and
overestimates it for ``tau < 1``. The same rule is applied to the student, so ``tau = 1``
is exact, and when ``k`` equals the vocabulary the rule is exact for every ``tau``.
The divergence is multiplied by ``tau**2`` (Hinton et al.). ``topk_renorm`` tempers its
renormalized top-k exactly (same formula over ``k`` outcomes). ``rs_kd`` requires
``tau == 1`` (samples were drawn at temperature 1). The CE term is always at ``tau = 1``.

CE mix and averaging
--------------------
``total = (1 - ce_weight) * kd + ce_weight * ce`` where ``ce = -log q(gold)`` (full
student softmax, temperature 1). torchtune's KD recipe uses
``(1 - kd_ratio) * ce + kd_ratio * kd``, i.e. ``ce_weight = 1 - kd_ratio``.
``kd`` and ``ce`` are *sums over the supervised positions divided by* ``num_tokens``,
which defaults to the positions in this call; pass the global count of supervised
tokens across all gradient-accumulation micro-batches (and ranks) so that the summed
gradients equal those of the global average.

Numerical conventions
---------------------
Log-probs of exactly zero mass (``-inf``) are handled without NaN: an outcome with zero
mass on both sides contributes exactly 0; a zero on one side only is replaced by
``LOG_ZERO`` (``log 2**-53``, about ``-36.7``: the largest tail the cache's float64
computation can round to ``-inf``). So ``reverse_kl`` with a ``-inf`` teacher tail
charges the student ``q_tail * (log q_tail - LOG_ZERO)`` instead of ``+inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_NAMES: tuple[str, ...] = (
    "tail",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward",
    "skew_reverse",
    "tv",
    "akl",
    "topk_renorm",
    "rs_kd",
    "tail_rs",
)
#: Policy-gradient losses on the student's own samples: they need a rollout cache (format v3)
#: and gold ids, and read the teacher's and the rollout's log-probs of the gold token.
POLICY_GRADIENT_LOSSES: frozenset[str] = frozenset({"sampled_rkl"})
#: Every name :class:`KDLossConfig` accepts: ``LOSS_NAMES`` (divergences to the cached teacher
#: distributions, on any cache) and the policy-gradient losses.
ALL_LOSS_NAMES: tuple[str, ...] = LOSS_NAMES + tuple(sorted(POLICY_GRADIENT_LOSSES))
#: Losses on the (k+1)-outcome coarse distributions (they need the student tail).
COARSE_LOSSES: frozenset[str] = frozenset(LOSS_NAMES) - {"topk_renorm", "rs_kd", "tail_rs"}
#: Losses over sampled teacher tokens (the cache must hold samples of the matching kind).
SAMPLE_LOSSES: frozenset[str] = frozenset({"rs_kd", "tail_rs"})

#: Stand-in for ``log 0`` where exactly one side of an outcome has zero mass.
LOG_ZERO: float = -53.0 * math.log(2.0)


@dataclass(frozen=True)
class KDLossConfig:
    """Which KD loss to use and its parameters.

    Attributes:
        loss: one of ``LOSS_NAMES``.
        tau: distillation temperature (> 0); the KD term is multiplied by ``tau**2``.
        beta: ``jsd`` interpolation in ``[0, 1]`` (0 = forward KL, 1 = reverse KL).
        alpha: ``skew_forward`` / ``skew_reverse`` skew in ``[0, 1)``.
        akl_mu: ``akl`` head threshold on the cumulative teacher mass, in ``(0, 1)``.
        ce_weight: weight of the gold-token cross-entropy in ``[0, 1]``:
            ``total = (1 - ce_weight) * kd + ce_weight * ce``.
        clip_ratio: ``sampled_rkl``: PPO clip ``eps`` of the importance weight (``> 0``), or
            None for unclipped importance sampling.
    """

    loss: str = "tail"
    tau: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    akl_mu: float = 0.5
    ce_weight: float = 0.0
    clip_ratio: float | None = 0.2

    def __post_init__(self) -> None:
        if self.loss not in ALL_LOSS_NAMES:
            raise ValueError(f"unknown KD loss {self.loss!r}; choose one of {', '.join(ALL_LOSS_NAMES)}")
        if self.clip_ratio is not None and not self.clip_ratio > 0:
            raise ValueError(f"clip_ratio must be > 0 (or None for no clipping), got {self.clip_ratio}")
        if self.loss in POLICY_GRADIENT_LOSSES and self.tau != 1.0:
            raise ValueError(f"{self.loss} needs tau (--temperature) == 1: it weighs the student's temperature-1 "
                             "log-prob of each sampled token against the rollout's")
        if not self.tau > 0:
            raise ValueError(f"tau (--temperature) must be > 0, got {self.tau}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta (--jsd-beta) must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha (--skew-alpha) must be in [0, 1), got {self.alpha}")
        if not 0.0 < self.akl_mu < 1.0:
            raise ValueError(f"akl_mu (--akl-mu) must be in (0, 1), got {self.akl_mu}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight (--ce-weight) must be in [0, 1], got {self.ce_weight}")
        if self.loss in SAMPLE_LOSSES and self.tau != 1.0:
            way_out = ("--loss tail on this cache" if self.loss == "tail_rs"
                       else "a top-k cache (--top-k 64 --sampling none) with --loss tail")
            raise ValueError(f"{self.loss} needs tau (--temperature) == 1: the cached samples were drawn at temperature 1 "
                             f"(for another temperature use {way_out})")

    @property
    def needs_topk(self) -> bool:
        return self.loss not in ("rs_kd", *POLICY_GRADIENT_LOSSES)

    @property
    def needs_tail(self) -> bool:
        return self.loss in COARSE_LOSSES or self.loss == "tail_rs"

    @property
    def needs_samples(self) -> bool:
        return self.loss in SAMPLE_LOSSES

    @property
    def needs_rollout(self) -> bool:
        """The loss reads the teacher's and the rollout's log-probs of the gold (sampled) token."""
        return self.loss in POLICY_GRADIENT_LOSSES

    @property
    def sampling_mode(self) -> str:
        """The cache sampling mode this loss reads: "random", "tail", or "none"."""
        return {"rs_kd": "random", "tail_rs": "tail"}.get(self.loss, "none")


@dataclass
class TeacherTargets:
    """Cached teacher targets for ``T`` supervised positions (all on one device).

    Attributes:
        topk_ids: int64 ``[T, k]`` unique, valid student-vocabulary ids per row.
        topk_logprobs: float ``[T, k]`` natural-log teacher probabilities, temperature 1.
        tail_logmass: float ``[T]`` ``log(1 - sum exp(topk_logprobs))``; may be ``-inf``.
        sample_ids: int64 ``[T, m]`` unique sampled ids, padded with ``-1``.
        sample_weights: float ``[T, m]`` ``count / N``; 0 for padding.
        target_logprobs: float ``[T]`` the teacher's log-prob of the gold token
            (``TeacherScores.target_logprobs``); read by ``sampled_rkl``.
        rollout_logprobs: float ``[T]`` in a rollout cache, the log-prob of the gold
            (sampled) token under the policy that sampled it; read by ``sampled_rkl``.
    """

    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    tail_logmass: Tensor | None = None
    sample_ids: Tensor | None = None
    sample_weights: Tensor | None = None
    target_logprobs: Tensor | None = None
    rollout_logprobs: Tensor | None = None

    @property
    def num_positions(self) -> int:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return int(value.shape[0])
        raise ValueError("TeacherTargets holds no tensors")

    def rows(self, start: int, stop: int) -> TeacherTargets:
        """The targets of positions ``start:stop`` (views, no copy)."""
        return TeacherTargets(**{f.name: _rows(getattr(self, f.name), start, stop) for f in fields(self)})

    def validate(self, config: KDLossConfig) -> None:
        """Raise ``ValueError`` if a tensor that ``config.loss`` needs is missing or misshaped."""
        t = self.num_positions
        if config.needs_topk:
            if self.topk_ids is None or self.topk_logprobs is None:
                raise ValueError(f"loss {config.loss!r} needs topk_ids and topk_logprobs")
            if self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[0] != t:
                raise ValueError("topk_ids and topk_logprobs must both be [T, k]")
        if config.needs_tail and (self.tail_logmass is None or tuple(self.tail_logmass.shape) != (t,)):
            raise ValueError(f"loss {config.loss!r} needs tail_logmass of shape [T]")
        if config.needs_samples:
            if self.sample_ids is None or self.sample_weights is None:
                raise ValueError(f"loss {config.loss!r} needs sample_ids and sample_weights (cache built with sampling)")
            if self.sample_ids.shape != self.sample_weights.shape or self.sample_ids.shape[0] != t:
                raise ValueError("sample_ids and sample_weights must both be [T, m]")
        if config.needs_rollout:
            for name in ("target_logprobs", "rollout_logprobs"):
                value = getattr(self, name)
                if value is None or tuple(value.shape) != (t,):
                    raise ValueError(f"loss {config.loss!r} needs {name} of shape [T] (a cache of kdcache rollout "
                                     "samples, format v3)")


@dataclass
class StudentLogProbs:
    """Student log-probs (full softmax, temperature 1) gathered at the cached ids.

    Attributes:
        topk: ``[T, k]`` at ``TeacherTargets.topk_ids``.
        tail: ``[T]`` ``log(1 - sum exp(topk))``, the log-mass outside the top-k ids.
        samples: ``[T, m]`` at ``sample_ids`` (any value at padding).
        gold: ``[T]`` at the gold next tokens.
    """

    topk: Tensor | None = None
    tail: Tensor | None = None
    samples: Tensor | None = None
    gold: Tensor | None = None


def _rows(x: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if x is None else x[start:stop]


# --------------------------------------------------------------------------- gathering


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends; ``[...] -> [...]``.

    Uses ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` below ``-log 2``. Both branches
    are evaluated on inputs that keep them finite, so gradients are never NaN.
    """
    near_zero = x > -math.log(2.0)
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def student_tail_from_topk(topk_logprobs: Tensor) -> Tensor:
    """Student tail log-mass from its log-probs at the top-k ids only; ``[T, k] -> [T]``.

    ``log(1 - exp(logsumexp(topk)))`` with ``logsumexp`` clamped to ``<= -eps`` (machine
    epsilon of the dtype): the gathered log-probs carry relative rounding of about
    ``eps``, so a smaller tail is not resolvable from them and is reported as ``log eps``
    (about -15.9 in float32) with zero gradient. Use this when only gathered log-probs are
    available; the chunked path computes the tail exactly from the logits instead.
    """
    eps = torch.finfo(topk_logprobs.dtype).eps
    lse = torch.logsumexp(topk_logprobs, dim=-1).clamp(max=-eps)
    return log1mexp(lse)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Dtype the losses are computed in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_student_logprobs(
    student_logits: Tensor,
    targets: TeacherTargets,
    gold_ids: Tensor | None,
    config: KDLossConfig,
) -> StudentLogProbs:
    """Reference gather from full logits (differentiable); ``[T, V] -> StudentLogProbs``.

    The tail is exact: ``logsumexp`` of the logits outside the top-k ids minus the
    ``logsumexp`` of all logits (no cancellation, finite unless ``k == V``).
    """
    z = student_logits.to(compute_dtype_for(student_logits.dtype))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    out = StudentLogProbs()
    if config.needs_topk:
        out.topk = z.gather(1, targets.topk_ids.long()) - lse
    if config.needs_tail:
        outside = z.scatter(1, targets.topk_ids.long(), float("-inf"))
        out.tail = torch.logsumexp(outside, dim=-1) - lse[:, 0]
    if config.needs_samples:
        out.samples = z.gather(1, targets.sample_ids.long().clamp(min=0)) - lse
    if gold_ids is not None:
        out.gold = z.gather(1, gold_ids.long()[:, None])[:, 0] - lse[:, 0]
    return out


# ------------------------------------------------------------------------- divergences


def _finite_pair(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Replace ``-inf`` log-probs by ``LOG_ZERO`` on both sides (gradient stops there)."""
    t = torch.where(t == float("-inf"), torch.full_like(t, LOG_ZERO), t)
    s = torch.where(s == float("-inf"), torch.full_like(s, LOG_ZERO), s)
    return t, s


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(A || B) = sum A (log A - log B)`` over the last axis; finite inputs; ``-> [T]``."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a * A + (1 - weight_a) * B)`` elementwise, for ``0 <= weight_a <= 1``."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(t: Tensor, s: Tensor) -> Tensor:
    """``KL(P || Q)`` from teacher / student log-probs ``[T, n]``; ``-> [T]``."""
    return _kl(*_finite_pair(t, s))


def reverse_kl(t: Tensor, s: Tensor) -> Tensor:
    """``KL(Q || P)``; ``[T, n] x [T, n] -> [T]``."""
    t, s = _finite_pair(t, s)
    return _kl(s, t)


def generalized_jsd(t: Tensor, s: Tensor, beta: float) -> Tensor:
    """TRL-GKD generalized JSD (see module docstring); ``-> [T]``."""
    t, s = _finite_pair(t, s)
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    m = _log_mix(t, s, beta)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def skew_forward_kl(t: Tensor, s: Tensor, alpha: float) -> Tensor:
    """DistiLLM SKL ``KL(P || alpha P + (1 - alpha) Q)``; ``-> [T]``."""
    t, s = _finite_pair(t, s)
    return _kl(t, _log_mix(t, s, alpha))


def skew_reverse_kl(t: Tensor, s: Tensor, alpha: float) -> Tensor:
    """DistiLLM SRKL ``KL(Q || (1 - alpha) P + alpha Q)``; ``-> [T]``."""
    t, s = _finite_pair(t, s)
    return _kl(s, _log_mix(s, t, alpha))


def total_variation(t: Tensor, s: Tensor) -> Tensor:
    """``0.5 * sum |P - Q|``; ``-> [T]``."""
    t, s = _finite_pair(t, s)
    return 0.5 * (t.exp() - s.exp()).abs().sum(dim=-1)


def adaptive_kl(t: Tensor, s: Tensor, mu: float) -> Tensor:
    """Adaptive KL (Wu et al. 2024) with detached head/tail weights; ``-> [T]``."""
    t, s = _finite_pair(t, s)
    with torch.no_grad():
        p_sorted, order = t.exp().sort(dim=-1, descending=True)
        gaps = (p_sorted - s.exp().gather(-1, order)).abs()
        in_head = p_sorted.cumsum(dim=-1) <= mu
        in_head[..., 0] = True
        g_head = (gaps * in_head).sum(dim=-1)
        g_tail = (gaps * ~in_head).sum(dim=-1)
        # p == q exactly gives 0/0; both KLs are 0 there, so any finite weights do.
        total = (g_head + g_tail).clamp(min=torch.finfo(gaps.dtype).tiny)
        w_head, w_tail = g_head / total, g_tail / total
    return w_head * _kl(t, s) + w_tail * _kl(s, t)


def temper(logprobs: Tensor, tau: float) -> Tensor:
    """Temper a normalized log-prob vector as ``log_softmax(x / tau)``; ``[T, n] -> [T, n]``.

    Applied to a (k+1)-vector this treats the tail bucket as one token (module docstring).
    """
    if tau == 1.0:
        return logprobs
    return F.log_softmax(logprobs / tau, dim=-1)


def coarse_divergence(t: Tensor, s: Tensor, config: KDLossConfig) -> Tensor:
    """The divergence ``config.loss`` between coarse log-prob vectors ``[T, n]``; ``-> [T]``.

    No temperature handling here: pass tempered vectors.
    """
    name = config.loss
    if name in ("tail", "forward_kl"):
        return forward_kl(t, s)
    if name == "reverse_kl":
        return reverse_kl(t, s)
    if name == "jsd":
        return generalized_jsd(t, s, config.beta)
    if name == "skew_forward":
        return skew_forward_kl(t, s, config.alpha)
    if name == "skew_reverse":
        return skew_reverse_kl(t, s, config.alpha)
    if name == "tv":
        return total_variation(t, s)
    if name == "akl":
        return adaptive_kl(t, s, config.akl_mu)
    raise ValueError(f"{name!r} is not a coarse-distribution loss")


# ----------------------------------------------------------------- per-token KD losses


def rs_kd_cross_entropy(sample_logprobs: Tensor, sample_weights: Tensor) -> Tensor:
    """``-sum_i w_i log q_i`` over the samples; ``[T, m] x [T, m] -> [T]`` (padding w=0)."""
    w = sample_weights.to(sample_logprobs.dtype)
    terms = torch.where(w > 0, w * sample_logprobs, torch.zeros_like(sample_logprobs))
    return -terms.sum(dim=-1)


def sample_neg_entropy(sample_weights: Tensor) -> Tensor:
    """``sum_i w_i log w_i`` (minus the empirical entropy); ``[T, m] -> [T]``."""
    return torch.special.xlogy(sample_weights, sample_weights).sum(dim=-1)


def tail_sample_kl(
    teacher_tail: Tensor, student_tail: Tensor, sample_logprobs: Tensor, sample_weights: Tensor
) -> Tensor:
    """``p_tail * sum_j w_j (log w_j - log(q_j / q_tail))``: the tail term of ``tail_rs``.

    Args:
        teacher_tail: ``[T]`` teacher tail log-mass ``log p_tail`` (may be ``-inf``).
        student_tail: ``[T]`` student tail log-mass ``log q_tail``.
        sample_logprobs: ``[T, m]`` student log-probs ``log q_j`` at the tail samples.
        sample_weights: ``[T, m]`` ``count / N`` (0 for padding; all 0 where nothing was drawn).

    Returns ``[T]``, ``>= 0``.
    """
    w = sample_weights.to(sample_logprobs.dtype)
    shape = sample_logprobs - student_tail[:, None]  # log of the student's tail shape at the samples
    terms = torch.where(w > 0, torch.special.xlogy(w, w) - w * shape, torch.zeros_like(shape))
    p_tail = teacher_tail.to(shape.dtype).exp()
    return p_tail * terms.sum(dim=-1)


def sampled_rkl_terms(
    gold_logprobs: Tensor, teacher_logprobs: Tensor, rollout_logprobs: Tensor, clip_ratio: float | None
) -> tuple[Tensor, Tensor]:
    """Per-token ``sampled_rkl`` loss and clip mask (module docstring); ``[T] x3 -> ([T], bool [T])``.

    Args:
        gold_logprobs: ``log q(x)``, the student's current log-prob of each sampled token
            (differentiable; its dtype is the computation's).
        teacher_logprobs: ``log p(x)`` from the cache.
        rollout_logprobs: ``log mu(x)``, the sampling policy's, from the cache.
        clip_ratio: PPO ``eps``, or None for no clipping.

    Returns ``(L, clipped)``: ``L = -r A`` where the token is not clipped and the constant
    ``-clip(r) A`` where it is (zero gradient), which equals ``-min(r A, clip(r) A)``.
    """
    dtype = gold_logprobs.dtype
    advantage = (teacher_logprobs.to(dtype) - gold_logprobs).detach()
    ratio = torch.exp(gold_logprobs - rollout_logprobs.to(dtype))
    loss = -ratio * advantage
    if clip_ratio is None:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    r = ratio.detach()
    clipped = ((advantage > 0) & (r > 1 + clip_ratio)) | ((advantage < 0) & (r < 1 - clip_ratio))
    bounded = -r.clamp(1 - clip_ratio, 1 + clip_ratio) * advantage
    return torch.where(clipped, bounded, loss), clipped


def policy_sums(student: StudentLogProbs, targets: TeacherTargets, config: KDLossConfig) -> Tensor:
    """``[sum (log q(x) - log p(x)), clipped tokens]`` (detached) for ``sampled_rkl``: the
    ``rkl`` and ``clip_frac`` metrics before averaging."""
    gold = student.gold.detach()
    _, clipped = sampled_rkl_terms(gold, targets.target_logprobs, targets.rollout_logprobs, config.clip_ratio)
    rkl = (gold - targets.target_logprobs.to(gold.dtype)).sum()
    return torch.stack([rkl, clipped.sum().to(gold.dtype)])


def kd_per_token(student: StudentLogProbs, targets: TeacherTargets, config: KDLossConfig) -> Tensor:
    """KD loss per position, already multiplied by ``tau**2``; ``-> [T]``.

    This is the production core: it needs only the student's log-probs at the cached ids
    (plus its tail log-mass for the coarse losses, its gold log-prob for ``sampled_rkl``),
    never full-vocabulary tensors.
    Computed in the dtype of ``student``'s tensors; teacher tensors are cast to it.
    """
    if config.needs_rollout:
        if student.gold is None:
            raise ValueError(f"loss {config.loss!r} needs gold_ids (the sampled tokens)")
        return sampled_rkl_terms(student.gold, targets.target_logprobs, targets.rollout_logprobs, config.clip_ratio)[0]
    if config.loss == "rs_kd":
        return rs_kd_cross_entropy(student.samples, targets.sample_weights)
    dtype = student.topk.dtype
    t_topk = targets.topk_logprobs.to(dtype)
    if config.loss == "topk_renorm":
        t = F.log_softmax(t_topk / config.tau, dim=-1)
        s = F.log_softmax(student.topk / config.tau, dim=-1)
        kd = forward_kl(t, s)
    else:
        s_tail = student.tail if student.tail is not None else student_tail_from_topk(student.topk)
        t = temper(torch.cat([t_topk, targets.tail_logmass.to(dtype)[:, None]], dim=-1), config.tau)
        s = temper(torch.cat([student.topk, s_tail[:, None]], dim=-1), config.tau)
        if config.loss == "tail_rs":
            kd = forward_kl(t, s) + tail_sample_kl(targets.tail_logmass, s_tail, student.samples, targets.sample_weights)
        else:
            kd = coarse_divergence(t, s, config)
    return kd * config.tau**2


def combine(kd_sum: Tensor, ce_sum: Tensor | None, config: KDLossConfig, denominator: float) -> Tensor:
    """``((1 - ce_weight) * kd_sum + ce_weight * ce_sum) / denominator`` (scalar)."""
    total = (1.0 - config.ce_weight) * kd_sum
    if config.ce_weight > 0:
        if ce_sum is None:
            raise ValueError("ce_weight > 0 needs gold_ids")
        total = total + config.ce_weight * ce_sum
    return total / denominator


def resolve_denominator(num_positions: int, num_tokens: float | int | Tensor | None) -> float:
    """The averaging denominator: ``num_tokens`` if given (must be > 0), else ``max(T, 1)``."""
    if num_tokens is None:
        return float(max(num_positions, 1))
    value = float(num_tokens)
    if not value > 0:
        raise ValueError(f"num_tokens must be > 0, got {value}")
    return value


def sparse_kd_loss(
    student_logits: Tensor,
    targets: TeacherTargets,
    gold_ids: Tensor | None = None,
    config: KDLossConfig = KDLossConfig(),
    num_tokens: float | int | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Reference KD loss from full student logits (differentiable through autograd).

    Args:
        student_logits: ``[T, V]`` logits at the supervised positions (any float dtype;
            computed in float32, or float64 for float64 input).
        targets: the cached teacher targets for the same ``T`` positions.
        gold_ids: int64 ``[T]`` gold next tokens; needed when ``ce_weight > 0``,
            otherwise only used for the ``ce`` metric.
        config: loss selection and parameters.
        num_tokens: averaging denominator (global supervised-token count); default ``T``.

    Returns:
        ``(loss, metrics)``: the scalar ``(1 - w) kd + w ce`` and detached floats
        ``loss``, ``kd``, ``ce`` (NaN without gold ids), ``n_tokens`` (= ``T``), for
        ``rs_kd`` also ``rs_kl``, for ``sampled_rkl`` also ``rkl`` and ``clip_frac``; all
        use the same denominator.
    """
    targets.validate(config)
    if config.needs_rollout and gold_ids is None:
        raise ValueError(f"loss {config.loss!r} needs gold_ids (the sampled tokens)")
    student = gather_student_logprobs(student_logits, targets, gold_ids, config)
    kd_sum = kd_per_token(student, targets, config).sum()
    ce_sum = None if student.gold is None else -student.gold.sum()
    denominator = resolve_denominator(student_logits.shape[0], num_tokens)
    loss = combine(kd_sum, ce_sum, config, denominator)
    rs_kl_sum = None
    if config.loss == "rs_kd":
        rs_kl_sum = kd_sum.detach() + sample_neg_entropy(targets.sample_weights.to(kd_sum.dtype)).sum()
    policy = policy_sums(student, targets, config) if config.needs_rollout else None
    return loss, metrics_dict(loss, kd_sum, ce_sum, rs_kl_sum, denominator, student_logits.shape[0], policy)


def metrics_dict(
    loss: Tensor,
    kd_sum: Tensor,
    ce_sum: Tensor | None,
    rs_kl_sum: Tensor | None,
    denominator: float,
    n_tokens: int,
    policy: Tensor | None = None,
) -> dict[str, float]:
    """Detached float metrics with one device sync (``policy``: :func:`policy_sums`)."""
    nan = torch.full((), float("nan"), dtype=kd_sum.dtype, device=kd_sum.device)
    stacked = torch.stack(
        [
            loss.detach().to(kd_sum.dtype),
            kd_sum.detach() / denominator,
            (ce_sum.detach() / denominator) if ce_sum is not None else nan,
            (rs_kl_sum.detach() / denominator) if rs_kl_sum is not None else nan,
            *((policy.detach().to(kd_sum.dtype) / denominator).unbind() if policy is not None else (nan, nan)),
        ]
    ).tolist()
    out = {"loss": stacked[0], "kd": stacked[1], "ce": stacked[2], "n_tokens": float(n_tokens)}
    if rs_kl_sum is not None:
        out["rs_kl"] = stacked[3]
    if policy is not None:
        out["rkl"], out["clip_frac"] = stacked[4], stacked[5]
    return out

