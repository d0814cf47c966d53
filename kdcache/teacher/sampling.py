"""Backend-independent rules for per-position distributions: request checks, real-vocab
top-k and random draws.

Both backends funnel their log-probabilities through these functions, so the two produce
results with the same semantics (same padded-id rule, same random stream per sequence).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError
from kdcache.teacher.base import ScoringSettings


def validate_request(examples: Sequence[TokenizedExample], settings: ScoringSettings, vocab_size: int) -> None:
    """Raise a one-line ``KdcacheError`` for settings or token ids a teacher cannot score."""
    if settings.top_k < 0 or settings.num_samples < 0:
        raise KdcacheError("top_k and num_samples must be >= 0")
    if settings.sample_tail and settings.top_k == 0:
        raise KdcacheError("sampling from the tail needs top_k >= 1 (the tail is what lies outside the top-k)")
    if settings.top_k > vocab_size:
        raise KdcacheError(f"top_k {settings.top_k} exceeds the tokenizer's vocabulary ({vocab_size})")
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


DRAW_SCHEMES = ("iid", "systematic")


def draw_points(rng: np.random.Generator, rows: int, num_samples: int, scheme: str) -> np.ndarray:
    """The ``[R, N]`` points in ``[0, 1)`` that inverse-CDF sampling maps to token ids.

    * ``iid``: ``N`` independent uniforms per row (row ``r`` is the ``r``-th row of
      ``rng.random((R, N))``): draws with replacement, as in Random-Sampling KD.
    * ``systematic``: one uniform ``u`` per row (the ``r``-th of ``rng.random((R, 1))``) and the
      evenly spaced points ``(u + j) / N``, ``j = 0..N-1``. Each id's count is then
      ``floor(N p)`` or ``ceil(N p)`` with mean exactly ``N p``: the same unbiased estimate with
      far less variance (an id with ``p = 0.5`` and ``N = 50`` gets exactly 25, where
      independent draws give 25 ± 3.5).

    Either way row ``r`` consumes only its own share of the stream, so calling a sampler on
    consecutive slices of a sequence's positions with the same generator gives the same
    draws as one call.
    """
    if scheme == "iid":
        return rng.random((rows, num_samples))
    if scheme == "systematic":
        return (rng.random((rows, 1)) + np.arange(num_samples, dtype=np.float64)) / num_samples
    raise ValueError(f"unknown draw scheme {scheme!r}; use one of {DRAW_SCHEMES}")


def draw_counts(
    rng: np.random.Generator, logprobs: np.ndarray, num_samples: int, exclude: np.ndarray | None = None,
    scheme: str = "iid",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``num_samples`` tokens with replacement from each row's distribution.

    Exact inverse-CDF sampling in float64 over the full row, at the points of
    :func:`draw_points` (``scheme`` "iid" or "systematic").

    Args:
        rng: the sequence's generator (``numpy.random.default_rng([seed, seq_id])``).
        logprobs: float ``[R, V]`` log-probs over the real vocabulary (any normalization:
            rows are renormalized in float64; ``-inf`` entries are never drawn).
        num_samples: draws per row, ``N >= 1``.
        exclude: optional int ``[R, k]`` ids never drawn (``--sampling tail``: the row's
            top-k), i.e. draws come from the distribution restricted to the other ids. A row
            with no mass left draws nothing.
        scheme: "iid" or "systematic" (see :func:`draw_points`).

    Returns:
        ``(offsets int32 [R + 1], ids int32 [M], counts int32 [M])``: row ``r`` owns
        ``ids[offsets[r]:offsets[r+1]]``, unique and ascending, whose counts sum to ``N``
        (0 for a row with no mass).
    """
    rows, vocab = logprobs.shape
    uniforms = draw_points(rng, rows, num_samples, scheme)
    lp = np.array(logprobs, dtype=np.float64)  # a copy: excluded ids are overwritten
    if exclude is not None and exclude.size:
        np.put_along_axis(lp, np.asarray(exclude, dtype=np.int64), -np.inf, axis=1)
    top = lp.max(axis=1, keepdims=True) if vocab else np.full((rows, 1), -np.inf)
    has_mass = np.isfinite(top[:, 0])
    top[~has_mass] = 0.0
    # In place over the [R, V] float64 buffer: exp, cumsum, normalize (R x V can be large).
    np.subtract(lp, top, out=lp)
    np.exp(lp, out=lp)
    cdf = np.cumsum(lp, axis=1, out=lp)
    last = cdf[:, -1:].copy()
    last[~has_mass] = 1.0
    cdf /= last  # last entry becomes exactly 1.0, and uniforms are < 1
    draws = np.zeros((rows, num_samples), dtype=np.int64)
    for r in np.flatnonzero(has_mass):
        # side="right" skips zero-probability ids, whose CDF step is empty.
        draws[r] = np.minimum(np.searchsorted(cdf[r], uniforms[r], side="right"), vocab - 1)
    keys = (np.arange(rows, dtype=np.int64)[:, None] * vocab + draws)[has_mass].ravel()
    unique, counts = np.unique(keys, return_counts=True)
    owner = unique // vocab
    offsets = np.searchsorted(owner, np.arange(rows + 1), side="left").astype(np.int32)
    return offsets, (unique % vocab).astype(np.int32), counts.astype(np.int32)


def draw_counts_torch(
    rng: np.random.Generator, logprobs, num_samples: int, exclude=None, scheme: str = "iid"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`draw_counts` on a torch tensor, computed where the tensor lives (the GPU for the
    transformers backend): the ``[R, V]`` float64 CDF never crosses to the host.

    Same points from ``rng`` (:func:`draw_points`) and the same inverse-CDF rule, so on the same log-probs the
    draws match :func:`draw_counts` (up to float64 rounding in ``exp``/``cumsum``).

    Args:
        rng: the sequence's generator.
        logprobs: float tensor ``[R, V]`` over the real vocabulary.
        num_samples: draws per row, ``N >= 1``.
        exclude: optional int64 tensor ``[R, k]`` of ids never drawn (``--sampling tail``).
        scheme: "iid" or "systematic".

    Returns the same ``(offsets, ids, counts)`` numpy arrays as :func:`draw_counts`.
    """
    import torch

    rows, vocab = logprobs.shape
    uniforms = torch.from_numpy(draw_points(rng, rows, num_samples, scheme)).to(logprobs.device)
    lp = logprobs.to(torch.float64).clone()
    if exclude is not None and exclude.numel():
        lp.scatter_(1, exclude.to(lp.device, torch.long), float("-inf"))
    top = lp.amax(dim=1, keepdim=True) if vocab else torch.full((rows, 1), float("-inf"), dtype=lp.dtype, device=lp.device)
    has_mass = torch.isfinite(top[:, 0])
    top[~has_mass] = 0.0
    lp.sub_(top).exp_()
    cdf = torch.cumsum(lp, dim=1, out=lp)
    last = cdf[:, -1:].clone()
    last[~has_mass] = 1.0
    cdf.div_(last)
    draws = torch.searchsorted(cdf, uniforms, right=True).clamp_(max=vocab - 1)
    keys = (torch.arange(rows, device=lp.device)[:, None] * vocab + draws)[has_mass].reshape(-1)
    unique, counts = torch.unique(keys, sorted=True, return_counts=True)
    unique, counts = unique.cpu().numpy(), counts.cpu().numpy()
    owner = unique // vocab
    offsets = np.searchsorted(owner, np.arange(rows + 1), side="left").astype(np.int32)
    return offsets, (unique % vocab).astype(np.int32), counts.astype(np.int32)


def concat_samples(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Join consecutive ``draw_counts`` results of one sequence into one ``(offsets, ids, counts)``."""
    if len(parts) == 1:
        return parts[0]
    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for off, _, _ in parts:
        offsets.append(off[1:].astype(np.int64) + base)
        base += int(off[-1])
    return (
        np.concatenate(offsets).astype(np.int32),
        np.concatenate([p[1] for p in parts]).astype(np.int32),
        np.concatenate([p[2] for p in parts]).astype(np.int32),
    )


def sequence_rng(seed: int, seq_id: int) -> np.random.Generator:
    """The generator that owns all random draws of one sequence."""
    return np.random.default_rng([seed, seq_id])
