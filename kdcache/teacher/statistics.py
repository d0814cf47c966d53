"""The per-position statistics a cache stores, computed from the teacher's logits in torch.

This is the one place where logits become cache content. The transformers backend calls
it on the model's device; inside vLLM, kdcache's pooling head (:mod:`kdcache.teacher.vllm_model`)
calls it in the engine process, so only the small per-position result crosses to the host.
Both therefore produce the same numbers from the same logits, by construction.

Per position (a row of logits ``z`` over the model's output rows, of which the first
``vocab_size`` are real tokens; padded rows beyond the tokenizer are dropped first):

* ``lse = logsumexp(z)`` is the normalizer; every stored log-prob is ``z_i - lse``
  (natural log, temperature 1);
* the target's log-prob ``z[t] - lse``, ``t`` the token that actually follows;
* the exact top-k (``torch.topk``, descending);
* the exact tail log-mass outside the top-k, ``logsumexp(z_j, j not in top-k) - lse``,
  computed from the tail's own maximum (``1 - sum(top-k)`` in float32 loses about 2.6e-3
  nats when the tail is near 2e-5; see ``tests/test_statistics.py``);
* ``N`` draws by inverse-CDF sampling, from the full distribution (``--sampling random``) or
  from the distribution restricted to the ids outside the top-k (``--sampling tail``), at
  the points of :func:`draw_points` (iid or systematic).

Uniforms are a counter-based hash of ``(seed, seq_id, position, draw)``
(:func:`counter_uniforms`): no generator state, so a position's draws do not depend on
batching, chunked prefill, worker layout, which other positions are supervised, or the
engine. The CDF is searched in two levels (block sums in float64, then one block's
cumulative sum), which reads the row once instead of writing a float64 cumulative sum of
the whole vocabulary.

The result is one float32 matrix ``[R, layout.width]`` (see :class:`StatsLayout`); token ids
are stored as floats, exact below 2**24 (every real vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

#: Rows' worth of float32 logits processed at once: bounds the full-vocabulary buffers.
DEFAULT_CHUNK_BYTES = 64 << 20
#: Ids per CDF block of the two-level search (a power of two keeps the reshape cheap).
CDF_BLOCK = 256
#: Largest token id a float32 column holds exactly.
MAX_FLOAT_ID = 1 << 24
DRAW_SCHEMES = ("iid", "systematic")


@dataclass(frozen=True)
class StatsSpec:
    """What to compute per position.

    Attributes:
        top_k: top log-probs kept per position (0: none).
        num_samples: ``N`` draws per position (0: none).
        sample_tail: draw from outside the top-k (``--sampling tail``) instead of the full
            distribution (``--sampling random``).
        draws: ``"systematic"`` or ``"iid"`` (:func:`draw_points`).
        seed: base seed of :func:`counter_uniforms`.
        vocab_size: real vocabulary (``len(tokenizer)``); logit rows at or above it are
            padding and never enter any statistic.
    """

    top_k: int
    num_samples: int
    sample_tail: bool
    draws: str
    seed: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.num_samples < 0:
            raise ValueError("top_k and num_samples must be >= 0")
        if self.sample_tail and self.top_k == 0:
            raise ValueError("sampling from the tail needs top_k >= 1")
        if self.draws not in DRAW_SCHEMES:
            raise ValueError(f"unknown draw scheme {self.draws!r}; use one of {DRAW_SCHEMES}")
        if self.vocab_size > MAX_FLOAT_ID:
            raise ValueError(f"vocabularies above {MAX_FLOAT_ID} ids are not supported (ids travel as float32)")

    @property
    def layout(self) -> StatsLayout:
        return StatsLayout(self.top_k, self.num_samples)

    def to_json(self) -> dict:
        return {"top_k": self.top_k, "num_samples": self.num_samples, "sample_tail": self.sample_tail,
                "draws": self.draws, "seed": self.seed, "vocab_size": self.vocab_size}


@dataclass(frozen=True)
class StatsLayout:
    """Columns of the float32 statistics matrix ``[R, width]``:
    ``0`` target log-prob, ``1`` tail log-mass (``-inf`` without a top-k),
    ``2 : 2+k`` top-k ids, ``2+k : 2+2k`` top-k log-probs, ``2+2k : 2+2k+N`` drawn ids
    (non-decreasing for systematic draws; -1 where a row had no mass to draw from)."""

    top_k: int
    num_samples: int

    @property
    def width(self) -> int:
        return 2 + 2 * self.top_k + self.num_samples

    def split(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """Host-side views of a ``[R, width]`` block: ``target`` [R], ``tail`` [R],
        ``topk_ids`` int32 [R, k], ``topk_logprobs`` [R, k], ``draws`` int32 [R, N]."""
        k, n = self.top_k, self.num_samples
        return {
            "target": block[:, 0],
            "tail": block[:, 1],
            "topk_ids": block[:, 2:2 + k].astype(np.int32),
            "topk_logprobs": block[:, 2 + k:2 + 2 * k],
            "draws": block[:, 2 + 2 * k:2 + 2 * k + n].astype(np.int32),
        }


# ------------------------------------------------------------------------------ uniforms

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _splitmix(z: Tensor) -> Tensor:
    """SplitMix64's finalizer (Steele, Lea & Flood, OOPSLA 2014) on int64 tensors.

    int64 multiplication wraps modulo 2**64 like uint64's; the right shifts are made logical
    with a mask, so the bits equal the uint64 reference (checked in the tests).
    """
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def counter_uniforms(seed: int, seq_ids: Tensor, positions: Tensor, count: int) -> Tensor:
    """Uniforms in ``[0, 1)`` keyed by ``(seed, seq_id, position, j)``: float64 ``[R, count]``.

    Args:
        seed: the run's ``--seed``.
        seq_ids: int64 ``[R]`` input row of each position.
        positions: int64 ``[R]`` index of the token each row predicts (the target position).
        count: uniforms per row (``N`` for iid draws, 1 for systematic ones).

    Each value is the top 53 bits of a SplitMix64 chain over the four keys, times ``2**-53``.
    """
    device = positions.device
    h = _splitmix(torch.full_like(positions, _signed((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)))
    h = _splitmix(h ^ (seq_ids.to(torch.int64) + _GOLDEN))
    h = _splitmix(h ^ (positions.to(torch.int64) + _GOLDEN))
    j = torch.arange(count, dtype=torch.int64, device=device)
    h = _splitmix(h[:, None] ^ (j[None, :] + _GOLDEN))
    return ((h >> 11) & ((1 << 53) - 1)).to(torch.float64) * (2.0 ** -53)


def draw_points(uniforms: Tensor, num_samples: int, scheme: str) -> Tensor:
    """The ``[R, N]`` points in ``[0, 1)`` that inverse-CDF sampling maps to token ids.

    * ``iid``: the ``N`` uniforms themselves: independent draws with replacement (as in
      Random-Sampling KD, Anshumann et al., ACL 2025).
    * ``systematic``: from one uniform ``u`` per row, the evenly spaced ``(u + j) / N``: each
      id's count is then ``floor(N p)`` or ``ceil(N p)``, an unbiased estimate with far less
      variance (``benchmarks/bench_draws.py``: 3.1x less target noise at N=50).

    Args:
        uniforms: float64 ``[R, N]`` (iid) or ``[R, 1]`` (systematic), from :func:`counter_uniforms`.
    """
    if scheme == "iid":
        return uniforms
    if scheme == "systematic":
        steps = torch.arange(num_samples, dtype=torch.float64, device=uniforms.device)
        return (uniforms[:, :1] + steps) / num_samples
    raise ValueError(f"unknown draw scheme {scheme!r}; use one of {DRAW_SCHEMES}")


def uniform_count(spec: StatsSpec) -> int:
    return spec.num_samples if spec.draws == "iid" else 1


# ------------------------------------------------------------------------ the statistics


def _block_sums(weights: Tensor) -> Tensor:
    """float64 sums of consecutive blocks of :data:`CDF_BLOCK` columns (the last may be
    shorter): ``[R, V] -> [R, ceil(V / CDF_BLOCK)]``. One read of the row, no padded copy."""
    rows, vocab = weights.shape
    full = vocab // CDF_BLOCK
    parts = []
    if full:
        parts.append(weights[:, : full * CDF_BLOCK].view(rows, full, CDF_BLOCK).sum(dim=-1, dtype=torch.float64))
    if vocab % CDF_BLOCK:
        parts.append(weights[:, full * CDF_BLOCK:].sum(dim=-1, dtype=torch.float64, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _inverse_cdf(weights: Tensor, block_sums: Tensor, points: Tensor) -> Tensor:
    """Ids drawn at ``points`` from unnormalized ``weights``: int64 ``[R, N]``.

    ``weights`` float32 ``[R, V]`` (>= 0; zeros are never drawn) with their
    :func:`_block_sums`; ``points`` float64 ``[R, N]`` in ``[0, 1)``. The id for point ``x`` is
    the smallest ``i`` with ``cdf[i] > x * total``: the block sums' cumulative sum locates the
    block, then that block's own float64 cumulative sum locates the id. Rows whose total is 0
    get -1.
    """
    rows, vocab = weights.shape
    block_cdf = block_sums.cumsum(dim=-1)  # [R, B]
    total = block_cdf[:, -1:]
    target = points * total
    # A point rounded up to the total belongs to the last block that has any weight.
    last_block = block_cdf.shape[1] - 1 - (block_sums > 0).flip(-1).to(torch.int8).argmax(dim=-1, keepdim=True)
    block = torch.minimum(torch.searchsorted(block_cdf, target, right=True), last_block)  # [R, N]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    columns = block[..., None] * CDF_BLOCK + torch.arange(CDF_BLOCK, device=weights.device)  # [R, N, CDF_BLOCK]
    inside = weights.gather(1, columns.clamp(max=vocab - 1).flatten(1)).view(columns.shape).to(torch.float64)
    inside = inside.masked_fill_(columns >= vocab, 0.0)
    inner_cdf = inside.cumsum(dim=-1)
    residual = (target - before).clamp_(min=0)
    offset = torch.searchsorted(inner_cdf, residual[..., None], right=True)[..., 0]
    # Rounding can put a point past the block's last positive weight: take that weight's id.
    last_positive = CDF_BLOCK - 1 - (inside > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    ids = block * CDF_BLOCK + torch.minimum(offset, last_positive)
    return torch.where(total > 0, ids, torch.full_like(ids, -1))


def position_statistics(
    logits: Tensor, target_ids: Tensor, seq_ids: Tensor, positions: Tensor, spec: StatsSpec
) -> Tensor:
    """The cache statistics of ``R`` positions from their logits: float32 ``[R, spec.layout.width]``.

    Args:
        logits: ``[R, rows]`` raw logits (any float dtype, ``rows >= spec.vocab_size``), the
            model's final output including every architecture-specific transform.
        target_ids: int ``[R]`` the token that follows each position (any value where unused).
        seq_ids: int ``[R]`` input row of each position (keys the uniforms).
        positions: int ``[R]`` index of the predicted token in its sequence (keys the uniforms).
        spec: what to compute.

    Passes over the ``[R, V]`` rows: one ``topk``, one fused ``softmax`` (its float32 output
    is the only full-size buffer), float64 block sums of the tail probabilities; the normalizer
    is ``max - log(softmax at the argmax)`` (at least ``1 / V``, so exact) and the tail mass is
    the sum of the tail's own probabilities (no ``1 - sum(top-k)`` cancellation). A tail whose
    probabilities all underflow float32 (more than ~103 nats below the top-1) is recomputed by
    a log-sum-exp over its logits (and draws nothing).

    Non-finite logits (an overflowing float16 forward) give non-finite or impossible values
    in the row; callers check rows with :func:`kdcache.cache.records.scores_problem` before
    anything is stored.
    """
    k, n = spec.top_k, spec.num_samples
    z = logits[:, : spec.vocab_size]
    z = z if z.dtype == torch.float32 else z.float()
    rows, vocab = z.shape
    out = torch.empty((rows, spec.layout.width), dtype=torch.float32, device=z.device)
    target = z.gather(1, target_ids.to(torch.long).clamp(0, vocab - 1)[:, None])[:, 0]
    top_values, top_ids = torch.topk(z, min(max(k, 1), vocab), dim=-1)
    probs = torch.softmax(z, dim=-1)
    lse = top_values[:, 0] - probs.gather(1, top_ids[:, :1])[:, 0].log()
    out[:, 0] = target - lse
    draw_weights = draw_blocks = None
    if n and not spec.sample_tail:  # draws from the whole distribution
        draw_weights = probs.clone() if k else probs
        draw_blocks = _block_sums(draw_weights)
    if k:
        out[:, 2:2 + k] = top_ids.float()
        out[:, 2 + k:2 + 2 * k] = top_values - lse[:, None]
        probs.scatter_(1, top_ids, 0.0)
        tail_blocks = _block_sums(probs)
        tail_mass = tail_blocks.sum(dim=-1)
        out[:, 1] = tail_mass.log()
        if k < vocab:
            underflow = tail_mass == 0
            if bool(underflow.any()):
                masked = z[underflow].scatter(1, top_ids[underflow], float("-inf"))
                out[underflow, 1] = torch.logsumexp(masked, dim=-1) - lse[underflow]
        if draw_weights is None:
            draw_weights, draw_blocks = probs, tail_blocks
    else:
        out[:, 1] = float("-inf")
    if n:
        uniforms = counter_uniforms(spec.seed, seq_ids, positions, uniform_count(spec))
        draws = _inverse_cdf(draw_weights, draw_blocks, draw_points(uniforms, n, spec.draws))
        out[:, 2 + 2 * k:] = draws.float()
    return out


def statistics_in_chunks(
    head: Callable[[Tensor], Tensor], hidden: Tensor, target_ids: Tensor, seq_ids: Tensor, positions: Tensor,
    spec: StatsSpec, rows_per_chunk: int,
) -> Tensor:
    """:func:`position_statistics` over ``hidden`` ``[R, H]``, ``rows_per_chunk`` rows of
    logits (``head(hidden_chunk)``) at a time; returns float32 ``[R, width]`` on the device.
    Never holds more than one chunk of full-vocabulary rows."""
    parts = []
    for start in range(0, hidden.shape[0], rows_per_chunk):
        stop = start + rows_per_chunk
        logits = head(hidden[start:stop])
        parts.append(position_statistics(logits, target_ids[start:stop], seq_ids[start:stop],
                                         positions[start:stop], spec))
        del logits
    if not parts:
        return torch.empty((0, spec.layout.width), dtype=torch.float32, device=hidden.device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def rows_per_chunk(model_rows: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Positions per chunk so that a few float32 ``[C, rows]`` buffers fit ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * 4 * max(1, model_rows)))


def draws_to_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row drawn ids (int ``[R, N]``, -1 where a row drew nothing) -> ``(offsets int32
    [R + 1], ids int32 [M], counts int32 [M])``: row ``r`` owns ``ids[offsets[r]:offsets[r+1]]``,
    unique and ascending, with how many of its draws hit each."""
    rows, n = draws.shape
    if rows == 0 or n == 0:
        return np.zeros(rows + 1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)
    ordered = np.sort(draws.astype(np.int64), axis=1)
    valid = ordered >= 0  # -1 entries sort first in their row
    first = valid.copy()
    first[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    starts = np.flatnonzero(first.ravel())
    # A run ends where the next one starts; the invalid entries in between count 0.
    counts = np.add.reduceat(valid.ravel().astype(np.int64), starts) if starts.size else np.zeros(0, np.int64)
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(first.sum(axis=1), out=offsets[1:])
    return offsets.astype(np.int32), ordered.ravel()[starts].astype(np.int32), counts.astype(np.int32)


def spec_for(top_k: int, num_samples: int, sample_tail: bool, draws: str, seed: int, vocab_size: int) -> StatsSpec:
    """A :class:`StatsSpec`, with a one-line error for settings no backend can score."""
    from kdcache.errors import KdcacheError

    try:
        return StatsSpec(top_k, num_samples, sample_tail, draws, seed, vocab_size)
    except ValueError as exc:
        raise KdcacheError(str(exc)) from None


def target_spans(positions: np.ndarray) -> list[list[int]]:
    """Ascending target positions as ``[[start, stop), ...]`` runs (what a vLLM request carries)."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [positions.size]])
    return [[int(positions[a]), int(positions[b - 1]) + 1] for a, b in zip(starts, stops)]


def scores_from_statistics(seq_id: int, source: str, input_ids: np.ndarray, positions: np.ndarray,
                           block: np.ndarray, spec: StatsSpec):
    """A :class:`kdcache.cache.records.TeacherScores` from the ``[S, width]`` statistics of the
    positions ``positions`` (ascending) of one sequence."""
    from kdcache.cache.records import TeacherScores

    block = np.asarray(block, dtype=np.float32)
    if block.shape != (len(positions), spec.layout.width):
        raise RuntimeError(f"{source}: statistics of shape {block.shape}, expected "
                           f"({len(positions)}, {spec.layout.width}) (engine/kdcache mismatch)")
    parts = spec.layout.split(block)
    scores = TeacherScores(seq_id, source, np.asarray(input_ids, dtype=np.int32),
                           np.asarray(positions, dtype=np.int32), np.ascontiguousarray(parts["target"]))
    if spec.top_k:
        scores.topk_ids = np.ascontiguousarray(parts["topk_ids"])
        scores.topk_logprobs = np.ascontiguousarray(parts["topk_logprobs"])
        scores.tail_logmass = np.ascontiguousarray(parts["tail"])
    if spec.num_samples:
        scores.sample_offsets, scores.sample_ids, scores.sample_counts = draws_to_counts(parts["draws"])
    return scores
