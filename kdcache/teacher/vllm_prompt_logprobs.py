"""Teacher scoring through vLLM's prompt log-probabilities: the fallback path.

Used when the installed vLLM is outside the range the in-engine statistics path
(:mod:`kdcache.teacher.vllm_backend`) is tested on. Costs: the tail log-mass is ``log(1 - sum(top-k))`` from float32 log-probs (about
2.6e-3 nats off when the tail is near 2e-5), and runs that draw tokens need whole vocabulary
rows on the host (``benchmarks/bench_full_rows.py``: 749 tokens/s per core for a 49k
vocabulary, 241 for 152k), which are then turned into statistics by the same
:func:`kdcache.teacher.statistics.position_statistics` as every other path.

How the engine is driven:

* One ``llm.generate`` call per batch of ``TokensPrompt`` with ``SamplingParams(prompt_logprobs=K,
  flat_logprobs=True, detokenize=False, max_tokens=1)``; the engine runs without a tokenizer.
  ``out.prompt_logprobs`` is a ``FlatLogprobs`` whose position ``i >= 1`` holds ``K + 1`` entries:
  the actual token ``i`` first, then ranks ``1..K``. It is converted to arrays with one
  ``np.fromiter`` per list per request, then sliced to the supervised positions.
* Normalization: vLLM's log-softmax runs over all of the model's logit rows, including padded
  rows beyond the tokenizer. Padded ids are dropped from the top-k; their mass stays in
  ``tail_logmass``. To still return ``k`` real ids, a few extra log-probs are requested
  (``k + min(pad, PAD_MARGIN)``) and a position that still comes up short is re-scored with
  ``k + pad``.
* Draws need the whole distribution: ``prompt_logprobs=-1`` (the engine is built with
  ``max_logprobs=-1``) returns every logit row; during such calls vLLM's
  ``LogprobsProcessor._update_prompt_logprobs`` is swapped for one that keeps the arrays it
  receives (:func:`_prompt_logprobs_as_arrays`) instead of one Python object per entry.
* Prompt log-probs ignore temperature and are never served from the prefix cache, so prefix
  caching is disabled.
* A scoring request also emits one token, so a sequence of ``L`` tokens needs ``L + 1``
  positions of context.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kdcache.cache.records import TeacherScores, tail_logmass_from_topk
from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError, first_line
from kdcache.teacher.base import ScoringSettings
from kdcache.teacher.loading import ResolvedTeacher
from kdcache.teacher.sampling import select_real_topk, validate_request
from kdcache.teacher.statistics import position_statistics, scores_from_statistics, spec_for
from kdcache.teacher.vllm_engine import EngineUnusable, VLLMEngineBackend, config_vocab_rows, engine_setup

logger = logging.getLogger("kdcache")

PAD_MARGIN = 16  # extra log-probs requested when the model has padded logit rows
BYTES_PER_LOGIT = 10  # fp32 logits + fp32 log-probs + topk scratch, per (token, row)


class VLLMPromptLogprobsBackend(VLLMEngineBackend):
    """Teacher backend on a vLLM ``LLM`` engine's prompt log-probabilities (see the module docstring).

    Args:
        teacher: local HF directory or ``ResolvedTeacher``.
        dtype: ``"auto"`` or a torch dtype name.
        quantization: force a vLLM quantization method (None: detect from ``config.json``).
        tensor_parallel_size: GPUs per engine (None: 1). Every option's None means its default.
        gpu_memory_utilization: fraction of GPU memory for the engine (None: 0.85 on GPU, leaving
            room for prompt-logprob tensors that vLLM's memory profiling does not see;
            0.3 on CPU, where the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` GiB).
        max_num_batched_tokens: tokens per scheduler step (None: from ``logits_budget_bytes``).
        max_model_len: longest sequence (None: the model's).
        enforce_eager: skip torch.compile / CUDA graphs (None: True on CPU, False on GPU).
        logits_budget_bytes: memory allowed for one step's full-vocab logits (default 2 GiB).
        max_logprob_entries: bound on (positions x log-probs per position) per engine call;
            vLLM keeps them as Python lists (~100 bytes each) until the call returns.
        seed: engine seed.
        extra_engine_args: passed to ``vllm.LLM`` unchanged.
    """

    normalization = "all model logit rows (padded-row mass stays in the tail)"
    scoring_path = "vllm-prompt-logprobs"

    def __init__(
        self,
        teacher: ResolvedTeacher | str | Path,
        *,
        dtype: str = "auto",
        quantization: str | None = None,
        tensor_parallel_size: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        logits_budget_bytes: int = 2 << 30,
        max_logprob_entries: int = 16_000_000,
        seed: int | None = 0,
        extra_engine_args: dict[str, Any] | None = None,
    ) -> None:
        from vllm import LLM

        self.teacher, self.dtype, self.tokenizer, self.engine_options = engine_setup(
            teacher, dtype, quantization, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
        )
        self.vocab_size = len(self.tokenizer)
        self.max_logprob_entries = max_logprob_entries
        if max_num_batched_tokens is None:  # every scheduled position's full-vocabulary row is materialized
            model_rows = config_vocab_rows(self.teacher.path) or self.vocab_size
            max_num_batched_tokens = int(logits_budget_bytes // (BYTES_PER_LOGIT * model_rows))
            max_num_batched_tokens = max(256, min(16384, max_num_batched_tokens // 256 * 256))
            self.engine_options["max_num_batched_tokens"] = max_num_batched_tokens
        self.engine_options["max_num_seqs"] = min(256, max_num_batched_tokens)
        self._llm = LLM(
            str(self.teacher.path),
            skip_tokenizer_init=True,
            # Only a request-validation cap in vLLM; -1 lets one engine serve top-k and
            # full-vocab (sampling) requests.
            max_logprobs=-1,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,
            enable_chunked_prefill=True,
            **self.engine_options,
            **(extra_engine_args or {}),
        )
        self.model_vocab_rows = int(self._llm.llm_engine.model_config.get_vocab_size())
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        self.num_padded = max(0, self.model_vocab_rows - self.vocab_size)
        self._warned_full_rows = False
        self._started()
        self._probe()

    # ------------------------------------------------------------------ API

    def score(self, examples: Sequence[TokenizedExample], settings: ScoringSettings,
              progress: Callable[[int], None] | None = None) -> Iterator[TeacherScores]:
        """Teacher-forced scoring; yields one ``TeacherScores`` per example, in input order
        (``progress`` is called once per engine call).

        Examples go to the engine in as few ``llm.generate`` calls as ``max_logprob_entries``
        allows (vLLM holds every request's log-prob lists until a call returns).
        """
        validate_request(examples, settings, self.vocab_size)
        for ex in examples:
            self._check_length(ex)
        k = settings.top_k
        if settings.num_samples > 0:
            self._warn_full_rows()
            requested, width = -1, self.model_vocab_rows + 1
        else:
            requested = k + min(self.num_padded, PAD_MARGIN) if k else 0
            width = requested + 1
        for group in _groups_by_entries(examples, width, self.max_logprob_entries):
            if requested == -1:
                with _prompt_logprobs_as_arrays():
                    outs = self._prompt_logprobs(group, requested)
                if progress is not None:
                    progress(len(group))
                for ex, out in zip(group, outs):
                    yield self._full_vocab_scores(ex, out.prompt_logprobs, settings)
                continue
            outs = self._prompt_logprobs(group, requested)
            results = [self._topk_scores(ex, out.prompt_logprobs, k) for ex, out in zip(group, outs)]
            del outs
            retry = [i for i, r in enumerate(results) if r is None]
            if retry:  # some position had > PAD_MARGIN padded ids among its top candidates
                again = self._prompt_logprobs([group[i] for i in retry], k + self.num_padded)
                for i, out in zip(retry, again):
                    results[i] = self._topk_scores(group[i], out.prompt_logprobs, k)
            if progress is not None:
                progress(len(group))
            yield from results  # type: ignore[misc]

    def _probe(self) -> None:
        """Score two tokens once: some builds start an engine whose first forward fails (vLLM
        CPU 0.32's AVX2 library lacks the 4-bit ``cpu_gemm_wna16`` kernel), and ``auto`` must
        learn that while it can still fall back."""
        probe = TokenizedExample(-1, "probe", np.zeros(2, dtype=np.int32), np.ones(1, dtype=np.int32))
        try:
            self._prompt_logprobs([probe], 1)
        except Exception as exc:  # noqa: BLE001 - the engine reports many error types
            self.close()
            raise EngineUnusable(
                f"{self.teacher.spec}: vLLM started but cannot run this teacher ({first_line(exc)}); "
                "the engine log names the cause; the hf backend can load it"
            ) from None

    def _check_length(self, ex: TokenizedExample) -> None:
        if ex.num_tokens + 1 > self.max_model_len:  # a scoring request also "generates" one token
            raise KdcacheError(f"{ex.source}: {ex.num_tokens} tokens exceed the engine's max_model_len "
                               f"{self.max_model_len} (lower --max-length or raise max_model_len)")

    def _prompt_logprobs(self, examples: Sequence[TokenizedExample], num: int) -> list:
        """One engine call; ``num`` log-probs per prompt position (-1: the whole vocabulary)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not examples:
            return []
        params = SamplingParams(prompt_logprobs=num, flat_logprobs=True, detokenize=False, max_tokens=1)
        prompts = [TokensPrompt(prompt_token_ids=ex.input_ids.tolist()) for ex in examples]
        return self._llm.generate(prompts, params, use_tqdm=False)

    def _topk_scores(self, ex: TokenizedExample, flat: Any, k: int) -> TeacherScores | None:
        """``TeacherScores`` from a top-K prompt-logprob result; None if a row lacks k real ids."""
        ids, lps = _flat_rows(flat, ex.num_tokens - 1, first_position=1)
        rows = ex.target_positions.astype(np.int64) - 1
        ids, lps = ids[rows], lps[rows]
        return self._assemble(ex, ex.input_ids.astype(np.int32), ex.target_positions, ids[:, 0],
                              ids[:, 1:], lps[:, 0], lps[:, 1:], k)

    def _assemble(
        self, ex: TokenizedExample, input_ids: np.ndarray, positions: np.ndarray, actual_ids: np.ndarray,
        cand_ids: np.ndarray, actual_lps: np.ndarray, cand_lps: np.ndarray, k: int,
    ) -> TeacherScores | None:
        positions = np.asarray(positions, dtype=np.int32)
        if len(positions) == 0:  # nothing supervised: keep the [0, k] shapes
            cand_ids = np.zeros((0, max(k, 1)), dtype=np.int64)
            cand_lps = np.zeros((0, max(k, 1)), dtype=np.float32)
        if not np.array_equal(actual_ids, input_ids[positions]):
            raise RuntimeError(f"{ex.source}: vLLM returned log-probs for different tokens than sent")
        scores = TeacherScores(ex.seq_id, ex.source, input_ids, positions, actual_lps.astype(np.float32))
        if k:
            topk_ids, topk_lps, complete = select_real_topk(cand_ids, cand_lps, self.vocab_size, k)
            if not complete.all():
                return None
            scores.topk_ids, scores.topk_logprobs = topk_ids, topk_lps
            scores.tail_logmass = tail_logmass_from_topk(topk_lps)
        return scores

    def _warn_full_rows(self) -> None:
        """Once per backend: a sampled run pays for whole vocabulary rows on the host."""
        if not self._warned_full_rows:
            self._warned_full_rows = True
            logger.warning(
                "vLLM hands sampled runs whole vocabulary rows (%d per token), which the host turns into draws at "
                "a few hundred tokens/s per core (benchmarks/bench_full_rows.py); --backend hf draws where the "
                "logits are", self.model_vocab_rows)

    def _full_vocab_scores(self, ex: TokenizedExample, chunks: Any, settings: ScoringSettings) -> TeacherScores:
        ids, lps = _array_rows(chunks, ex.num_tokens - 1)
        rows = ex.target_positions.astype(np.int64) - 1
        return self._scores_from_dense(ex, ex.input_ids.astype(np.int32), ex.target_positions, ids, lps, rows,
                                       settings)

    def _scores_from_dense(
        self, ex: TokenizedExample, input_ids: np.ndarray, positions: np.ndarray, ids: np.ndarray,
        lps: np.ndarray, rows: np.ndarray, settings: ScoringSettings,
    ) -> TeacherScores:
        """Statistics from full-vocabulary rows (``ids``/``lps``: ``[R, 1 + model rows]``, the
        scored token first, then every row in vLLM's rank order), through the same
        :func:`~kdcache.teacher.statistics.position_statistics` as the in-engine path."""
        import torch

        spec = spec_for(settings.top_k, settings.num_samples, settings.sample_tail, settings.draws, settings.seed,
                        self.vocab_size)
        dense = np.full((len(rows), self.model_vocab_rows), -np.inf, dtype=np.float32)
        np.put_along_axis(dense, ids[rows, 1:].astype(np.int64), lps[rows, 1:], axis=1)
        positions = np.asarray(positions, dtype=np.int64)
        block = position_statistics(
            torch.from_numpy(dense), torch.from_numpy(input_ids[positions].astype(np.int64)),
            torch.full((len(positions),), ex.seq_id, dtype=torch.int64), torch.from_numpy(positions), spec,
        )
        return scores_from_statistics(ex.seq_id, ex.source, input_ids, positions, block.numpy(), spec)


def _flat_rows(flat: Any, num_rows: int, first_position: int) -> tuple[np.ndarray, np.ndarray]:
    """``FlatLogprobs`` -> ``(ids int64 [R, W], logprobs float32 [R, W])`` for positions
    ``first_position .. first_position + R - 1``; every such position has the same width ``W``
    (the scored token, then ranks 1..K), which is what vLLM produces for one request.
    """
    if num_rows <= 0 or flat is None:
        return np.zeros((0, 1), dtype=np.int64), np.zeros((0, 1), dtype=np.float32)
    start = flat.start_indices[first_position]
    end = flat.end_indices[first_position + num_rows - 1]
    width = flat.end_indices[first_position] - start
    if width <= 0 or end - start != width * num_rows or len(flat.start_indices) != first_position + num_rows:
        raise RuntimeError("unexpected FlatLogprobs layout from vLLM (positions of unequal width)")
    count = end - start
    ids = np.fromiter(flat.token_ids[start:end] if start else flat.token_ids, dtype=np.int64, count=count)
    lps = np.fromiter(flat.logprobs[start:end] if start else flat.logprobs, dtype=np.float32, count=count)
    return ids.reshape(num_rows, width), lps.reshape(num_rows, width)


class _ArrayChunks(list):
    """Prompt log-probs of one request as the ``(token_ids, logprobs)`` arrays vLLM sent, one
    pair per prefill chunk (each ``[rows, 1 + K]``: the scored token, then ranks 1..K)."""


@contextlib.contextmanager
def _prompt_logprobs_as_arrays() -> Iterator[None]:
    """While active, vLLM keeps prompt log-probs as arrays (:class:`_ArrayChunks`) instead of
    building a Python object per entry. Only for calls whose requests all want full rows."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    original = LogprobsProcessor._update_prompt_logprobs

    def keep_arrays(self, tensors) -> None:  # noqa: ANN001 - vLLM's LogprobsTensors
        token_ids, logprobs = tensors[0], tensors[1]
        if not isinstance(self.prompt_logprobs, _ArrayChunks):
            self.prompt_logprobs = _ArrayChunks()
        self.prompt_logprobs.append((np.asarray(token_ids), np.asarray(logprobs, dtype=np.float32)))

    LogprobsProcessor._update_prompt_logprobs = keep_arrays
    try:
        yield
    finally:
        LogprobsProcessor._update_prompt_logprobs = original


def _array_rows(chunks: Any, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """:class:`_ArrayChunks` -> ``(ids int64 [R, W], logprobs float32 [R, W])`` for prompt
    positions ``1 .. R``, like :func:`_flat_rows`."""
    if num_rows <= 0 or not chunks:
        return np.zeros((0, 1), dtype=np.int64), np.zeros((0, 1), dtype=np.float32)
    if not isinstance(chunks, _ArrayChunks):
        raise RuntimeError("vLLM returned prompt log-probs as objects where arrays were expected")
    ids = np.concatenate([c[0] for c in chunks]).astype(np.int64, copy=False)
    lps = np.concatenate([c[1] for c in chunks])
    if ids.shape[0] != num_rows or ids.shape != lps.shape:
        raise RuntimeError(f"unexpected prompt log-prob arrays from vLLM: {ids.shape} for {num_rows} positions")
    return ids, lps


def _group_starts(positions: Sequence[int], width: int, budget: int) -> list[int]:
    """Boundaries ``[0, ..., n]`` of consecutive groups holding at most ``budget`` log-prob
    entries (``positions[i] * width`` each); an item larger than the budget stands alone."""
    starts, used = [0], 0
    for i, n in enumerate(positions):
        cost = max(1, n) * width
        if i > starts[-1] and used + cost > budget:
            starts.append(i)
            used = 0
        used += cost
    starts.append(len(positions))
    return starts


def _groups_by_entries(examples: Sequence[TokenizedExample], width: int, budget: int) -> Iterator[list]:
    """``examples`` split by ``_group_starts`` over their scored positions (``L - 1`` each)."""
    starts = _group_starts([ex.num_tokens - 1 for ex in examples], width, budget)
    for lo, hi in zip(starts, starts[1:]):
        yield list(examples[lo:hi])
