"""Where each global batch comes from: one cache, or two caches mixed at a fixed share.

A run trains on ``--cache`` alone, or on ``--cache`` and ``--mix-cache`` together. Mixed,
every global batch of ``B = --global-batch-size`` sequences takes ``n = round(lmbda * B)``
sequences from ``--cache`` and ``B - n`` from ``--mix-cache`` (``--lmbda``), each source with
its own loss (``--loss``, ``--mix-loss``). With ``--cache`` a cache of the student's own
samples (a ``kdcache rollout`` scored by the teacher) and ``--mix-cache`` one of fixed data,
``lmbda`` is GKD's ``lambda``, the share of student-generated sequences in each batch
(Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", Algorithm 1, which draws the whole batch from one source with
probability ``lambda``; here every batch holds both, in the fixed proportion ``n / B``, so the
order is deterministic and no batch goes without either kind).

Each source is its own stream in the order :mod:`kdcache.student.data` defines (seeded by
``--seed``, by shard windows, resumable from a :class:`~kdcache.student.data.DataPosition`),
with its own epochs: ``--epochs`` counts passes over ``--cache``, and ``--mix-cache`` is
cycled (or left partly unseen) as the steps require. A checkpoint stores both positions, so
``--resume`` continues both streams exactly.

The loss of a step is the sum of every supervised token's loss, each under its source's loss,
divided by the supervised tokens of the whole global batch: both sources and all ranks
(:func:`kdcache.student.train.forward_backward`). A token weighs the same whichever source it
comes from, so a source's share of the gradient is its share of the batch's tokens (responses
of different lengths in the two sources shift it away from ``lmbda``; the metrics report
each source's tokens).

Under a launcher each source's share is split over the ranks as a single source is
(:class:`~kdcache.student.data.RankBatches`): sequence ``i`` of the share goes to rank
``i % world_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kdcache.cache.reader import CacheReader
from kdcache.errors import KdcacheError
from kdcache.student.data import DataPosition, GlobalBatches, MicroBatch, RankBatches, micro_batches, padding_micro_batch
from kdcache.student.losses import KDLossConfig

#: Metric suffix of each source in a mixed run's log (``kd_cache``, ``kd_mix``, ...).
SOURCE_LABELS = ("cache", "mix")


@dataclass(frozen=True)
class Source:
    """One training cache, the loss trained on it, and its share of every global batch.

    Attributes:
        flag: the option that named the cache (``--cache`` or ``--mix-cache``), for messages.
        reader: the cache.
        loss_config: its loss.
        batch_size: sequences it gives each global batch.
    """

    flag: str
    reader: CacheReader
    loss_config: KDLossConfig
    batch_size: int

    def micro_batches(self, seqs: list, max_tokens: int) -> list[MicroBatch]:
        """``seqs`` packed into micro-batches with the targets this source's loss needs."""
        c = self.loss_config
        return micro_batches(seqs, max_tokens, self.reader.top_k, self.reader.num_samples, c.needs_samples,
                             c.needs_rollout)

    def padding(self) -> MicroBatch:
        """An empty micro-batch this source's loss accepts (:func:`~kdcache.student.data.padding_micro_batch`)."""
        return padding_micro_batch(self.reader.top_k, self.loss_config.needs_samples, self.loss_config.needs_rollout)


def batch_shares(global_batch_size: int, lmbda: float) -> tuple[int, int]:
    """``(from --cache, from --mix-cache)`` sequences per global batch: ``n = round(lmbda * B)``
    (Python's round: halves to even) and ``B - n``.

    Raises:
        KdcacheError: either share is empty (names the flags and the smallest batch that works).
    """
    n = round(lmbda * global_batch_size)
    if n < 1 or n >= global_batch_size:
        least = next((b for b in range(global_batch_size + 1, 100_000) if 1 <= round(lmbda * b) < b), None)
        hint = f"raise --global-batch-size, e.g. to {least}" if least else "use an --lmbda further from 0 and 1"
        raise KdcacheError(
            f"--lmbda {lmbda:g} of --global-batch-size {global_batch_size} gives {n} sequence(s) from --cache and "
            f"{global_batch_size - n} from --mix-cache; both need at least one ({hint})"
        )
    return n, global_batch_size - n


@dataclass
class StepBatch:
    """This rank's part of one global batch.

    Attributes:
        micro: packed micro-batches, those of the first source first.
        loss_configs: the loss of each micro-batch (its source's).
        source_of: the source index of each micro-batch.
        sequences: sequences of each source in the *global* batch.
        epochs: the epoch of each source's sequences.
    """

    micro: list[MicroBatch]
    loss_configs: list[KDLossConfig]
    source_of: list[int]
    sequences: list[int]
    epochs: list[int]

    def tokens(self, num_sources: int) -> list[int]:
        """Supervised tokens of each source in this rank's micro-batches."""
        counts = [0] * num_sources
        for mb, index in zip(self.micro, self.source_of):
            counts[index] += mb.num_targets
        return counts


class SourceBatches:
    """The global batches of all sources (single process) or this rank's parts of them.

    ``next()`` returns a :class:`StepBatch`; afterwards ``positions`` holds where each source's
    next share starts (what a checkpoint stores).
    """

    def __init__(self, sources: Sequence[Source], starts: Sequence[DataPosition], *, seed: int, window_shards: int,
                 shuffle: bool, micro_batch_tokens: int, rank: int = 0, world_size: int = 1) -> None:
        self.sources = list(sources)
        self.micro_batch_tokens = micro_batch_tokens
        self.distributed = world_size > 1
        self._streams = [
            RankBatches(s.reader, s.batch_size, seed, start, window_shards, shuffle, rank, world_size) if self.distributed
            else GlobalBatches(s.reader, s.batch_size, seed, start, window_shards, shuffle)
            for s, start in zip(self.sources, starts)
        ]

    @property
    def positions(self) -> list[DataPosition]:
        return [stream.position for stream in self._streams]

    def pad(self, batch: StepBatch, num_micro: int) -> None:
        """Append empty micro-batches (of the first source) up to ``num_micro``: every rank runs as
        many forward passes as the busiest one."""
        missing = num_micro - len(batch.micro)
        if missing > 0:
            first = self.sources[0]
            batch.micro += [first.padding()] * missing
            batch.loss_configs += [first.loss_config] * missing
            batch.source_of += [0] * missing

    def __iter__(self) -> SourceBatches:
        return self

    def __next__(self) -> StepBatch:
        batch = StepBatch([], [], [], [], [])
        for index, (source, stream) in enumerate(zip(self.sources, self._streams)):
            if self.distributed:
                seqs, epoch, taken = next(stream)
            else:
                seqs, epoch = next(stream)
                taken = len(seqs)
            micro = source.micro_batches(seqs, self.micro_batch_tokens)
            batch.micro += micro
            batch.loss_configs += [source.loss_config] * len(micro)
            batch.source_of += [index] * len(micro)
            batch.sequences.append(taken)
            batch.epochs.append(epoch)
        return batch


def check_lmbda(lmbda: float | None, mix_cache: str | None) -> None:
    """``--lmbda`` goes with ``--mix-cache`` and lies strictly between 0 and 1."""
    if mix_cache is None:
        if lmbda is not None:
            raise KdcacheError("--lmbda is the share of each global batch drawn from --cache; it needs --mix-cache "
                               "(the data the rest comes from)")
        return
    if lmbda is None:
        raise KdcacheError("--mix-cache needs --lmbda, the share of each global batch drawn from --cache (e.g. 0.5)")
    if not 0.0 < lmbda < 1.0:
        raise KdcacheError(f"--lmbda must be in (0, 1) with --mix-cache, got {lmbda:g} (for all of one cache, train "
                           "on it alone: leave out --mix-cache and --lmbda)")


def source_metrics(metrics: dict[str, float], sources: Sequence[Source], tokens: Sequence[int]) -> dict[str, float]:
    """A step's metrics as logged: :func:`~kdcache.student.train.forward_backward`'s sums over the
    global batch's tokens, with the ``rkl``/``clip_frac`` of the policy-gradient loss and each
    source's ``kd_<label>``/``ce_<label>`` (mixed runs) turned into means over *their* tokens.

    Args:
        metrics: sums divided by ``sum(tokens)``, summed over ranks.
        sources: the run's sources.
        tokens: each source's supervised tokens in the global batch.
    """
    total = sum(tokens)
    out = dict(metrics)
    policy = sum(n for source, n in zip(sources, tokens) if source.loss_config.needs_rollout)
    for key in ("rkl", "clip_frac"):
        if key in out:
            out[key] = out[key] * total / policy if policy else float("nan")
    for label, n in zip(SOURCE_LABELS, tokens):
        for key in ("kd", "ce"):
            name = f"{key}_{label}"
            if name in out:
                out[name] = out[name] * total / n if n else float("nan")
    return out
