"""Training data from a cache: a deterministic, resumable sequence order and packed micro-batches.

Order. An epoch visits the cache's shards in an order drawn from ``[seed, epoch]``, in
*windows* of ``window_shards`` shards: a window is decoded into memory (never more than that),
its sequences are permuted with ``[seed, epoch, window]``, and yielded one by one. The
position after any sequence is ``DataPosition(epoch, window, offset)``, which is all a
checkpoint needs to restart at exactly the next sequence: the window is decoded again and
``offset`` sequences are skipped.

Packing. A global batch (``--global-batch-size`` sequences) is split into micro-batches of at
most ``--micro-batch-tokens`` tokens by first-fit-decreasing bin packing. The sequences of a
micro-batch are concatenated into one row; ``position_ids`` restart at 0 for each sequence
and the model gets an attention mask (or varlen metadata) that stops attention across
sequence boundaries (see :mod:`kdcache.student.modeling`).

Only the tokens the loss needs are fed: the hidden state at position ``t - 1`` predicts the
target at ``t``, so a sequence contributes ``input_ids[:max(target_positions)]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from kdcache.cache.reader import CacheReader, decode_batch
from kdcache.cache.records import TeacherScores
from kdcache.errors import KdcacheError, first_line
from kdcache.student.losses import TeacherTargets


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: the next sequence is ``offset`` in window ``window`` of ``epoch``."""

    epoch: int = 0
    window: int = 0
    offset: int = 0

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset}

    @classmethod
    def from_json(cls, data: dict) -> DataPosition:
        return cls(int(data["epoch"]), int(data["window"]), int(data["offset"]))


def input_length(seq: TeacherScores) -> int:
    """Tokens of ``seq`` fed to the model: ``max(target_positions)`` (0 without targets)."""
    return int(seq.target_positions[-1]) if seq.num_targets else 0


def epoch_windows(num_shards: int, seed: int, epoch: int, window_shards: int, shuffle: bool) -> list[list[int]]:
    """Shard indices of each window of ``epoch``, in visiting order."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(num_shards) if shuffle else np.arange(num_shards)
    step = max(1, window_shards)
    return [order[i : i + step].tolist() for i in range(0, num_shards, step)]


def iter_epoch(
    reader: CacheReader,
    seed: int,
    epoch: int,
    start: DataPosition | None = None,
    window_shards: int = 1,
    shuffle: bool = True,
) -> Iterator[tuple[TeacherScores, DataPosition]]:
    """Yield ``(sequence, position after it)`` for one epoch, from ``start`` on.

    Holds one window of decoded shards in memory at a time. Sequences without targets
    (none in a valid cache) are skipped.
    """
    start = start if start is not None and start.epoch == epoch else DataPosition(epoch)
    windows = epoch_windows(len(reader.shards), seed, epoch, window_shards, shuffle)
    # From an object store, the shards after the one being trained on are fetched in the
    # background (the next epoch's first window too, so the epoch boundary does not wait).
    following = epoch_windows(len(reader.shards), seed, epoch + 1, window_shards, shuffle)[:1]
    reader.read_ahead([i for window in windows[start.window:] + following for i in window])
    for w in range(start.window, len(windows)):
        seqs = list(reader.iter_sequences(windows[w]))
        order = np.random.default_rng([seed, epoch, 1, w]).permutation(len(seqs)) if shuffle else np.arange(len(seqs))
        first = start.offset if w == start.window else 0
        for j in range(first, len(seqs)):
            seq = seqs[int(order[j])]
            if seq.num_targets:
                yield seq, DataPosition(epoch, w, j + 1)
        del seqs


class GlobalBatches:
    """Endless stream of global batches of ``batch_size`` sequences.

    ``next()`` returns ``(sequences, epoch)``; afterwards ``position`` is where the next
    batch starts, which is what a checkpoint stores. A batch never spans two epochs: the
    last batch of an epoch may be smaller.
    """

    def __init__(
        self,
        reader: CacheReader,
        batch_size: int,
        seed: int,
        start: DataPosition = DataPosition(),
        window_shards: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.reader = reader
        self.batch_size = batch_size
        self.seed = seed
        self.window_shards = window_shards
        self.shuffle = shuffle
        self.position = start
        self._stream = self._open(start)

    def _open(self, start: DataPosition) -> Iterator[tuple[TeacherScores, DataPosition]]:
        return iter_epoch(self.reader, self.seed, start.epoch, start, self.window_shards, self.shuffle)

    def __iter__(self) -> GlobalBatches:
        return self

    def __next__(self) -> tuple[list[TeacherScores], int]:
        batch: list[TeacherScores] = []
        for _ in range(2):  # a second try when the epoch ended exactly at a batch boundary
            for seq, pos in self._stream:
                batch.append(seq)
                self.position = pos
                if len(batch) == self.batch_size:
                    return batch, pos.epoch
            epoch = self.position.epoch
            self.position = DataPosition(epoch + 1)
            self._stream = self._open(self.position)
            if batch:
                return batch, epoch
        raise KdcacheError(f"{self.reader.path}: the cache yields no sequences with supervised tokens")


def read_rows(reader: CacheReader, shard_index: int, rows: list[int]) -> list[TeacherScores]:
    """Decode only ``rows`` (0-based, within the shard) of one shard, in the order given.

    The shard is checked and read as a whole (Parquet pages), but only these rows are
    decoded into :class:`TeacherScores` (``table.take`` before kdcache's decode), so ranks
    that split a shard's rows each pay for their own part of the decoding.
    """
    if not rows:
        return []
    shard = reader.shards[shard_index]
    pf, id_table = reader.open_shard(shard)
    path = reader.shard_path(shard)
    try:
        table = pf.read().take(np.asarray(rows, dtype=np.int64))
        return [seq for batch in table.to_batches() for seq in decode_batch(batch, id_table, reader.top_k)]
    except KdcacheError:
        raise
    except Exception as exc:  # damaged pages surface as ArrowInvalid/OSError
        raise KdcacheError(f"{path}: damaged shard ({first_line(exc)}); run `kdcache verify`") from exc


class RankBatches:
    """This rank's share of the global batches of :class:`GlobalBatches`, read without the rest.

    The global order is the one :func:`iter_epoch` gives (it does not depend on the number of
    ranks); global batch ``b`` is the sequences at epoch positions ``[b*B, (b+1)*B)``. Its
    ``i``-th sequence belongs to rank ``i % world_size``, so the ranks' parts are disjoint and
    together are the global batch. A window is read when it is reached and only this rank's
    rows of it are decoded (:func:`read_rows`); they are kept until the window is done (memory:
    ``1 / world_size`` of a window). ``position`` after ``next()`` is the same
    :class:`DataPosition` a single process records, so a checkpoint resumes on any number of
    ranks. Sequences without targets (none in a valid cache) keep their slot here but carry no
    loss.

    ``next()`` returns ``(sequences of this rank, epoch, size of the global batch)``.
    """

    def __init__(self, reader: CacheReader, batch_size: int, seed: int, start: DataPosition = DataPosition(),
                 window_shards: int = 1, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if len(reader) == 0:
            raise KdcacheError(f"{reader.path}: the cache yields no sequences with supervised tokens")
        self.reader, self.batch_size, self.seed = reader, batch_size, seed
        self.window_shards, self.shuffle, self.rank, self.world_size = window_shards, shuffle, rank, world_size
        self.position = start
        self._window_key: tuple[int, int] | None = None
        self._rows: dict[int, TeacherScores] = {}

    def _windows(self, epoch: int) -> list[list[int]]:
        return epoch_windows(len(self.reader.shards), self.seed, epoch, self.window_shards, self.shuffle)

    def _window_size(self, shards: list[int]) -> int:
        return sum(int(self.reader.shards[i]["rows"]) for i in shards)

    def _load_window(self, epoch: int, w: int, shards: list[int], first_pos: int) -> None:
        """Decode this rank's rows of window ``w`` (epoch position of its first row: ``first_pos``)."""
        n = self._window_size(shards)
        order = np.random.default_rng([self.seed, epoch, 1, w]).permutation(n) if self.shuffle else np.arange(n)
        offsets = np.arange(n)
        mine = offsets[((first_pos + offsets) % self.batch_size) % self.world_size == self.rank]
        starts = np.cumsum([0] + [int(self.reader.shards[i]["rows"]) for i in shards])
        local = order[mine]  # row index within the window, shards concatenated in window order
        which = np.searchsorted(starts, local, side="right") - 1
        self._rows = {}
        for k, shard_index in enumerate(shards):
            sel = np.flatnonzero(which == k)
            rows = (local[sel] - starts[k]).tolist()
            order_rows = np.argsort(rows, kind="stable")  # read in stored order
            seqs = read_rows(self.reader, shard_index, [rows[i] for i in order_rows])
            for i, seq in zip(order_rows, seqs):
                self._rows[int(mine[sel[i]])] = seq
        self._window_key = (epoch, w)

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> tuple[list[TeacherScores], int, int]:
        pos = self.position
        windows = self._windows(pos.epoch)
        sizes = [self._window_size(s) for s in windows]
        if pos.window >= len(windows) or (pos.window == len(windows) - 1 and pos.offset >= sizes[-1]):
            pos = DataPosition(pos.epoch + 1)
            windows = self._windows(pos.epoch)
            sizes = [self._window_size(s) for s in windows]
        epoch, w, offset = pos.epoch, pos.window, pos.offset
        epoch_pos = sum(sizes[:w]) + offset
        batch: list[TeacherScores] = []
        taken = 0
        while taken < self.batch_size and w < len(windows):
            if offset >= sizes[w]:
                w, offset = w + 1, 0
                continue
            if self._window_key != (epoch, w):
                self._load_window(epoch, w, windows[w], epoch_pos - offset)
            if ((epoch_pos) % self.batch_size) % self.world_size == self.rank:
                batch.append(self._rows.pop(offset))
            offset += 1
            epoch_pos += 1
            taken += 1
        # As GlobalBatches: a batch cut short by the end of the epoch leaves the next epoch's start.
        self.position = DataPosition(epoch + 1) if w >= len(windows) else DataPosition(epoch, w, offset)
        return batch, epoch, taken


# ------------------------------------------------------------------------------- packing


def pack_sequences(seqs: list[TeacherScores], max_tokens: int) -> list[list[TeacherScores]]:
    """First-fit-decreasing: bins of at most ``max_tokens`` input tokens (deterministic).

    Raises:
        KdcacheError: a sequence alone is longer than ``max_tokens``.
    """
    bins: list[list[TeacherScores]] = []
    room: list[int] = []
    lengths = [input_length(s) for s in seqs]
    for i in sorted(range(len(seqs)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > max_tokens:
            raise KdcacheError(
                f"{seqs[i].source}: sequence needs {n} tokens, more than --micro-batch-tokens {max_tokens}; "
                "raise --micro-batch-tokens (when training, with --gradient-checkpointing if memory is short)"
            )
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(seqs[i])
                room[b] -= n
                break
        else:
            bins.append([seqs[i]])
            room.append(max_tokens - n)
    return bins


@dataclass
class MicroBatch:
    """Packed sequences of one forward pass.

    Attributes:
        input_ids: int64 ``[1, T]`` the sequences' input tokens, concatenated.
        position_ids: int64 ``[1, T]`` restarting at 0 for each sequence.
        seq_lengths: tokens per packed sequence (they sum to ``T``).
        hidden_index: int64 ``[N]`` rows of the ``[T]`` hidden states that predict the ``N``
            supervised tokens (``offset + t - 1`` for target position ``t``).
        gold_ids: int64 ``[N]`` the supervised tokens themselves.
        targets: the teacher's cached distributions for the ``N`` positions.
        teacher_logprobs: float32 ``[N]`` teacher log-prob of each gold token (the same tensor
            as ``targets.target_logprobs``).
    """

    input_ids: Tensor
    position_ids: Tensor
    seq_lengths: list[int]
    hidden_index: Tensor
    gold_ids: Tensor
    targets: TeacherTargets
    teacher_logprobs: Tensor

    @property
    def num_targets(self) -> int:
        return int(self.gold_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device) -> MicroBatch:
        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device, non_blocking=True)

        teacher_logprobs = move(self.teacher_logprobs)
        return MicroBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            seq_lengths=self.seq_lengths,
            hidden_index=move(self.hidden_index),
            gold_ids=move(self.gold_ids),
            targets=TeacherTargets(
                topk_ids=move(self.targets.topk_ids),
                topk_logprobs=move(self.targets.topk_logprobs),
                tail_logmass=move(self.targets.tail_logmass),
                sample_ids=move(self.targets.sample_ids),
                sample_weights=move(self.targets.sample_weights),
                target_logprobs=teacher_logprobs,
                rollout_logprobs=move(self.targets.rollout_logprobs),
            ),
            teacher_logprobs=teacher_logprobs,
        )


def _padded_samples(seqs: list[TeacherScores], num_draws: int) -> tuple[Tensor, Tensor]:
    """Sampled ids/weights of all positions as ``[N, m]`` (ids -1 and weight 0 as padding)."""
    per_pos = np.concatenate([np.diff(s.sample_offsets) for s in seqs]).astype(np.int64)
    ids = np.concatenate([s.sample_ids for s in seqs]).astype(np.int64)
    counts = np.concatenate([s.sample_counts for s in seqs]).astype(np.float32)
    width = max(int(per_pos.max(initial=0)), 1)
    rows = np.repeat(np.arange(per_pos.shape[0]), per_pos)
    starts = np.cumsum(per_pos) - per_pos
    cols = np.arange(ids.shape[0]) - np.repeat(starts, per_pos)
    out_ids = np.full((per_pos.shape[0], width), -1, dtype=np.int64)
    out_w = np.zeros((per_pos.shape[0], width), dtype=np.float32)
    out_ids[rows, cols] = ids
    out_w[rows, cols] = counts / float(num_draws)
    return torch.from_numpy(out_ids), torch.from_numpy(out_w)


def build_micro_batch(
    seqs: list[TeacherScores], top_k: int, num_draws: int = 0, with_samples: bool = False, with_rollout: bool = False
) -> MicroBatch:
    """Concatenate ``seqs`` into one packed row with their targets (CPU tensors).

    ``targets.target_logprobs`` is always set (the teacher's log-prob of each gold token);
    ``targets.rollout_logprobs`` (the sampling policy's, in a cache of ``kdcache rollout``
    samples) whenever every sequence carries it.

    Args:
        top_k: the cache's top-k (0: no top-k targets).
        num_draws: ``N`` draws per position of a sampling cache (weights are ``count / N``).
        with_samples: also build the sampled targets (``rs_kd``).
        with_rollout: the rollout log-probs are required (``sampled_rkl``).

    Raises:
        KdcacheError: a target the loss needs is not in the cache (names the sequence).
    """
    lengths = [input_length(s) for s in seqs]
    offsets = np.cumsum([0] + lengths[:-1])
    input_ids = np.concatenate([s.input_ids[:n] for s, n in zip(seqs, lengths)]).astype(np.int64)
    position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    hidden_index = np.concatenate(
        [o + s.target_positions.astype(np.int64) - 1 for s, o in zip(seqs, offsets)]
    )
    gold = np.concatenate([s.input_ids[s.target_positions] for s in seqs]).astype(np.int64)
    targets = TeacherTargets()
    if top_k > 0:
        targets.topk_ids = torch.from_numpy(np.concatenate([s.topk_ids for s in seqs]).astype(np.int64))
        targets.topk_logprobs = torch.from_numpy(np.concatenate([s.topk_logprobs for s in seqs]).astype(np.float32))
        targets.tail_logmass = torch.from_numpy(np.concatenate([s.tail_logmass for s in seqs]).astype(np.float32))
    if with_samples:
        if any(s.sample_offsets is None for s in seqs):
            raise KdcacheError(f"{seqs[0].source}: the cache holds no sampled tokens (needed by --loss rs_kd)")
        targets.sample_ids, targets.sample_weights = _padded_samples(seqs, num_draws)
    targets.target_logprobs = torch.from_numpy(np.concatenate([s.target_logprobs for s in seqs]).astype(np.float32))
    missing = next((s for s in seqs if s.rollout_logprobs is None), None)
    if missing is None:
        targets.rollout_logprobs = torch.from_numpy(np.concatenate([s.rollout_logprobs for s in seqs]).astype(np.float32))
    elif with_rollout:
        raise KdcacheError(f"{missing.source}: the cache holds no rollout log-probs (needed by --loss sampled_rkl); "
                           "train sampled_rkl on a cache of `kdcache rollout` samples")
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids)[None],
        position_ids=torch.from_numpy(position_ids)[None],
        seq_lengths=lengths,
        hidden_index=torch.from_numpy(hidden_index),
        gold_ids=torch.from_numpy(gold),
        targets=targets,
        teacher_logprobs=targets.target_logprobs,
    )


def padding_micro_batch(top_k: int, with_samples: bool = False, with_rollout: bool = False) -> MicroBatch:
    """A one-token micro-batch without targets: what a rank runs while another still has work
    (its loss and gradients are exactly zero, but FSDP2's gathers and reductions take place)."""
    empty = torch.zeros(0, dtype=torch.int64)
    no_logprobs = torch.zeros(0, dtype=torch.float32)
    targets = TeacherTargets()
    if top_k > 0:
        targets.topk_ids = torch.zeros((0, top_k), dtype=torch.int64)
        targets.topk_logprobs = torch.zeros((0, top_k), dtype=torch.float32)
        targets.tail_logmass = torch.zeros(0, dtype=torch.float32)
    if with_samples:
        targets.sample_ids = torch.full((0, 1), -1, dtype=torch.int64)
        targets.sample_weights = torch.zeros((0, 1), dtype=torch.float32)
    targets.target_logprobs = no_logprobs
    if with_rollout:
        targets.rollout_logprobs = torch.zeros(0, dtype=torch.float32)
    return MicroBatch(
        input_ids=torch.zeros((1, 1), dtype=torch.int64), position_ids=torch.zeros((1, 1), dtype=torch.int64),
        seq_lengths=[1], hidden_index=empty, gold_ids=empty, targets=targets, teacher_logprobs=no_logprobs,
    )


def micro_batches(
    seqs: list[TeacherScores], max_tokens: int, top_k: int, num_draws: int = 0, with_samples: bool = False,
    with_rollout: bool = False,
) -> list[MicroBatch]:
    """Pack a global batch into micro-batches of at most ``max_tokens`` tokens."""
    return [build_micro_batch(b, top_k, num_draws, with_samples, with_rollout) for b in pack_sequences(seqs, max_tokens)]


def iter_eval_batches(
    reader: CacheReader,
    max_tokens: int,
    with_samples: bool = False,
    max_sequences: int | None = None,
    group_sequences: int = 256,
    rank: int = 0,
    world_size: int = 1,
    with_rollout: bool = False,
) -> Iterator[MicroBatch]:
    """The cache in stored order, packed ``group_sequences`` at a time (streaming).

    With ``world_size > 1``, this rank's share only: sequence ``i`` (stored order, among the
    first ``max_sequences``) belongs to rank ``i % world_size``, and only those rows are decoded.
    """
    group: list[TeacherScores] = []
    for seq in _eval_sequences(reader, max_sequences, rank, world_size):
        group.append(seq)
        if len(group) == group_sequences:
            yield from micro_batches(group, max_tokens, reader.top_k, reader.num_samples, with_samples, with_rollout)
            group = []
    if group:
        yield from micro_batches(group, max_tokens, reader.top_k, reader.num_samples, with_samples, with_rollout)


def _eval_sequences(reader: CacheReader, max_sequences: int | None, rank: int, world_size: int) -> Iterator[TeacherScores]:
    if world_size == 1:
        seen = 0
        for seq in reader.iter_sequences():
            if max_sequences is not None and seen >= max_sequences:
                return
            if seq.num_targets:
                seen += 1
                yield seq
        return
    limit = len(reader) if max_sequences is None else min(max_sequences, len(reader))
    first = 0
    for index, shard in enumerate(reader.shards):
        rows = [r for r in range(int(shard["rows"])) if first + r < limit and (first + r) % world_size == rank]
        first += int(shard["rows"])
        for seq in read_rows(reader, index, rows):
            if seq.num_targets:
                yield seq
        if first >= limit:
            return
