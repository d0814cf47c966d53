"""KD loss straight from final hidden states, in chunks of positions.

The student's full-vocabulary logits for a micro-batch (``T x V`` floats, e.g.
8188 x 151936 x 4 bytes = 5 GB) are never materialized at once. For each chunk of ``C``
positions the forward pass computes

    z        = h @ W^T (+ b)          [C, V] in the weight's dtype (bf16 GEMMs accumulate
                                      in fp32); everything after is float32 (float64 for
                                      float64 weights),
    z_x      at the ids the loss needs (top-k, samples, gold), gathered first,
    z[top-k] = -inf                   (in place; only for the losses with a tail bucket),
    r        = softmax(z)             one fused kernel, upcast to float32,
    lse_rest = max z - log r[argmax]  logsumexp outside the top-k (``r[argmax] >= 1/V``),
    lse      = logaddexp(lse_rest, logsumexp(z_topk)),
    s_x      = z_x - lse,  s_tail = lse_rest - lse   (exact tail, no cancellation),

evaluates the loss of ``kdcache.student.losses`` on the small ``[C, k+1]`` tensors,
and immediately turns it into ``dL/dz`` with the closed form below, written in place
into the ``r`` buffer. The gradients ``dL/dh = dL/dz @ W`` and ``dL/dW += dL/dz^T @ h``
are accumulated during the forward pass (weight gradient in float32 for bf16/fp16
weights), so ``backward`` only rescales them: the logits are computed once, not twice.

Closed form of the logit gradient: the loss depends on ``z`` only through the gathered
log-probs ``s_x = z_x - lse`` (ids ``x``) and ``s_tail = lse_rest - lse``, with upstream
gradients ``g_x`` and ``g_tail`` (from autograd on the small tensors). With
``G = sum_x g_x + g_tail``, ``q_j = exp(z_j - lse)`` and ``r_j = exp(z_j - lse_rest)``
for ``j`` outside the top-k (``r_j = 0`` inside):

    dL/dz_j = sum_{x = j} g_x + r_j g_tail - G q_j
            = sum_{x = j} g_x + r_j (g_tail - G q_tail)    for j outside the top-k
            = sum_{x = j} g_x - G q_j                      for j in the top-k.

Losses without a tail bucket (``topk_renorm``, ``rs_kd``) use ``r = q`` over all rows.

Padded vocabulary rows of the student (``V`` larger than the tokenizer, as in Qwen2.5)
are ordinary softmax outcomes: they share the normalizer and belong to the tail bucket.

Memory: the peak extra is about ``C * V * 6`` bytes for bf16 weights (bf16 logits and
the float32 ``r``, alive together for one softmax) plus the float32 weight-gradient
accumulator (``V * H * 4`` bytes) and one ``[V, H]`` GEMM output per chunk. The default
``C`` keeps the float32 ``r`` buffer within ``DEFAULT_MAX_CHUNK_BYTES``.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.student.losses import (
    KDLossConfig,
    StudentLogProbs,
    TeacherTargets,
    combine,
    compute_dtype_for,
    kd_per_token,
    metrics_dict,
    policy_sums,
    resolve_denominator,
    sample_neg_entropy,
)

#: Default budget for one chunk's float32 ``[C, V]`` buffer (the peak is about 1.5x this).
# 1 GiB: on an H100 (Qwen2.5-1.5B shapes, 8k positions) 5 chunks ran 0.996x the SFT step time
# against 1.009x for 10 chunks of 512 MiB, with the same peak under gradient checkpointing.
DEFAULT_MAX_CHUNK_BYTES: int = 1 << 30

_NEG_INF = float("-inf")


def choose_chunk_size(vocab_size: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, itemsize: int = 4) -> int:
    """Positions per chunk so that a ``[C, V]`` buffer of ``itemsize`` bytes fits the budget."""
    return max(1, int(max_chunk_bytes) // (int(vocab_size) * int(itemsize)))


def _gather_raw(
    logits: Tensor, targets: TeacherTargets, gold_ids: Tensor | None, config: KDLossConfig, dtype: torch.dtype
) -> StudentLogProbs:
    """Raw logits (not yet normalized) at the ids the loss needs, as ``dtype``."""
    raw = StudentLogProbs()
    if config.needs_topk:
        raw.topk = logits.gather(1, targets.topk_ids).to(dtype)
    if config.needs_samples:
        raw.samples = logits.gather(1, targets.sample_ids.clamp(min=0)).to(dtype)
    if gold_ids is not None:
        raw.gold = logits.gather(1, gold_ids[:, None])[:, 0].to(dtype)
    return raw


def _softmax_and_lse(logits: Tensor, dtype: torch.dtype, empty: bool) -> tuple[Tensor, Tensor]:
    """``softmax(logits)`` as ``dtype`` and its ``logsumexp``; ``[C, V] -> ([C, V], [C])``.

    One fused softmax kernel plus a max, instead of a separate ``logsumexp`` (which takes
    several passes over ``[C, V]``): ``lse = max - log(softmax at the argmax)``, where the
    softmax value is at least ``1 / V``, so no precision is lost. ``empty`` (every row is
    all ``-inf``, i.e. the top-k covers the vocabulary) gives zeros and ``-inf``.
    """
    rows = logits.shape[0]
    if empty:
        lse = torch.full((rows,), _NEG_INF, dtype=dtype, device=logits.device)
        return torch.zeros(logits.shape, dtype=dtype, device=logits.device), lse
    top, arg = logits.max(dim=-1)
    probs = torch.softmax(logits, dim=-1, dtype=dtype)
    lse = top.to(dtype) - probs.gather(1, arg[:, None])[:, 0].log()
    return probs, lse


def _student_logprobs(raw: StudentLogProbs, lse_rest: Tensor, tail: bool) -> StudentLogProbs:
    """Normalize the gathered logits.

    With ``tail``, ``lse_rest`` is the ``logsumexp`` outside the top-k ids and the full
    normalizer is ``logaddexp(lse_rest, logsumexp(topk logits))`` (exact, no cancellation);
    the tail log-mass is ``lse_rest - lse``. Without, ``lse_rest`` is the full normalizer.
    """
    lse = torch.logaddexp(lse_rest, torch.logsumexp(raw.topk, dim=-1)) if tail else lse_rest
    return StudentLogProbs(
        topk=None if raw.topk is None else raw.topk - lse[:, None],
        tail=lse_rest - lse if tail else None,
        samples=None if raw.samples is None else raw.samples - lse[:, None],
        gold=None if raw.gold is None else raw.gold - lse,
    )


def _logit_grad(
    probs: Tensor,
    student: StudentLogProbs,
    grads: StudentLogProbs,
    targets: TeacherTargets,
    gold_ids: Tensor | None,
) -> Tensor:
    """``dL/dz`` ``[C, V]`` written in place into ``probs``.

    ``probs`` is the softmax over the logits outside the top-k when the loss uses the
    tail (``student.tail`` set; zero at the top-k ids), else over all logits.
    """
    total = torch.zeros_like(probs[:, 0])
    for f in fields(grads):
        g = getattr(grads, f.name)
        if g is not None:
            total = total + (g.sum(dim=-1) if g.dim() == 2 else g)
    if student.tail is not None:
        g_tail = grads.tail if grads.tail is not None else torch.zeros_like(total)
        probs.mul_((g_tail - total * student.tail.detach().exp())[:, None])
        probs.scatter_(1, targets.topk_ids, -total[:, None] * student.topk.detach().exp())
    else:
        probs.mul_(-total[:, None])
    if grads.topk is not None:
        probs.scatter_add_(1, targets.topk_ids, grads.topk)
    if grads.samples is not None:
        valid = targets.sample_ids >= 0
        g = torch.where(valid, grads.samples, torch.zeros_like(grads.samples))
        probs.scatter_add_(1, targets.sample_ids.clamp(min=0), g)
    if grads.gold is not None:
        probs.scatter_add_(1, gold_ids[:, None], grads.gold[:, None])
    return probs


def _chunk(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: TeacherTargets,
    gold_ids: Tensor | None,
    config: KDLossConfig,
    denominator: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Loss sums and logit gradient for one chunk of ``C`` positions.

    Returns ``(stats, grad_z)``: ``stats`` = ``[kd_sum, ce_sum, rs_kl_sum, rkl_sum, clipped]``
    (float, detached; ``kd_sum`` includes ``tau**2``; the last two for ``sampled_rkl``, see
    :func:`kdcache.student.losses.policy_sums`) and ``grad_z`` ``[C, V]`` of the *averaged*
    objective (already divided by ``denominator``), or None when ``need_grad`` is False.
    """
    cdt = compute_dtype_for(weight.dtype)
    logits = F.linear(h, weight, bias)  # [C, V] in the weight dtype
    raw = _gather_raw(logits, targets, gold_ids, config, cdt)
    tail = config.needs_tail
    if tail:
        logits.scatter_(1, targets.topk_ids, _NEG_INF)  # keep only the logits outside the top-k
    probs, lse_rest = _softmax_and_lse(logits, cdt, empty=tail and targets.topk_ids.shape[1] >= logits.shape[1])
    del logits
    student = _student_logprobs(raw, lse_rest, tail)
    names = [f.name for f in fields(student) if getattr(student, f.name) is not None]
    with torch.enable_grad():
        for name in names:
            getattr(student, name).requires_grad_(need_grad)
        kd_sum = kd_per_token(student, targets, config).sum()
        ce_sum = None if student.gold is None else -student.gold.sum()
        objective = combine(kd_sum, ce_sum, config, denominator)
        grads = StudentLogProbs()
        if need_grad:
            leaves = [getattr(student, n) for n in names]
            for name, g in zip(names, torch.autograd.grad(objective, leaves, allow_unused=True)):
                setattr(grads, name, g)
    zero = torch.zeros((), dtype=cdt, device=h.device)
    rs_kl = zero
    if config.loss == "rs_kd":
        rs_kl = kd_sum.detach() + sample_neg_entropy(targets.sample_weights.to(cdt)).sum()
    policy = policy_sums(student, targets, config) if config.needs_rollout else torch.zeros(2, dtype=cdt, device=h.device)
    stats = torch.cat([torch.stack([kd_sum.detach(), zero if ce_sum is None else ce_sum.detach(), rs_kl]), policy])
    if not need_grad:
        return stats, None
    return stats, _logit_grad(probs, student, grads, targets, gold_ids)


def _run(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: TeacherTargets,
    gold_ids: Tensor | None,
    config: KDLossConfig,
    chunk_size: int,
    denominator: float,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Loop over chunks; returns ``(loss, stats [3], (grad_hidden, grad_weight, grad_bias))``."""
    num_pos, _ = hidden.shape
    device = hidden.device
    need_h, need_w, need_b = need
    need_b = need_b and bias is not None
    # On CUDA, cuBLAS's addmm_ accumulates each chunk's product in fp32 before one rounding
    # to the weight dtype, so a bf16 accumulator loses ~one bf16 rounding per chunk while
    # saving a [V, H] fp32 buffer and its extra read/write per chunk. Elsewhere keep fp32.
    low_precision = weight.dtype in (torch.float16, torch.bfloat16)
    acc = torch.float32 if low_precision and device.type != "cuda" else weight.dtype
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=device) if need_b else None
    stats = torch.zeros(5, dtype=compute_dtype_for(weight.dtype), device=device)
    any_grad = need_h or need_w or need_b
    with torch.autocast(device_type=device.type, enabled=False):
        for start in range(0, num_pos, chunk_size):
            stop = min(num_pos, start + chunk_size)
            h = hidden[start:stop]
            gold = None if gold_ids is None else gold_ids[start:stop]
            chunk_stats, grad_z = _chunk(
                h, weight, bias, targets.rows(start, stop), gold, config, denominator, any_grad
            )
            stats += chunk_stats
            if grad_z is None:
                continue
            grad_z = grad_z.to(weight.dtype)
            if need_h:
                torch.mm(grad_z, weight, out=grad_h[start:stop])
            if need_w:
                if acc == weight.dtype:
                    grad_w.addmm_(grad_z.T, h)
                else:
                    grad_w += grad_z.T @ h
            if need_b:
                grad_b += grad_z.sum(dim=0, dtype=acc)
            del grad_z
    ce_sum = stats[1] if gold_ids is not None else None
    loss = combine(stats[0], ce_sum, config, denominator)
    grads = (
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
    return loss, stats, grads


class _ChunkedKDFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward, ``backward`` rescales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: TeacherTargets,
        gold_ids: Tensor | None,
        config: KDLossConfig,
        chunk_size: int,
        denominator: float,
    ) -> tuple[Tensor, Tensor]:
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        loss, stats, grads = _run(hidden, weight, bias, targets, gold_ids, config, chunk_size, denominator, need)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):  # type: ignore[override]
        grads = ctx.saved_tensors
        # Skip the multiply (and a [V, H] copy) in the usual loss.backward() case.
        if not bool(grad_loss.ne(1).item()):
            out = grads
        else:
            out = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*out, None, None, None, None, None)


def head_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
                amp: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden, weight, bias)`` in one dtype for the chunked loss.

    Under autocast, float32 head weights are cast (differentiably) to the autocast dtype, as
    autocast would do for the lm_head matmul; the loss itself is computed in float32.
    """
    if amp is not None and weight.dtype == torch.float32:
        weight = weight.to(amp)
        bias = None if bias is None else bias.to(amp)
    hidden = hidden.to(weight.dtype)
    if scale != 1.0:
        hidden = hidden * scale
    return hidden, weight, bias


def _as_index(x: Tensor | None) -> Tensor | None:
    return x if x is None or x.dtype == torch.int64 else x.long()


def chunked_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: TeacherTargets,
    gold_ids: Tensor | None = None,
    config: KDLossConfig = KDLossConfig(),
    *,
    bias: Tensor | None = None,
    num_tokens: float | int | Tensor | None = None,
    chunk_size: int | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[Tensor, dict[str, float]]:
    """KD (+ CE) loss from final hidden states without full-vocabulary logits for all rows.

    Args:
        hidden: ``[T, H]`` final hidden states (after the final norm) at the supervised
            positions, i.e. the rows whose logits predict the cached targets.
        weight: ``[V, H]`` lm_head weight (tied embeddings are fine); same dtype as
            ``hidden``. ``V`` may exceed the tokenizer (padded rows join the softmax).
        targets: teacher targets for the same ``T`` positions (``TeacherTargets``).
        gold_ids: int ``[T]`` gold next tokens; required when ``config.ce_weight > 0``,
            otherwise used only for the ``ce`` metric.
        config: loss selection and parameters (``KDLossConfig``).
        bias: optional ``[V]`` lm_head bias.
        num_tokens: averaging denominator (global supervised-token count across
            gradient-accumulation steps / ranks); default ``T``.
        chunk_size: positions per chunk; default from ``max_chunk_bytes``.
        max_chunk_bytes: budget for one chunk's float32 ``[C, V]`` logits buffer.

    Returns:
        ``(loss, metrics)``: scalar float32 loss (float64 for float64 input) equal to
        ``sparse_kd_loss(hidden @ weight.T + bias, ...)``, differentiable wrt ``hidden``,
        ``weight`` and ``bias`` (first-order only), and detached floats ``loss``, ``kd``,
        ``ce`` (NaN without gold ids), ``n_tokens`` (= ``T``), for ``rs_kd`` ``rs_kl``, for
        ``sampled_rkl`` ``rkl`` and ``clip_frac`` (that loss needs ``gold_ids`` and the
        targets' ``target_logprobs`` and ``rollout_logprobs``).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    targets = TeacherTargets(
        topk_ids=_as_index(targets.topk_ids),
        topk_logprobs=targets.topk_logprobs,
        tail_logmass=targets.tail_logmass,
        sample_ids=_as_index(targets.sample_ids),
        sample_weights=targets.sample_weights,
        target_logprobs=targets.target_logprobs,
        rollout_logprobs=targets.rollout_logprobs,
    )
    num_pos = hidden.shape[0]
    if num_pos:
        targets.validate(config)
    gold_ids = _as_index(gold_ids)
    if config.ce_weight > 0 and gold_ids is None:
        raise ValueError("ce_weight > 0 needs gold_ids")
    if config.needs_rollout and gold_ids is None:
        raise ValueError(f"loss {config.loss!r} needs gold_ids (the sampled tokens)")
    denominator = resolve_denominator(num_pos, num_tokens)
    cdt = compute_dtype_for(weight.dtype)
    chunk = int(chunk_size) if chunk_size else choose_chunk_size(weight.shape[0], max_chunk_bytes, cdt.itemsize)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        loss, stats = _ChunkedKDFunction.apply(hidden, weight, bias, targets, gold_ids, config, chunk, denominator)
    else:
        loss, stats, _ = _run(hidden, weight, bias, targets, gold_ids, config, chunk, denominator, (False,) * 3)
    ce_sum = stats[1] if gold_ids is not None else None
    rs_kl_sum = stats[2] if config.loss == "rs_kd" else None
    policy = stats[3:5] if config.needs_rollout else None
    return loss, metrics_dict(loss, stats[0], ce_sum, rs_kl_sum, denominator, num_pos, policy)
