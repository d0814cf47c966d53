"""Evaluate a student against a cache: KL to the teacher, CE and perplexity on gold tokens.

Metrics (means over the cache's supervised tokens):

* ``kl``: ``KL(P || Q)`` between the teacher's and the student's (k+1)-outcome distributions
  (the top-k ids plus one bucket for everything else), the quantity the default ``tail``
  loss minimizes; a lower bound of the full-vocabulary KL. Needs a top-k cache.
* ``ce`` / ``ppl``: the student's cross-entropy on the gold tokens and ``exp(ce)``.
* ``teacher_ce`` / ``teacher_ppl``: the same for the teacher (from the cached log-probs).
* ``top1_agree``: fraction of positions where the student's argmax is the teacher's top-1.
* ``loss``: the training objective (``--loss`` with its parameters and ``--ce-weight``),
  when a loss configuration is given and the cache has what it needs. For the sample losses
  (``tail_rs``, ``rs_kd``) it is a sample estimate biased upward at small N, not a KL; for
  ``sampled_rkl`` (on a cache of rollout samples) the importance-weighted objective, whose
  gradient is what estimates the reverse KL's.
* ``rs_kl``: with ``rs_kd``, its estimate of the full-vocabulary KL.
* ``tokens`` / ``sequences``: how much was evaluated.

Logits are computed a chunk of positions at a time (never for a whole micro-batch).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdcache.cache.reader import CacheReader
from kdcache.errors import KdcacheError
from kdcache.student.chunked import choose_chunk_size, head_inputs
from kdcache.student.data import iter_eval_batches, padding_micro_batch
from kdcache.student.losses import (
    KDLossConfig,
    StudentLogProbs,
    forward_kl,
    kd_per_token,
    sample_neg_entropy,
)
from kdcache.student.modeling import StudentStep, causal_lm, decoder_body, lm_head_params

if TYPE_CHECKING:
    from kdcache.student.distributed import DistEnv

METRIC_ORDER = ("loss", "kl", "ce", "ppl", "top1_agree", "teacher_ce", "teacher_ppl", "rs_kl", "tokens", "sequences")

EVAL_CHUNK_BYTES = 256 * 2**20


def _student_logprobs(z: torch.Tensor, mb_targets, gold: torch.Tensor, need_tail: bool, need_samples: bool) -> StudentLogProbs:
    """Gather student log-probs from float32 logits ``z`` ``[C, V]`` (no autograd)."""
    lse = torch.logsumexp(z, dim=-1)
    out = StudentLogProbs(gold=z.gather(1, gold[:, None])[:, 0] - lse)
    if mb_targets.topk_ids is not None:
        out.topk = z.gather(1, mb_targets.topk_ids) - lse[:, None]
    if need_samples:
        out.samples = z.gather(1, mb_targets.sample_ids.clamp(min=0)) - lse[:, None]
    if need_tail and mb_targets.topk_ids is not None:
        z.scatter_(1, mb_targets.topk_ids, float("-inf"))
        out.tail = torch.logsumexp(z, dim=-1) - lse
    return out


def _micro_batch_sums(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, *, mb, top_k: int,
    with_samples: bool, want_loss: bool, loss_config: KDLossConfig | None, sums: dict[str, float],
) -> None:
    """Add one micro-batch's metric sums to ``sums``; logits a chunk of positions at a time."""
    chunk = choose_chunk_size(weight.shape[0], EVAL_CHUNK_BYTES)
    hidden, _, _ = head_inputs(hidden, weight, bias, scale, None)  # logits in the head's own dtype
    for start in range(0, mb.num_targets, chunk):
        stop = min(mb.num_targets, start + chunk)
        targets = mb.targets.rows(start, stop)
        gold = mb.gold_ids[start:stop]
        z = torch.nn.functional.linear(hidden[start:stop], weight, bias).float()
        top1 = z.argmax(dim=-1)
        student = _student_logprobs(z, targets, gold, top_k > 0, with_samples)
        sums["ce"] += float(-student.gold.sum())
        if top_k > 0:
            t = torch.cat([targets.topk_logprobs, targets.tail_logmass[:, None]], dim=-1)
            s = torch.cat([student.topk, student.tail[:, None]], dim=-1)
            sums["kl"] += float(forward_kl(t, s).sum())
            sums["top1"] += float((top1 == targets.topk_ids[:, 0]).sum())
        if want_loss:
            kd = float(kd_per_token(student, targets, loss_config).sum())
            sums["loss"] += (1 - loss_config.ce_weight) * kd + loss_config.ce_weight * float(-student.gold.sum())
            if loss_config.loss == "rs_kd":
                sums["rs_kl"] += kd + float(sample_neg_entropy(targets.sample_weights).sum())
        del z


def loss_available(loss_config: KDLossConfig | None, reader: CacheReader) -> tuple[bool, bool]:
    """``(loss computable, with samples)``: whether ``reader``'s cache holds what the loss needs
    (samples of its kind for rs_kd/tail_rs, a rollout's log-probs for sampled_rkl, else a top-k)."""
    from kdcache.rollout.provenance import cache_rollout

    if loss_config is None:
        return False, False
    if loss_config.needs_samples:
        with_samples = reader.sampling_mode == loss_config.sampling_mode
        return with_samples, with_samples
    if loss_config.needs_rollout:
        return cache_rollout(reader.manifest) is not None, False
    return reader.top_k > 0, False


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cache: CacheReader | str | Path,
    *,
    micro_batch_tokens: int = 8192,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    loss_config: KDLossConfig | None = None,
    max_sequences: int | None = None,
    progress: bool = False,
    env: DistEnv | None = None,
) -> dict[str, float | int]:
    """Metrics of ``model`` on ``cache`` (see the module docstring); restores train mode after.

    Args:
        model: a transformers causal LM or a peft model wrapping one, or a
            :class:`~kdcache.student.modeling.StudentStep` (sharded with FSDP2 or wrapped in DDP
            in a distributed run).
        cache: a :class:`CacheReader` or a cache directory.
        micro_batch_tokens: tokens per packed forward pass.
        device: where the model is (default: its parameters' device).
        autocast_dtype: run the decoder body under autocast in this dtype.
        attn_implementation: the model's attention implementation (default: from its config).
        loss_config: also report ``loss``, the objective of this configuration.
        max_sequences: evaluate only the first ``max_sequences`` sequences.
        env: in a distributed run, each rank evaluates every ``world_size``-th sequence and the
            sums and counts are all-reduced, so every rank returns the metrics of the whole cache.
    """
    from tqdm.auto import tqdm

    from kdcache.student.distributed import DistEnv as _DistEnv, is_fsdp, lockstep, reshard

    env = env or _DistEnv()
    reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
    step = model if hasattr(model, "module") or isinstance(model, StudentStep) else StudentStep(model)
    inner = getattr(step, "module", step).model
    device = device or next(inner.parameters()).device
    attn = attn_implementation or getattr(causal_lm(inner).config, "_attn_implementation", "sdpa") or "sdpa"
    want_loss, with_samples = loss_available(loss_config, reader)
    with_rollout = want_loss and loss_config.needs_rollout
    mask_dtype = autocast_dtype or decoder_body(inner).get_input_embeddings().weight.dtype
    sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "top1": 0.0, "teacher_ce": 0.0, "rs_kl": 0.0}
    tokens = sequences = 0
    was_training = step.training
    step.eval()
    total = min(len(reader), max_sequences) if max_sequences is not None else len(reader)
    bar = tqdm(total=total, unit="seq", desc="eval", disable=not progress, leave=False, dynamic_ncols=True)
    batches = iter_eval_batches(reader, micro_batch_tokens, with_samples, max_sequences,
                                rank=env.rank, world_size=env.world_size, with_rollout=with_rollout)
    try:
        for mb, real in lockstep(batches, env, padding_micro_batch(reader.top_k, with_samples, with_rollout)):
            mb = mb.to(device)
            head = functools.partial(_micro_batch_sums, mb=mb, top_k=reader.top_k, with_samples=with_samples,
                                     want_loss=want_loss, loss_config=loss_config, sums=sums)
            step(mb, head, attn, mask_dtype, autocast_dtype)
            if real:
                sums["teacher_ce"] += float(-mb.teacher_logprobs.sum())
                tokens += mb.num_targets
                sequences += len(mb.seq_lengths)
                bar.update(len(mb.seq_lengths))
    except torch.OutOfMemoryError:
        raise KdcacheError(
            f"out of memory during evaluation (micro-batch of {micro_batch_tokens} tokens); "
            "lower --micro-batch-tokens"
        ) from None
    finally:
        bar.close()
        step.train(was_training)
        if is_fsdp(step):
            reshard(step)
    if env.enabled:
        keys = sorted(sums)
        reduced = env.sum([sums[k] for k in keys] + [tokens, sequences])
        sums = dict(zip(keys, reduced))
        tokens, sequences = int(round(reduced[-2])), int(round(reduced[-1]))
    if tokens == 0:
        raise KdcacheError(f"{reader.path}: no supervised tokens to evaluate")
    out: dict[str, float | int] = {}
    if want_loss:
        out["loss"] = sums["loss"] / tokens
    if reader.top_k > 0:
        out["kl"] = sums["kl"] / tokens
    out["ce"] = sums["ce"] / tokens
    out["ppl"] = math.exp(min(out["ce"], 700.0))
    if reader.top_k > 0:
        out["top1_agree"] = sums["top1"] / tokens
    out["teacher_ce"] = sums["teacher_ce"] / tokens
    out["teacher_ppl"] = math.exp(min(out["teacher_ce"], 700.0))
    if want_loss and loss_config.loss == "rs_kd":
        out["rs_kl"] = sums["rs_kl"] / tokens
    out["tokens"] = int(tokens)
    out["sequences"] = int(sequences)
    return out


def evaluate_model(
    model: str | Path,
    cache: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    autocast: str = "auto",
    attn_implementation: str = "auto",
    micro_batch_tokens: int = 8192,
    loss_config: KDLossConfig | None = None,
    max_sequences: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Load ``model`` (HF directory, hub id, or a peft adapter directory), check it against
    ``cache`` and return :func:`evaluate`'s metrics."""
    from kdcache.student.compat import check_output_rows, check_tokenizer, load_tokenizer
    from kdcache.student.modeling import (
        adapter_base,
        is_adapter_dir,
        load_student,
        resolve_attn_implementation,
        resolve_device,
        resolve_precision,
    )

    reader = CacheReader(cache)
    torch_device = resolve_device(device)
    adapter = model if is_adapter_dir(model) else None
    base = adapter_base(model) if adapter else model
    tokenizer = load_tokenizer(model if adapter and (Path(model) / "tokenizer_config.json").exists() else base)
    for warning in check_tokenizer(tokenizer, reader.manifest, cache, str(model)):
        import logging

        logging.getLogger("kdcache").warning(warning)
    weights, amp = resolve_precision(dtype, autocast, torch_device, lora=False)
    if dtype == "auto":
        from kdcache.student.modeling import checkpoint_dtype

        weights = checkpoint_dtype(base)
        if torch_device.type == "cpu" and weights in (torch.float16, torch.bfloat16):
            weights = torch.float32
    attn = resolve_attn_implementation(attn_implementation, torch_device)
    lora = None
    if adapter:
        from kdcache.student.modeling import LoraSettings

        lora = LoraSettings(r=1, alpha=1, dropout=0.0)  # settings come from the adapter itself
    net = load_student(base, device=torch_device, dtype=weights, attn_implementation=attn, lora=lora,
                       adapter=adapter, trainable=False)
    check_output_rows(int(lm_head_params(net)[0].shape[0]), reader.manifest, str(model))
    return evaluate(
        net, reader, micro_batch_tokens=micro_batch_tokens, device=torch_device, autocast_dtype=amp,
        attn_implementation=attn, loss_config=loss_config, max_sequences=max_sequences, progress=progress,
    )


def format_metrics(metrics: dict[str, float]) -> str:
    """Two-column table of the metrics in a fixed order."""
    lines = []
    for key in METRIC_ORDER:
        if key in metrics:
            value = metrics[key]
            text = f"{int(value)}" if key in ("tokens", "sequences") else f"{value:.6g}"
            lines.append(f"{key:<12} {text:>14}")
    return "\n".join(lines)
