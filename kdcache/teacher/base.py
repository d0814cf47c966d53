"""The contract every teacher backend (vLLM, transformers) fulfils."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from kdcache.cache.records import TeacherScores
from kdcache.data.example import TokenizedExample


@dataclass(frozen=True)
class ScoringSettings:
    """What to extract per supervised position.

    Attributes:
        top_k: number of top log-probs stored per position (0 disables top-k).
        num_samples: ``N`` draws per position for Random-Sampling KD (0 disables).
        sample_tail: draw from the teacher's distribution restricted to the ids outside the
            position's top-k (``--sampling tail``) instead of the full distribution.
        draws: "systematic" or "iid" (``--draws``; see ``kdcache.teacher.statistics.draw_points``).
        seed: base seed; a position's draws use uniforms keyed by ``(seed, seq_id, position)``
            (``kdcache.teacher.statistics.counter_uniforms``), so results never depend on
            batching, worker layout or the engine.
    """

    top_k: int = 64
    num_samples: int = 0
    seed: int = 0
    sample_tail: bool = False
    draws: str = "systematic"


class TeacherBackend(abc.ABC):
    """Scores tokenized sequences with a teacher and returns sparse distributions.

    ``vocab_size`` is the tokenizer's vocabulary (``len(tokenizer)``); ids at or above it
    (padded logit rows) never appear in results.
    """

    name: str
    vocab_size: int

    @abc.abstractmethod
    def describe(self) -> dict:
        """Manifest ``teacher`` entry: path/id, revision or config hash, dtype, quantization."""

    @abc.abstractmethod
    def score(self, examples: Sequence[TokenizedExample], settings: ScoringSettings,
              progress: Callable[[int], None] | None = None) -> Iterator[TeacherScores]:
        """Teacher-forced scoring; yields one result per example, in input order.

        ``progress(n)`` is called as ``n`` more examples finish scoring (a live progress bar
        while a whole shard is in the engine at once)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (GPU memory, engine processes)."""
