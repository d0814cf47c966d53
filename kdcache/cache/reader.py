"""Stream a finished cache: manifest check, then shards one record batch at a time.

A cache in a local directory is read from disk as it is decoded. From an object store each
shard is fetched whole (one GET; its sha256 checked), and the next shards' bytes are fetched in
a background thread while one is decoded and trained on (:meth:`CacheReader.read_ahead`), so
at most ``1 + read_ahead`` shards' bytes are in memory.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from kdcache.cache import format as fmt
from kdcache.cache.manifest import load_manifest, sampling_mode
from kdcache.cache.quantize import dequantize_logprobs
from kdcache.cache.records import TeacherScores
from kdcache.cache.storage import Store, open_store
from kdcache.errors import KdcacheError, first_line


def decode_id_table(blob: bytes) -> np.ndarray:
    """Inverse of :func:`kdcache.cache.writer.encode_id_table`: code -> token id, int64."""
    planes = np.frombuffer(zstandard.ZstdDecompressor().decompress(base64.b64decode(blob)), dtype=np.uint8)
    deltas = np.ascontiguousarray(planes.reshape(4, -1).T).view("<i4").reshape(-1)
    return np.cumsum(deltas, dtype=np.int64)


REPAIR_HINT = "copy the shard again, or delete it and rerun the same generate-teacher command to rescore it"


def _check_shard_meta(path: Path | str, meta: dict[bytes, bytes] | None) -> None:
    if not meta or fmt.META_VERSION not in meta:
        raise KdcacheError(f"{path}: not a kdcache shard (no format version in its footer)")
    try:
        version = int(meta[fmt.META_VERSION])
    except ValueError:
        raise KdcacheError(f"{path}: damaged shard footer (format version unreadable); {REPAIR_HINT}") from None
    if version not in fmt.SUPPORTED_VERSIONS:
        raise fmt.version_error(path, version)


def _footer_id_table(path: Path | str, meta: dict[bytes, bytes]) -> np.ndarray:
    try:
        return decode_id_table(meta[fmt.META_ID_TABLE])
    except Exception as exc:  # KeyError, base64/zstd errors, bad shapes: all mean a damaged footer
        raise KdcacheError(f"{path}: damaged shard footer (id table unreadable: {first_line(exc)}); {REPAIR_HINT}") from None


#: (path, size, mtime_ns) of shard files whose sha256 matched the manifest in this process.
_VERIFIED: set[tuple[str, int, int]] = set()


def check_shard_checksum(path: Path, expected_sha256: str) -> None:
    """Hash the shard file and compare with the manifest (once per file version per process).

    A damaged shard of the right size can still decode (a flipped bit in a zstd literal
    changes values without breaking the page), so size and footer checks are not enough.
    """
    from kdcache.cache.writer import file_sha256

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    if file_sha256(path) != expected_sha256:
        raise KdcacheError(
            f"{path}: checksum differs from the manifest (damaged or changed since generate-teacher); {REPAIR_HINT}"
        )
    _VERIFIED.add(key)


def _flat(batch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [rows+1], values) of a list column, zero-copy where Arrow allows."""
    col = batch.column(name)
    offsets = col.offsets.to_numpy().astype(np.int64)
    return offsets, col.values.to_numpy(zero_copy_only=False)


def _plane(batch, name: str) -> np.ndarray:
    """All bytes of a binary column in this batch, rows concatenated (uint8)."""
    col = batch.column(name)
    bufs = col.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1]
    data = bufs[2]
    if data is None or offsets[-1] == offsets[0]:
        return np.zeros(0, np.uint8)
    return np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]


def _planes(batch, names: tuple[str, ...]) -> np.ndarray:
    """Reassemble little-endian integers from byte planes; missing high planes are zero.

    Returns uint16 for two planes, uint32 for three (a value's bytes are interleaved into one
    buffer that is then viewed as the wider type).
    """
    planes = [_plane(batch, name) for name in names]
    n = planes[0].shape[0]
    width = 2 if len(names) == 2 else 4
    out = np.zeros((n, width), np.uint8)
    for b, plane in enumerate(planes):
        if plane.shape[0]:
            out[:, b] = plane
    return out.view("<u2" if width == 2 else "<u4").reshape(n)


def decode_batch(batch, id_table: np.ndarray, top_k: int) -> Iterator[TeacherScores]:
    """Decode one Arrow record batch of a shard into :class:`TeacherScores`, vectorized per column."""
    seq_ids = batch.column("seq_id").to_numpy()
    sources = batch.column("source").to_pylist()
    ids_off, ids = _flat(batch, "input_ids")
    pos_off, positions = _flat(batch, "target_positions")
    target_lp = dequantize_logprobs(_flat(batch, "target_logprob_q")[1])
    if top_k > 0:
        tail = _flat(batch, "tail_logmass")[1]
        codes = _planes(batch, ("topk_code_b0", "topk_code_b1", "topk_code_b2"))
        topk_ids = id_table[codes].astype(np.int32).reshape(-1, top_k)
        gaps = _planes(batch, ("topk_lpq_b0", "topk_lpq_b1")).reshape(-1, top_k)
        topk_lp = dequantize_logprobs(np.cumsum(gaps, axis=1, dtype=np.uint16))  # codes fit: <= 65535
    len_off, lengths = _flat(batch, "sample_lengths")
    has_samples = lengths.shape[0] == positions.shape[0] and lengths.shape[0] > 0
    if has_samples:
        ent_off, code_gaps = _flat(batch, "sample_code_gaps")
        counts = _planes(batch, ("sample_count_b0", "sample_count_b1")).astype(np.int32)
        pos_starts = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=pos_starts[1:])
        # Each position's first gap is absolute: codes = running sum minus the sum before the position.
        total = np.cumsum(code_gaps.astype(np.int64))
        before = np.zeros_like(total)
        starts = pos_starts[:-1][lengths > 0]
        before[starts] = total[starts] - code_gaps[starts]
        sample_ids = id_table[total - np.maximum.accumulate(before)].astype(np.int32)
    rollout_lp = None  # v3: the sampling policy's log-probs, in caches of rollout samples
    if "rollout_logprob_q" in batch.schema.names:
        values = _flat(batch, "rollout_logprob_q")[1]
        if values.shape[0] == positions.shape[0] and values.shape[0] > 0:
            rollout_lp = dequantize_logprobs(values)
    for i in range(len(seq_ids)):
        a, b = pos_off[i], pos_off[i + 1]
        result = TeacherScores(
            seq_id=int(seq_ids[i]),
            source=sources[i],
            input_ids=ids[ids_off[i] : ids_off[i + 1]].astype(np.int32),
            target_positions=positions[a:b].astype(np.int32),
            target_logprobs=target_lp[a:b],
        )
        if top_k > 0:
            result.topk_ids = topk_ids[a:b]
            result.topk_logprobs = topk_lp[a:b]
            result.tail_logmass = tail[a:b].astype(np.float32)
        if has_samples:
            e0, e1 = ent_off[i], ent_off[i + 1]
            result.sample_offsets = (pos_starts[a : b + 1] - pos_starts[a]).astype(np.int32)
            result.sample_ids = sample_ids[e0:e1]
            result.sample_counts = counts[e0:e1]
        if rollout_lp is not None:
            result.rollout_logprobs = rollout_lp[a:b]
        yield result


def _iter_file(pf: pq.ParquetFile, id_table: np.ndarray, top_k: int, path: Path | str, batch_rows: int) -> Iterator[TeacherScores]:
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield from decode_batch(batch, id_table, top_k)
    except KdcacheError:
        raise
    except Exception as exc:  # damaged pages surface as ArrowInvalid/OSError mid-stream
        raise KdcacheError(f"{path}: damaged shard ({first_line(exc)}); run `kdcache verify`") from exc


def _missing_shard_error(where: Path | str) -> KdcacheError:
    return KdcacheError(f"{where}: shard listed in the manifest is missing; copy it again, or rerun the same "
                        "generate-teacher command to rescore it")


def _size_error(where: Path | str, size: int, expected: int) -> KdcacheError:
    return KdcacheError(f"{where}: size {size} differs from the manifest's {expected} (damaged or truncated copy); "
                        f"{REPAIR_HINT}")


def fetch_shard(store: Store, shard: dict) -> pa.Buffer:
    """A shard's bytes from an object store, checked against the manifest (size and sha256)."""
    where = store.where(shard["file"])
    try:
        data = pa.py_buffer(store.read_bytes(shard["file"]))
    except FileNotFoundError:
        raise _missing_shard_error(where) from None
    if data.size != shard["bytes"]:
        raise _size_error(where, data.size, shard["bytes"])
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise KdcacheError(
            f"{where}: checksum differs from the manifest (damaged or changed since generate-teacher); {REPAIR_HINT}"
        )
    return data


class _ReadAhead:
    """Fetch objects in one background thread, ``depth`` objects ahead of the reader.

    ``plan(keys)`` says which objects will be read next, in order; ``get(key)`` returns an
    object's bytes (fetched ahead if it was planned, else now) and starts the next planned
    fetch. A fetch that fails raises in ``get`` of that object, where reading without
    read-ahead would.
    """

    def __init__(self, fetch: Callable[[str], pa.Buffer], depth: int) -> None:
        self._fetch = fetch
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-read-ahead")
        self._lock = threading.Lock()
        self._upcoming: collections.deque[str] = collections.deque()
        self._inflight: dict[str, Future] = {}

    def planned(self, keys: list[str]) -> bool:
        """Whether the plan starts with ``keys``."""
        return list(itertools.islice(self._upcoming, len(keys))) == keys

    def plan(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._upcoming = collections.deque(keys)
            self._fill()

    def _fill(self) -> None:
        wanted = list(itertools.islice(self._upcoming, self._depth))
        for key in [k for k in self._inflight if k not in wanted]:
            self._inflight.pop(key).cancel()  # a finished one is dropped with its bytes
        for key in wanted:
            if key not in self._inflight:
                self._inflight[key] = self._pool.submit(self._fetch, key)

    def get(self, key: str) -> pa.Buffer:
        with self._lock:
            if key in itertools.islice(self._upcoming, self._depth + 1):  # the head, unless reads went off plan
                while self._upcoming.popleft() != key:
                    pass
            future = self._inflight.pop(key, None)
            self._fill()
        return future.result() if future is not None else self._fetch(key)

    def close(self) -> None:
        with self._lock:
            self._upcoming.clear()
            self._fill()
        self._pool.shutdown(wait=False, cancel_futures=True)


class CacheReader:
    """Read a finished cache (a local directory or a store URL) without loading it into RAM.

    ``CacheReader(path).iter_sequences()`` yields :class:`TeacherScores` shard by shard,
    ``batch_rows`` Parquet rows at a time. The manifest is validated on open; shards are
    checked against it (size, sha256, format version) as they are opened.

    Args:
        path: cache directory, ``s3://bucket/prefix``, ``gs://...`` or another fsspec URL.
        read_ahead: shards of an object-store cache fetched in the background ahead of
            the one being read (the order comes from :meth:`iter_sequences`, or from
            :meth:`read_ahead` for the shards after it); each costs one shard's bytes of RAM.
    """

    def __init__(self, path: str | Path | Store, read_ahead: int = 1) -> None:
        self.store = open_store(path)
        self.path = self.store.path() if self.store.is_local else self.store.where()
        self.manifest = load_manifest(self.store)
        self.top_k = int(self.manifest["top_k"])
        self.num_samples = int(self.manifest["sampling"]["num_samples"])
        self.sampling_mode = sampling_mode(self.manifest)
        self._ahead = None
        if not self.store.is_local and read_ahead > 0:
            by_file = {shard["file"]: shard for shard in self.shards}
            self._ahead = _ReadAhead(lambda file: fetch_shard(self.store, by_file[file]), read_ahead)

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def shard_path(self, shard: dict) -> Path | str:
        """The shard's path (local directory) or URL (object store)."""
        return self.store.path(shard["file"]) if self.store.is_local else self.store.where(shard["file"])

    def read_ahead(self, shard_indices: Sequence[int]) -> None:
        """The shards (indices into :attr:`shards`) that will be read next, in order: an
        object-store cache fetches them in the background, ``read_ahead`` at a time, while
        the current one is decoded and trained on. No-op for a local directory."""
        if self._ahead is not None:
            self._ahead.plan([self.shards[i]["file"] for i in shard_indices])

    def open_shard(self, shard: dict) -> tuple[pq.ParquetFile, np.ndarray]:
        path = self.shard_path(shard)
        if self.store.is_local:
            if not path.exists():
                raise _missing_shard_error(path)
            if path.stat().st_size != shard["bytes"]:
                raise _size_error(path, path.stat().st_size, shard["bytes"])
            check_shard_checksum(path, shard["sha256"])
            source = path
        elif self._ahead is not None:
            source = pa.BufferReader(self._ahead.get(shard["file"]))
        else:
            source = pa.BufferReader(fetch_shard(self.store, shard))
        try:
            pf = pq.ParquetFile(source)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged footer
            raise KdcacheError(f"{path}: unreadable Parquet ({first_line(exc)}); copy the shard again or rerun "
                               "generate-teacher") from None
        meta = pf.schema_arrow.metadata
        _check_shard_meta(path, meta)
        return pf, _footer_id_table(path, meta)

    def iter_shard(self, shard: dict, batch_rows: int = 64) -> Iterator[TeacherScores]:
        pf, id_table = self.open_shard(shard)
        yield from _iter_file(pf, id_table, self.top_k, self.shard_path(shard), batch_rows)

    def iter_sequences(self, shard_indices: list[int] | None = None, batch_rows: int = 64) -> Iterator[TeacherScores]:
        """All sequences in seq_id order (or only the given shards, in the given order)."""
        indices = range(len(self.shards)) if shard_indices is None else shard_indices
        files = [self.shards[i]["file"] for i in indices]
        if self._ahead is not None and not self._ahead.planned(files):
            self._ahead.plan(files)  # unless read_ahead() planned these and more
        for i in indices:
            yield from self.iter_shard(self.shards[i], batch_rows)

    def close(self) -> None:
        """Stop fetching ahead (object stores); the reader stays usable, without read-ahead."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def __len__(self) -> int:
        return int(self.manifest["totals"]["sequences"])


def read_shard_file(path: str | Path, batch_rows: int = 64) -> Iterator[TeacherScores]:
    """Decode one shard file on its own (no manifest needed), e.g. for debugging."""
    path = Path(path)
    yield from iter_parquet_shard(pq.ParquetFile(path), path, batch_rows)


def iter_parquet_shard(pf: pq.ParquetFile, path: Path | str, batch_rows: int = 64) -> Iterator[TeacherScores]:
    """Decode an opened shard (its footer checked first); ``path`` names it in errors."""
    meta = pf.schema_arrow.metadata
    _check_shard_meta(path, meta)
    yield from _iter_file(pf, _footer_id_table(path, meta), int(meta[fmt.META_TOP_K]), path, batch_rows)
