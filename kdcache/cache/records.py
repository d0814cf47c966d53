"""In-memory form of one cached sequence, as produced by a teacher backend and read back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TeacherScores:
    """The teacher's sparse next-token distributions for one sequence.

    ``S`` is the number of supervised positions, ``k`` the cache's top-k.
    All log-probabilities are natural-log, temperature 1, normalized over the
    teacher's full output distribution.

    Attributes:
        seq_id: row index in the input stream (see ``TokenizedExample``).
        source: ``"path:row"`` of the input row.
        input_ids: int32 ``[L]`` the exact tokens the teacher scored (prompt + response).
        target_positions: int32 ``[S]`` ascending positions of supervised tokens.
        target_logprobs: float32 ``[S]`` teacher log-prob of ``input_ids[target_positions]``.
        topk_ids: int32 ``[S, k]`` top-k token ids per position, by descending log-prob.
            Ids are always ``< tokenizer vocab size`` (padded logit rows are dropped).
        topk_logprobs: float32 ``[S, k]`` their log-probs (descending along axis 1).
        tail_logmass: float32 ``[S]`` log of the mass of everything outside the top-k,
            ``logsumexp`` of the other ids' logits minus the normalizer (exact, no
            cancellation; the prompt-log-prob fallback computes ``log(1 - sum(exp(topk)))``
            in float64 instead); ``-inf`` when the top-k holds all the mass.
        sample_offsets: int32 ``[S + 1]`` or None; position ``s`` owns
            ``sample_ids[sample_offsets[s]:sample_offsets[s+1]]``.
        sample_ids: int32 ``[M]`` unique sampled ids per position, ascending.
        sample_counts: int32 ``[M]`` how many of the ``N`` draws hit each id.
        rollout_logprobs: float32 ``[S]`` or None. In a cache of ``kdcache rollout`` samples,
            where the gold token is the sampled one: its log-prob under the policy that
            sampled it (the student of that round, after temperature and top-p), so
            ``target_logprobs`` is the teacher's ``log p(x)`` and this is ``log mu(x)``.
    """

    seq_id: int
    source: str
    input_ids: np.ndarray
    target_positions: np.ndarray
    target_logprobs: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    tail_logmass: np.ndarray | None = None
    sample_offsets: np.ndarray | None = None
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None
    rollout_logprobs: np.ndarray | None = None

    @property
    def num_targets(self) -> int:
        return int(self.target_positions.shape[0])


def tail_logmass_from_topk(topk_logprobs: np.ndarray) -> np.ndarray:
    """``log(1 - sum_j exp(lp[..., j]))`` in float64, returned as float32; ``[S, k] -> [S]``.

    Uses ``log(-expm1(logsumexp))`` so tails far below float32 epsilon stay accurate.
    A top-k that sums to >= 1 (rounding) gives ``-inf``.
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    m = lp.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(lp - m).sum(axis=-1, keepdims=True)))[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(lse < 0, np.log(-np.expm1(np.minimum(lse, 0.0))), -np.inf)
    return tail.astype(np.float32)


#: Slack on "a log-prob is at most 0" and "the top-k and tail masses sum to 1" for values
#: computed in float32 (about 1e-6 in practice; a broken forward is off by far more).
MASS_TOLERANCE = 1e-3
#: The same slack for values read back from a shard: each top-k log-prob is quantized to
#: within 1/512 nat (``kdcache.cache.quantize``), i.e. its probability to within 0.2%.
QUANTIZED_MASS_TOLERANCE = MASS_TOLERANCE + float(np.expm1(1.0 / 512.0))
NONFINITE_HINT = ("non-finite or overflowing logits, usually a float16 forward that overflows; rerun with "
                  "--dtype bfloat16 or --dtype float32")


def scores_problem(scores: TeacherScores, tolerance: float = MASS_TOLERANCE) -> str | None:
    """One line naming the first impossible value in ``scores`` (``"<source> position <p>: ..."``),
    or None if every value is a possible distribution.

    Impossible: a NaN or +inf anywhere, a log-prob above 0, a target log-prob of -inf (the
    teacher gives the actual token zero probability), a top-k whose masses plus the tail's do
    not sum to 1 (within ``tolerance``). These are what a non-finite teacher forward
    produces; a cache must never hold them as if they were certainty. Values read back from
    a shard pass :data:`QUANTIZED_MASS_TOLERANCE`, which adds the log-prob quantization error.
    """
    def at(index: int) -> str:
        return f"{scores.source} position {int(scores.target_positions[index])}"

    with np.errstate(invalid="ignore", over="ignore"):
        target = np.asarray(scores.target_logprobs, dtype=np.float64)
        bad = ~np.isfinite(target) | (target > tolerance)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return f"{at(i)}: the teacher's log-prob of the actual token is {target[i]} ({NONFINITE_HINT})"
        if scores.topk_logprobs is not None and scores.topk_logprobs.size:
            top = np.asarray(scores.topk_logprobs, dtype=np.float64)
            tail = np.asarray(scores.tail_logmass, dtype=np.float64)
            bad_row = (~np.isfinite(top) | (top > tolerance)).any(axis=1) | np.isnan(tail) | (tail > tolerance)
            total = np.exp(top).sum(axis=1) + np.exp(tail)
            bad_row |= np.abs(total - 1.0) > tolerance
            if bad_row.any():
                i = int(np.flatnonzero(bad_row)[0])
                return (f"{at(i)}: the teacher's top-k log-probs {np.round(top[i], 4).tolist()} and tail log-mass {tail[i]} "
                        f"are no distribution (masses sum to {total[i]:.4g}) ({NONFINITE_HINT})")
    return None
