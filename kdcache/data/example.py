"""The unit that flows from input data to the teacher: one tokenized sequence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TokenizedExample:
    """One input row after tokenization with the teacher's tokenizer.

    Attributes:
        seq_id: 0-based index of the row in the input stream (stable across runs and
            workers; skipped bad rows keep their index so shard boundaries never move).
        source: ``"path:row"`` (row 1-based) for error messages.
        input_ids: int32 ``[L]`` token ids, already truncated to ``max_length``.
        target_positions: int32 ``[S]`` ascending positions ``i`` (``1 <= i < L``) whose
            token ``input_ids[i]`` is supervised; the teacher distribution stored for it
            is ``p(. | input_ids[:i])``. Prompt / user / system tokens are never targets.
            In ``--mode generate`` this is empty and ``input_ids`` holds the prompt only.
        rollout_logprobs: float32 ``[S]`` or None. For a ``rollout`` row: the log-prob of each
            target token under the policy that sampled it (``kdcache rollout``), aligned with
            ``target_positions``; it travels with the example into the cache.
    """

    seq_id: int
    source: str
    input_ids: np.ndarray
    target_positions: np.ndarray
    rollout_logprobs: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
