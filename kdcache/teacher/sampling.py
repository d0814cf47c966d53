"""Backend-independent request checks, and the real-vocabulary top-k of the prompt-log-prob
path (every statistic itself comes from :mod:`kdcache.teacher.statistics`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError
from kdcache.teacher.base import ScoringSettings


def validate_request(examples: Sequence[TokenizedExample], settings: ScoringSettings, vocab_size: int,
                     model_rows: int | None = None) -> None:
    """Raise a one-line ``KdcacheError`` for settings or token ids a teacher cannot score.

    ``model_rows`` is the teacher's output rows: a tokenizer larger than them (ids the model
    cannot predict) is refused, naming both sizes and the first row holding such an id.
    """
    if settings.top_k < 0 or settings.num_samples < 0:
        raise KdcacheError("top_k and num_samples must be >= 0")
    if settings.sample_tail and settings.top_k == 0:
        raise KdcacheError("sampling from the tail needs top_k >= 1 (the tail is what lies outside the top-k)")
    if settings.top_k > vocab_size:
        raise KdcacheError(f"top_k {settings.top_k} exceeds the tokenizer's vocabulary ({vocab_size})")
    if model_rows is not None and model_rows < vocab_size:
        raise vocab_rows_error("the teacher", vocab_size, model_rows, examples)
    for ex in examples:
        if ex.num_tokens == 0:
            raise KdcacheError(f"{ex.source}: empty sequence")
        if int(ex.input_ids.min()) < 0 or int(ex.input_ids.max()) >= vocab_size:
            raise KdcacheError(f"{ex.source}: token id outside the teacher's vocabulary (0..{vocab_size - 1}); "
                               "was the data tokenized with another tokenizer?")
        pos = ex.target_positions
        if len(pos) and (int(pos.min()) < 1 or int(pos.max()) >= ex.num_tokens):
            raise KdcacheError(f"{ex.source}: target positions must lie in 1..{ex.num_tokens - 1}")


def select_real_topk(
    cand_ids: np.ndarray, cand_logprobs: np.ndarray, vocab_size: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, per row, the first ``k`` candidates whose id is a real token (``< vocab_size``).

    Args:
        cand_ids: int ``[S, K]`` candidate ids per row, by descending log-prob (``K >= k``).
        cand_logprobs: float ``[S, K]`` their log-probs.
        vocab_size: tokenizer vocabulary size; larger ids are padded logit rows.
        k: entries to keep.

    Returns:
        ``(ids int32 [S, k], logprobs float32 [S, k], complete bool [S])``; rows where
        ``complete`` is False had fewer than ``k`` real candidates and hold garbage beyond
        them (the caller must re-request those rows with a larger ``K``).
    """
    real = cand_ids < vocab_size
    if real[:, :k].all():
        return (
            cand_ids[:, :k].astype(np.int32, copy=False),
            cand_logprobs[:, :k].astype(np.float32, copy=False),
            np.ones(cand_ids.shape[0], dtype=bool),
        )
    # A stable sort on "is padded" moves real candidates to the front, keeping their order.
    order = np.argsort(~real, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(cand_ids, order, axis=1).astype(np.int32)
    lps = np.take_along_axis(cand_logprobs, order, axis=1).astype(np.float32)
    return ids, lps, real.sum(axis=1) >= k


def first_id_beyond(examples: Sequence[TokenizedExample], limit: int) -> tuple[str, int] | None:
    """``(source, id)`` of the first example holding a token id ``>= limit``, or None."""
    for ex in examples:
        if ex.num_tokens and int(ex.input_ids.max()) >= limit:
            return ex.source, int(ex.input_ids[ex.input_ids >= limit][0])
    return None


def vocab_rows_error(who: str, vocab_size: int, model_rows: int,
                     examples: Sequence[TokenizedExample] = ()) -> KdcacheError:
    """The one line for a tokenizer with more tokens than the model has output rows."""
    found = first_id_beyond(examples, model_rows)
    where = f"; {found[0]} holds id {found[1]}" if found else ""
    return KdcacheError(
        f"{who}'s tokenizer has {vocab_size} tokens but its output layer only {model_rows} rows, so ids "
        f"{model_rows}..{vocab_size - 1} cannot be scored{where}; resize the model's embeddings to the tokenizer "
        "(model.resize_token_embeddings(len(tokenizer))) or use the tokenizer the model was trained with"
    )
