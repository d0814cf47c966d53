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
        tail_logmass: float32 ``[S]`` ``log(1 - sum(exp(topk_logprobs)))``, the mass of
            everything outside the top-k, computed in float64 from unquantized values;
            ``-inf`` when the top-k holds all the mass.
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
