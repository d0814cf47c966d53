"""``kdcache eval --generate``: a model answers held-out prompts, the teacher scores the answers.

Three steps, each the project's own API: :func:`kdcache.rollout.run.run_rollout` samples
from the model, :func:`kdcache.teacher.generate.generate_teacher_cache` scores the samples
(a top-1 cache: only the teacher's log-prob of each sampled token is needed), and the
cache is read back. Metrics, over the response tokens ``x`` of every sample:

* ``rkl``: ``mean(log mu(x) - log p(x))``, the sampled-token estimate of the per-token reverse
  KL ``KL(mu || p)`` from the model's sampling distribution ``mu`` (its own distribution at
  ``--temperature 1 --top-p 1``) to the teacher ``p``, given the model's own prefixes: the
  quantity on-policy distillation minimizes. Unbiased for that KL (one sample per position,
  so it can be negative on a few tokens; its mean is not).
* ``rkl_seq``: ``mean over responses of sum_t (log mu(x_t) - log p(x_t))``, the estimate of
  the sequence-level ``KL(mu(y) || p(y))`` in nats per response.
* ``teacher_ce`` (``-mean log p(x)``: how likely the teacher finds the model's tokens) and
  ``model_ce`` (``-mean log mu(x)``, an estimate of the sampling distribution's entropy per
  token); ``rkl = teacher_ce - model_ce``.
* ``rouge_l``: ROUGE-L F1 in ``[0, 1]`` between each response and its prompt row's reference
  response, averaged over the responses whose row has one (``rouge_rows``); Google's
  ``rouge-score`` package with the Porter stemmer, MiniLLM's metric (Gu et al., 2024, who
  report it x100).
* ``len_mean``, ``len_median``, ``len_max`` (response tokens), ``stop_frac`` (share of
  responses that ended at EOS rather than at ``--max-new-tokens``), ``responses``,
  ``prompts``, ``tokens``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError

METRIC_ORDER = ("rkl", "rkl_seq", "teacher_ce", "model_ce", "rouge_l", "rouge_rows", "len_mean", "len_median",
                "len_max", "stop_frac", "responses", "prompts", "tokens")
_COUNTS = ("rouge_rows", "len_max", "responses", "prompts", "tokens")


def rouge_l(references: list[str], predictions: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (``rouge-score``, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions)]


def generation_metrics(rollout_dir: str | Path, cache_dir: str | Path) -> dict[str, float | int]:
    """The metrics (module docstring) of a finished rollout and the teacher's cache of it."""
    from kdcache.cache.reader import CacheReader
    from kdcache.data import open_dataset

    reader = CacheReader(cache_dir)
    rollout = (reader.manifest["dataset"] or {}).get("rollout")
    if rollout is None:
        raise KdcacheError(f"{cache_dir}: not a cache of a kdcache rollout (no dataset.rollout in its manifest)")
    gaps, teacher, model, per_seq = [], [], [], []
    for seq in reader.iter_sequences():
        if seq.rollout_logprobs is None:
            raise KdcacheError(f"{cache_dir}: sequence {seq.seq_id} has no rollout log-probs; regenerate the cache")
        gap = seq.rollout_logprobs.astype(np.float64) - seq.target_logprobs
        gaps.append(gap)
        teacher.append(-seq.target_logprobs.astype(np.float64))
        model.append(-seq.rollout_logprobs.astype(np.float64))
        per_seq.append(gap.sum())
    references, responses, lengths, stops = [], [], [], []
    dataset = open_dataset(rollout_dir)
    prompts = set()
    for _, source, row in dataset.rows():
        prompts.add(row["prompt_seq_id"])
        lengths.append(len(row["response_ids"]))
        stops.append(row["finish_reason"] == "stop")
        if row.get("reference"):
            references.append(row["reference"])
            responses.append(row["response"])
    tokens = int(sum(len(g) for g in gaps))
    if tokens == 0:
        raise KdcacheError(f"{cache_dir}: no response tokens to evaluate")
    out: dict[str, float | int] = {
        "rkl": float(np.concatenate(gaps).mean()),
        "rkl_seq": float(np.mean(per_seq)),
        "teacher_ce": float(np.concatenate(teacher).mean()),
        "model_ce": float(np.concatenate(model).mean()),
    }
    if references:
        out["rouge_l"] = float(np.mean(rouge_l(references, responses)))
        out["rouge_rows"] = len(references)
    out.update(len_mean=float(np.mean(lengths)), len_median=float(np.median(lengths)), len_max=int(max(lengths)),
               stop_frac=float(np.mean(stops)), responses=len(lengths), prompts=len(prompts), tokens=tokens)
    return out


def evaluate_generations(
    model: str,
    prompts: str,
    teacher: str,
    *,
    work_dir: str | Path | None = None,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    max_length: int = 2048,
    seed: int = 0,
    max_prompts: int | None = None,
    data_format: str | None = None,
    split: str = "train",
    backend: str = "auto",
    dtype: str = "auto",
    teacher_backend: str = "auto",
    teacher_dtype: str = "auto",
    engine_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Sample from ``model`` on ``prompts``, score the samples with ``teacher``, return the metrics.

    Args:
        model: the model to evaluate (HF directory or LoRA adapter directory).
        prompts: held-out prompt dataset (any format ``kdcache rollout`` reads; rows with a
            response give ROUGE-L references).
        teacher: as for ``generate-teacher --teacher``; must share the model's tokenizer.
        work_dir: keep the rollout (``work_dir/rollout``) and its cache (``work_dir/cache``)
            there; a rerun with the same settings reuses them (resumable). None: a temporary
            directory, deleted afterwards.
        samples_per_prompt, temperature, top_p, max_new_tokens, max_length, seed,
        max_prompts, data_format, split: the rollout's settings (``kdcache rollout``).
        backend, dtype, engine_options: the model's engine; ``teacher_backend``,
            ``teacher_dtype``: the teacher's (``generate-teacher --backend/--dtype``).

    Raises:
        KdcacheError: from any of the three steps, one line naming the input at fault.
    """
    from kdcache.rollout.run import RolloutConfig, run_rollout
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache

    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="kdcache-eval-")) if temporary else Path(work_dir)
    try:
        rollout_dir, cache_dir = work / "rollout", work / "cache"
        run_rollout(RolloutConfig(
            student=model, dataset=prompts, output=str(rollout_dir), samples_per_prompt=samples_per_prompt,
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, max_length=max_length, seed=seed,
            max_prompts=max_prompts, data_format=data_format, split=split, backend=backend, dtype=dtype,
            progress=progress, **(engine_options or {}),
        ))
        generate_teacher_cache(GenerateConfig(
            teacher=teacher, dataset=str(rollout_dir), output=str(cache_dir), backend=teacher_backend,
            dtype=teacher_dtype, top_k=1, sampling="none", max_length=max_length, progress=progress,
        ))
        return generation_metrics(rollout_dir, cache_dir)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def format_metrics(metrics: dict[str, float | int]) -> str:
    """Two-column table in a fixed order."""
    lines = []
    for key in METRIC_ORDER:
        if key in metrics:
            value = metrics[key]
            text = f"{int(value)}" if key in _COUNTS else f"{value:.6g}"
            lines.append(f"{key:<12} {text:>14}")
    return "\n".join(lines)
