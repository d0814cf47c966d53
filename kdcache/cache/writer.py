"""Encode teacher results into cache-format shards and write them atomically.

A shard is written whole (in a local directory: to ``.part-NNNNN.parquet.tmp-<pid>``,
fsynced, then renamed; on an object store: one upload, which appears whole or not at all,
see :mod:`kdcache.cache.storage`); its record (``part-NNNNN.json``: counts, bytes, sha256) is
written the same way *after* the shard. A shard counts as finished only when its record
exists and matches the shard's size, so a job killed at any instant leaves either nothing or
a complete, verifiable shard.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from kdcache.cache import format as fmt
from kdcache.cache.quantize import quantize_logprobs
from kdcache.cache.records import TeacherScores
from kdcache.cache.storage import Store, open_store
from kdcache.errors import KdcacheError


# Entries per step of the chunked encoders: about 1 MB of float32, small enough for the
# passes over one chunk to stay in the CPU cache (2x faster than whole-shard passes).
_CHUNK_ENTRIES = 1 << 18


@dataclass
class ShardRecord:
    """What the manifest keeps about one finished shard (also its sidecar JSON)."""

    index: int
    file: str
    rows: int
    first_seq_id: int
    last_seq_id: int
    supervised_tokens: int
    topk_entries: int
    sample_entries: int
    bytes: int
    sha256: str
    skipped: list[dict] = field(default_factory=list)
    topk_mass_sum: float = 0.0  # sum over positions of the top-k probability mass
    # Longest model input of the shard (tokens up to its last supervised position): stage two
    # checks it against --micro-batch-tokens before training. 0 in shards of kdcache <= 0.2.
    max_input_tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _byte_plane(offsets: np.ndarray, plane: np.ndarray | None) -> pa.BinaryArray:
    """A binary column whose row ``i`` is ``plane[offsets[i]:offsets[i+1]]`` (zero-copy)."""
    data = np.ascontiguousarray(plane if plane is not None else np.zeros(0, np.uint8))
    return pa.BinaryArray.from_buffers(
        pa.binary(), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    if out[-1] > np.iinfo(np.int32).max:
        raise KdcacheError("shard too large for 32-bit list offsets; lower --shard-size")
    return out.astype(np.int32)


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def frequency_id_table(*id_arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shard's id table and its inverse, from every id the shard stores (top-k and samples).

    Returns ``(id_table uint32 [n_ids], code_of uint32 [max_id + 1])``: ``id_table`` lists
    the distinct ids, most frequent first, and ``code_of[id_table] == arange(n_ids)``.
    Frequent ids get small codes, which is what makes the high bytes of the codes (and
    the gaps between sorted codes) compress to almost nothing.
    """
    arrays = [a.reshape(-1) for a in id_arrays if a.size]
    if not arrays:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint32)
    counts = np.zeros(max(int(a.max()) for a in arrays) + 1, dtype=np.int64)
    for ids in arrays:
        # bincount widens its input to int64: in cache-sized chunks that copy stays cheap
        for start in range(0, ids.shape[0], _CHUNK_ENTRIES):
            counts += np.bincount(ids[start:start + _CHUNK_ENTRIES], minlength=counts.shape[0])
    present = np.flatnonzero(counts)
    id_table = present[np.argsort(-counts[present], kind="stable")].astype(np.uint32)
    code_of = np.zeros(counts.shape[0], dtype=np.uint32)
    code_of[id_table] = np.arange(id_table.shape[0], dtype=np.uint32)
    return id_table, code_of


def encode_topk(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, code_of: np.ndarray, code_bytes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``[P, k]`` top-k ids/log-probs (descending) of a whole shard into byte planes.

    Returns ``(code_planes uint8 [code_bytes, P*k], gap_planes uint8 [2, P*k])``: plane ``b``
    holds byte ``b`` (least significant first) of each id's code in the shard's id table,
    and of the log-prob gaps (per position, the top-1 log-prob code, then the gaps between
    consecutive codes). ``code_bytes`` is 2, or 3 when the id table has more than 65536 ids.
    Works through the shard a few thousand positions at a time so that every pass (quantize,
    difference, gather, plane split) runs on data still in the CPU cache.
    """
    n_pos, k = topk_ids.shape
    code_planes = np.empty((code_bytes, n_pos * k), np.uint8)
    gap_planes = np.empty((2, n_pos * k), np.uint8)
    if topk_ids.size == 0:
        return code_planes, gap_planes
    code_of = code_of.astype("<u2" if code_bytes == 2 else "<u4", copy=False)
    stride = code_of.dtype.itemsize
    gaps = np.empty((max(1, _CHUNK_ENTRIES // k), k), "<u2")
    for start in range(0, n_pos, gaps.shape[0]):
        stop = min(n_pos, start + gaps.shape[0])
        entries = slice(start * k, stop * k)
        q = quantize_logprobs(topk_logprobs[start:stop])
        if (q[:, 1:] < q[:, :-1]).any():
            raise KdcacheError("top-k log-probs must be sorted in descending order per position (backend bug)")
        g = gaps[: stop - start]
        g[:, 0] = q[:, 0]
        np.subtract(q[:, 1:], q[:, :-1], out=g[:, 1:])
        gap_planes[:, entries] = g.reshape(-1).view(np.uint8).reshape(-1, 2).T
        codes = code_of[topk_ids[start:stop].reshape(-1)]
        code_planes[:, entries] = codes.view(np.uint8).reshape(-1, stride)[:, :code_bytes].T
    return code_planes, gap_planes


def encode_samples(
    lengths: np.ndarray, sample_ids: np.ndarray, counts: np.ndarray, code_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Encode the unique sampled ids of a shard's ``P`` positions.

    Args:
        lengths: int ``[P]`` unique ids per position.
        sample_ids: int ``[M]`` the ids, position after position (any order within one).
        counts: int ``[M]`` draws that hit each id.
        code_of: the shard's id -> code map (:func:`frequency_id_table`).

    Returns ``(code_gaps uint32 [M], counts uint16 [M])``: per position the codes in
    ascending order, stored as the first code then the gaps, and the counts in that order.
    """
    if sample_ids.size == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint16)
    position = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    codes = code_of[sample_ids].astype(np.int64)
    order = np.argsort((position << 32) | codes, kind="stable")
    codes = codes[order]
    code_gaps = np.diff(codes, prepend=0)
    starts = np.zeros(lengths.shape[0], dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    starts = starts[lengths > 0]
    code_gaps[starts] = codes[starts]
    return code_gaps.astype("<u4"), np.asarray(counts)[order].astype("<u2")


def encode_id_table(id_table: np.ndarray) -> bytes:
    """Footer form of the id table: base64(zstd(byte planes of the int32 deltas of the table)).

    Ids of equal frequency are listed in ascending order, so most deltas are small; a 20k-id
    table takes ~14 KB instead of ~44 KB as raw uint32.
    """
    deltas = np.diff(np.asarray(id_table, dtype=np.int64), prepend=0).astype("<i4")
    planes = deltas.view(np.uint8).reshape(-1, 4).T.tobytes()
    # level 9: within 4% of level 19 on real tables and 15-25x faster (1.4 ms for 49k ids)
    return base64.b64encode(zstandard.ZstdCompressor(level=9).compress(planes))


def build_shard_table(results: Sequence[TeacherScores], top_k: int) -> tuple[pa.Table, dict[bytes, bytes], dict]:
    """Arrow table + footer metadata + counts for one shard's results (seq_id order kept)."""
    n_targets = [r.num_targets for r in results]
    targets_off = _offsets(n_targets)
    has_topk = top_k > 0
    has_samples = any(r.sample_offsets is not None for r in results)

    cols: dict[str, pa.Array] = {
        "seq_id": pa.array([r.seq_id for r in results], pa.int64()),
        "source": pa.array([r.source for r in results], pa.string()),
        "input_ids": _list_array(
            _offsets([len(r.input_ids) for r in results]), _cat([r.input_ids for r in results], np.int32), pa.int32()
        ),
        "target_positions": _list_array(
            targets_off, _cat([r.target_positions for r in results], np.int32), pa.int32()
        ),
        "target_logprob_q": _list_array(
            targets_off, quantize_logprobs(_cat([r.target_logprobs for r in results], np.float32)), pa.uint16()
        ),
    }
    mass_sum = 0.0
    zero_off = np.zeros(len(results) + 1, np.int32)
    topk_ids = np.zeros((0, max(top_k, 0)), np.int32)
    if has_topk:
        for r in results:
            if r.topk_ids is None or r.topk_ids.shape != (r.num_targets, top_k):
                raise KdcacheError(f"{r.source}: teacher returned top-k of shape "
                                   f"{None if r.topk_ids is None else r.topk_ids.shape}, expected ({r.num_targets}, {top_k})")
        topk_ids = _cat([r.topk_ids for r in results], np.int32).reshape(-1, top_k)
    sample_ids = np.zeros(0, np.int64)
    if has_samples:
        for r in results:
            if r.sample_offsets is None:
                raise KdcacheError(f"{r.source}: missing sampled tokens while other rows have them")
        sample_ids = _cat([r.sample_ids for r in results], np.int64)
    id_table, code_of = frequency_id_table(topk_ids, sample_ids)

    if has_topk:
        topk_lp = _cat([r.topk_logprobs for r in results], np.float32).reshape(-1, top_k)
        wide = id_table.shape[0] > 65536
        code_planes, gap_planes = encode_topk(topk_ids, topk_lp, code_of, code_bytes=3 if wide else 2)
        entries_off = _offsets(np.diff(targets_off.astype(np.int64)) * top_k)  # checked against int32
        cols["tail_logmass"] = _list_array(targets_off, _cat([r.tail_logmass for r in results], np.float32), pa.float32())
        for b in range(3):
            plane = code_planes[b] if b < code_planes.shape[0] else None
            cols[f"topk_code_b{b}"] = _byte_plane(entries_off if plane is not None else zero_off, plane)
        for b in range(2):
            cols[f"topk_lpq_b{b}"] = _byte_plane(entries_off, gap_planes[b])
        tails = cols["tail_logmass"].values.to_numpy()
        mass_sum = float(-np.expm1(tails.astype(np.float64)).sum())
    else:
        cols["tail_logmass"] = _list_array(zero_off, np.zeros(0, np.float32), pa.float32())
        for name in ("topk_code_b0", "topk_code_b1", "topk_code_b2", "topk_lpq_b0", "topk_lpq_b1"):
            cols[name] = _byte_plane(zero_off, None)

    n_sample_entries = int(sample_ids.shape[0])
    if has_samples:
        lengths = _cat([np.diff(r.sample_offsets) for r in results], np.int64)
        code_gaps, counts = encode_samples(lengths, sample_ids, _cat([r.sample_counts for r in results], np.int64), code_of)
        ent_off = _offsets([len(r.sample_ids) for r in results])
        count_bytes = counts.view(np.uint8).reshape(-1, 2)
        cols["sample_lengths"] = _list_array(targets_off, lengths.astype(np.uint16), pa.uint16())
        cols["sample_code_gaps"] = _list_array(ent_off, code_gaps, pa.uint32())
        cols["sample_count_b0"] = _byte_plane(ent_off, count_bytes[:, 0])
        wide_counts = counts.size > 0 and int(counts.max()) > 255
        cols["sample_count_b1"] = _byte_plane(ent_off if wide_counts else zero_off, count_bytes[:, 1] if wide_counts else None)
    else:
        cols["sample_lengths"] = _list_array(zero_off, np.zeros(0, np.uint16), pa.uint16())
        cols["sample_code_gaps"] = _list_array(zero_off, np.zeros(0, np.uint32), pa.uint32())
        cols["sample_count_b0"] = _byte_plane(zero_off, None)
        cols["sample_count_b1"] = _byte_plane(zero_off, None)

    if any(r.rollout_logprobs is not None for r in results):
        for r in results:
            if r.rollout_logprobs is None or r.rollout_logprobs.shape != (r.num_targets,):
                raise KdcacheError(f"{r.source}: rollout log-probs missing or not one per target while other rows have them")
        rollout_lp = quantize_logprobs(_cat([r.rollout_logprobs for r in results], np.float32))
        cols["rollout_logprob_q"] = _list_array(targets_off, rollout_lp, pa.uint16())
    else:
        cols["rollout_logprob_q"] = _list_array(zero_off, np.zeros(0, np.uint16), pa.uint16())

    table = pa.Table.from_arrays([cols[f.name] for f in fmt.shard_schema()], schema=fmt.shard_schema())
    meta = {
        fmt.META_VERSION: str(fmt.FORMAT_VERSION).encode(),
        fmt.META_TOP_K: str(top_k).encode(),
        fmt.META_ID_TABLE: encode_id_table(id_table),
    }
    stats = {
        "rows": len(results),
        "supervised_tokens": int(targets_off[-1]),
        "topk_entries": int(targets_off[-1]) * top_k if has_topk else 0,
        "sample_entries": n_sample_entries,
        "topk_mass_sum": mass_sum,
        "max_input_tokens": max((int(r.target_positions[-1]) for r in results if r.num_targets), default=0),
    }
    return table, meta, stats


def encode_parquet(table: pa.Table, meta: dict[bytes, bytes], zstd_level: int = fmt.ZSTD_LEVEL) -> pa.Buffer:
    """The shard file's bytes: ``table`` as one zstd Parquet row group with ``meta`` in the footer.

    Encoded into memory so the caller can hash the buffer and write it once (the file is
    never read back).
    """
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(
        sink,
        table.schema,
        compression="zstd",
        compression_level=zstd_level,
        use_dictionary=["source"],
        use_byte_stream_split=["target_logprob_q.list.element", "tail_logmass.list.element", "sample_code_gaps.list.element",
                               "rollout_logprob_q.list.element"],
        write_statistics=["seq_id"],
        data_page_size=1 << 20,
        store_schema=False,  # the Arrow schema would repeat the footer metadata (the id table)
    ) as writer:
        writer.write_table(table, row_group_size=max(1, table.num_rows))
        writer.add_key_value_metadata(meta)
    return sink.getvalue()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_shard(
    out_dir: str | Path | Store,
    index: int,
    results: Sequence[TeacherScores],
    top_k: int,
    skipped: Sequence[dict] = (),
    zstd_level: int = fmt.ZSTD_LEVEL,
) -> ShardRecord:
    """Write shard ``index`` under ``out_dir/shards`` (a directory or a store URL) atomically
    and return its record.

    ``skipped`` lists input rows dropped with ``--skip-bad-rows`` (``seq_id``, ``source``,
    ``reason``); they are kept in the record so the manifest accounts for every row.
    """
    store = open_store(out_dir)
    name = fmt.SHARD_PATTERN.format(index=index)
    key = f"{fmt.SHARD_DIR}/{name}"
    record_key = f"{fmt.SHARD_DIR}/{fmt.SHARD_RECORD_PATTERN.format(index=index)}"
    # Leftovers of a run killed while writing this shard (only its owner ever writes an index).
    store.clean_temps(key)
    store.clean_temps(record_key)
    table, meta, stats = build_shard_table(results, top_k)
    meta[fmt.META_SHARD_INDEX] = str(index).encode()
    seq_ids = [r.seq_id for r in results] + [int(s["seq_id"]) for s in skipped]
    try:
        encoded = encode_parquet(table, meta, zstd_level)
        sha256 = hashlib.sha256(memoryview(encoded)).hexdigest()
        store.write_bytes(key, memoryview(encoded))
        record = ShardRecord(
            index=index,
            file=key,
            first_seq_id=min(seq_ids) if seq_ids else -1,
            last_seq_id=max(seq_ids) if seq_ids else -1,
            bytes=encoded.size,
            sha256=sha256,
            skipped=list(skipped),
            **stats,
        )
        store.write_json(record_key, record.to_json(), indent=1)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise KdcacheError(
                f"{store.where(key)}: disk full while writing the shard; free space and rerun the same command "
                "(finished shards are kept)"
            ) from exc
        raise KdcacheError(f"{store.where(key)}: cannot write shard ({exc.strerror}); rerun the same command") from exc
    return record


def load_shard_record(out_dir: str | Path | Store, index: int) -> ShardRecord | None:
    """The record of a finished shard, or None if the shard is not finished (or half-written):
    no record, a record that does not parse, or a shard missing or of another size."""
    store = open_store(out_dir)
    try:
        raw = store.read_bytes(f"{fmt.SHARD_DIR}/{fmt.SHARD_RECORD_PATTERN.format(index=index)}")
    except FileNotFoundError:
        return None
    try:
        record = ShardRecord(**json.loads(bytes(raw)))
    except (ValueError, TypeError):
        return None
    if store.size(record.file) != record.bytes:
        return None
    return record


def finished_shards(out_dir: str | Path | Store, indices: Sequence[int]) -> set[int]:
    """The shards among ``indices`` that are finished (see :func:`load_shard_record`).

    One listing of ``shards/`` first, so a fresh run on an object store costs one request
    instead of two per shard."""
    store = open_store(out_dir)
    names = set(store.list(fmt.SHARD_DIR))
    return {i for i in indices
            if fmt.SHARD_RECORD_PATTERN.format(index=i) in names and load_shard_record(store, i) is not None}
