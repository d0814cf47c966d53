"""Streaming readers for the input dataset.

Every reader yields ``(source, row)`` where ``source`` is ``"path:row"`` (1-based; for JSON
Lines the *line number*, so blank lines keep line numbers right) and ``row`` is a ``dict``,
or a :class:`~kdcache.errors.BadRowError` *instance* (not raised) for a row that could not be
parsed. A bad row is passed along instead of raised so that it still takes its ``seq_id``:
the stream never shifts when a row is broken, whether or not bad rows are skipped.

File-level problems (missing, unreadable, corrupt ``.zst`` / Parquet) raise
:class:`~kdcache.errors.KdcacheError` naming the path.

Nothing here loads a whole file: JSONL is read line by line, ``.jsonl.zst`` is decompressed
as a stream (256 KiB of output at a time, after a cheap walk over its frame headers that
catches truncation), Parquet by record batches, ``datasets`` directories through their
memory-mapped Arrow files, hub datasets with ``streaming=True``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from kdcache.data.formats import detect_format_or_fail, normalize_format
from kdcache.errors import BadRowError, KdcacheError, first_line

JSONL_SUFFIXES = (".jsonl",)
ZST_SUFFIXES = (".jsonl.zst", ".jsonl.zstd")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + ZST_SUFFIXES + PARQUET_SUFFIXES
_SUPPORTED_TEXT = ".jsonl, .jsonl.zst, .parquet"

_READ_CHUNK = 1 << 18  # decompressed bytes per read from a .zst file
_PARQUET_BATCH = 1024  # rows per Parquet record batch
_BOM = b"\xef\xbb\xbf"

SourceRow = tuple[str, Any]  # (source, dict | BadRowError)
Row = tuple[int, str, Any]  # (seq_id, source, dict | BadRowError)


# ----------------------------------------------------------------------------- file readers


def parse_json_line(line: bytes, source: str) -> dict[str, Any] | BadRowError | None:
    """One JSON Lines line -> dict, a BadRowError for a broken line, or None for a blank one."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        return BadRowError(source, "line is not valid UTF-8")
    except json.JSONDecodeError as exc:
        return BadRowError(source, f"malformed JSON ({exc.msg.removesuffix(' at')}, column {exc.colno})")
    except RecursionError:
        return BadRowError(source, "malformed JSON (nested too deeply)")
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string"}.get(type(obj), "number" if isinstance(obj, (int, float)) else "value")
        return BadRowError(source, f"expected a JSON object per line, got a JSON {kind}")
    return obj


def _json_lines(lines: Iterator[bytes], path: str) -> Iterator[SourceRow]:
    for line_no, line in enumerate(lines, 1):
        if line_no == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        row = parse_json_line(line, f"{path}:{line_no}")
        if row is not None:
            yield f"{path}:{line_no}", row


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise KdcacheError(f"{path}: no such file") from None
    except OSError as exc:
        raise KdcacheError(f"{path}: cannot open file ({exc.strerror or exc})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[SourceRow]:
    """Rows of a JSON Lines file, streamed line by line. Blank lines are not rows."""
    path = str(path)
    with _open_binary(path) as handle:
        try:
            yield from _json_lines(iter(handle), path)
        except OSError as exc:
            raise KdcacheError(f"{path}: read error ({exc.strerror or exc})") from None


_ZSTD_MAGIC = 0xFD2FB528
_FCS_BYTES = (0, 2, 4, 8)  # frame content size field, by FCS flag (flag 0: 1 byte if single-segment)
_DICT_BYTES = (0, 1, 2, 4)


def check_zstd_frames(handle, path: str) -> None:
    """Walk the frame and block headers of a zstd file (cheap: seeks, reads 3 bytes a block).

    The streaming decoder stops silently at the end of a truncated file, so truncation is
    caught here, before any row is read. Raises KdcacheError naming ``path``.
    """
    size = os.fstat(handle.fileno()).st_size
    pos = 0

    def read_at(offset: int, count: int) -> bytes:
        handle.seek(offset)
        data = handle.read(count)
        if len(data) < count:
            raise KdcacheError(f"{path}: zstd stream is truncated (the file is incomplete); re-create the file")
        return data

    while pos < size:
        magic = int.from_bytes(read_at(pos, 4), "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
            pos += 8 + int.from_bytes(read_at(pos + 4, 4), "little")
            continue
        if magic != _ZSTD_MAGIC:
            raise KdcacheError(f"{path}: corrupt zstd data (no zstd frame at byte {pos}); re-create the file")
        fhd = read_at(pos + 4, 1)[0]
        single = (fhd >> 5) & 1
        fcs = _FCS_BYTES[fhd >> 6] or single
        pos += 5 + (1 - single) + _DICT_BYTES[fhd & 3] + fcs
        last = 0
        while not last:
            header = int.from_bytes(read_at(pos, 3), "little")
            last, kind, block_size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise KdcacheError(f"{path}: corrupt zstd data (bad block header at byte {pos}); re-create the file")
            pos += 3 + (1 if kind == 1 else block_size)
        pos += 4 * ((fhd >> 2) & 1)  # content checksum
    if pos > size:
        raise KdcacheError(f"{path}: zstd stream is truncated (the file is incomplete); re-create the file")
    handle.seek(0)


def _zst_chunks(handle, path: str) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-frame) zstd file, at most 256 KiB at a time."""
    import zstandard

    check_zstd_frames(handle, path)
    reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True, closefd=False)
    try:
        while block := reader.read(_READ_CHUNK):
            yield block
    except zstandard.ZstdError as exc:
        raise KdcacheError(f"{path}: corrupt zstd data ({exc}); re-create the file") from None
    except OSError as exc:
        raise KdcacheError(f"{path}: read error ({exc.strerror or exc})") from None


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def iter_jsonl_zst(path: str | os.PathLike) -> Iterator[SourceRow]:
    """Rows of a zstd-compressed JSON Lines file, decompressed as a stream."""
    path = str(path)
    with _open_binary(path) as handle:
        yield from _json_lines(_split_lines(_zst_chunks(handle, path)), path)


def iter_parquet(path: str | os.PathLike, batch_size: int = _PARQUET_BATCH) -> Iterator[SourceRow]:
    """Rows of a Parquet file as dicts, read ``batch_size`` rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(path)
    _open_binary(path).close()  # uniform "no such file" / permission messages
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise KdcacheError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    row_no = 0
    try:
        for batch in pfile.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                row_no += 1
                yield f"{path}:{row_no}", row
    except (pa.ArrowException, OSError) as exc:
        raise KdcacheError(f"{path}: corrupt Parquet data after row {row_no} ({first_line(exc)})") from None
    finally:
        pfile.close()


def iter_file(path: str | os.PathLike) -> Iterator[SourceRow]:
    """Dispatch on the file name's suffix."""
    name = str(path).lower()
    if name.endswith(ZST_SUFFIXES):
        return iter_jsonl_zst(path)
    if name.endswith(JSONL_SUFFIXES):
        return iter_jsonl(path)
    if name.endswith(PARQUET_SUFFIXES):
        return iter_parquet(path)
    raise KdcacheError(f"{path}: unsupported file type (supported: {_SUPPORTED_TEXT})")




# ----------------------------------------------------------------------------- datasets


class InputDataset:
    """An input dataset: a stream of rows with stable ``seq_id``\\ s, a format, a fingerprint.

    Use :func:`open_dataset` to make one. ``rows()`` can be iterated several times and
    yields the same rows each time.
    """

    kind = "abstract"

    def __init__(self, spec: str, fmt: str | None = None) -> None:
        self.spec = spec
        self._forced_format = normalize_format(fmt) if fmt else None
        self._format: str | None = self._forced_format

    # subclasses implement these two
    def _source_rows(self) -> Iterator[SourceRow]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hex sha256 identifying the input data (cheap, deterministic)."""
        raise NotImplementedError

    def _describe_extra(self) -> dict[str, Any]:
        return {}

    def rows(self) -> Iterator[Row]:
        """``(seq_id, source, row)``: ``seq_id`` 0-based across all files in order; ``row`` is
        a dict, or a ``BadRowError`` instance for a row that could not be parsed."""
        for seq_id, (source, row) in enumerate(self._source_rows()):
            yield seq_id, source, row

    @property
    def format(self) -> str:
        """The forced format, or the one detected from the first parseable row."""
        if self._format is None:
            for _, source, row in self.rows():
                if isinstance(row, dict):
                    self._format = detect_format_or_fail(row, source)
                    break
            else:
                raise KdcacheError(f"{self.spec}: no valid rows to detect the input format from")
        return self._format

    def num_rows_hint(self) -> int | None:
        """Number of rows if known without reading the data (Parquet, datasets), else None."""
        return None

    def describe(self) -> dict[str, Any]:
        """``{"source", "kind", "format", "format_forced", ...}`` for the cache manifest."""
        return {
            "source": self.spec,
            "kind": self.kind,
            "format": self.format,
            "format_forced": self._forced_format is not None,
            **self._describe_extra(),
        }

    def examples(self, tokenizer: Any, max_length: int | None, **kwargs: Any):
        """Shortcut for ``tokenize_rows(self.rows(), tokenizer, max_length, fmt=self.format, ...)``."""
        from kdcache.data.tokenize import tokenize_rows

        return tokenize_rows(self.rows(), tokenizer, max_length, fmt=self.format, **kwargs)


class FileDataset(InputDataset):
    """One or more JSONL / JSONL.zst / Parquet files, read in the given (sorted) order."""

    kind = "files"

    def __init__(self, spec: str, files: list[Path], fmt: str | None = None) -> None:
        super().__init__(spec, fmt)
        self.files = files

    def _source_rows(self) -> Iterator[SourceRow]:
        for path in self.files:
            yield from iter_file(path)

    def fingerprint(self) -> str:
        """sha256 over each file's name (relative to their common folder) and bytes."""
        root = Path(os.path.commonpath([str(p.parent) for p in self.files]))
        digest = hashlib.sha256(b"kdcache-files-v1\0")
        for path in self.files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(self._sha256(path).encode() + b"\0")
        return digest.hexdigest()

    def _sha256(self, path: Path) -> str:
        return _file_sha256(path)

    def num_rows_hint(self) -> int | None:
        if not all(str(p).lower().endswith(PARQUET_SUFFIXES) for p in self.files):
            return None
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)
        except Exception:
            return None

    def _describe_extra(self) -> dict[str, Any]:
        return {"files": [str(p) for p in self.files]}


class RolloutDataset(FileDataset):
    """A finished ``kdcache rollout`` directory: the shards its ``rollout.json`` lists, in order.

    ``describe()`` adds ``"rollout"``: which student, round and sampling settings made the
    responses (:func:`kdcache.rollout.provenance.provenance`), so a cache of these rows
    records it. The fingerprint checks every shard against the manifest's sha256.
    """

    kind = "rollout"

    def __init__(self, spec: str, path: Path, fmt: str | None = None) -> None:
        from kdcache.rollout import rows as layout
        from kdcache.rollout.provenance import provenance

        manifest_path = path / layout.MANIFEST_NAME
        if not manifest_path.exists():
            raise KdcacheError(f"{path}: unfinished rollout (no {layout.MANIFEST_NAME} yet); rerun the same "
                               "`kdcache rollout` command, or let its other workers finish, before using it")
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != layout.ROLLOUT_FORMAT or manifest.get("format_version") != layout.ROLLOUT_VERSION:
                raise KdcacheError(f"{manifest_path}: not a rollout of this kdcache (format {manifest.get('format')!r} "
                                   f"v{manifest.get('format_version')}); upgrade kdcache or rerun the rollout")
            files = [path / shard["file"] for shard in manifest["shards"]]
            self._expected = {str(f): shard["sha256"] for f, shard in zip(files, manifest["shards"])}
            self._rollout = provenance(manifest)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KdcacheError(f"{manifest_path}: unreadable rollout manifest ({first_line(exc)}); rerun "
                               "`kdcache rollout` into a new directory") from None
        if not files:
            raise KdcacheError(f"{manifest_path}: the rollout holds no shards")
        super().__init__(spec, files, fmt)
        self.root, self.manifest = path, manifest

    def _sha256(self, path: Path) -> str:
        digest = _file_sha256(path)
        if digest != self._expected[str(path)]:
            raise KdcacheError(f"{path}: checksum differs from {self.root / 'rollout.json'} (damaged or changed "
                               "since the rollout); delete the shard and its .json record and rerun the rollout")
        return digest

    def num_rows_hint(self) -> int | None:
        return int(self.manifest["totals"]["rows"])

    def _describe_extra(self) -> dict[str, Any]:
        return {"files": [str(p) for p in self.files], "rollout": self._rollout}


class DiskDataset(InputDataset):
    """A directory written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``)."""

    kind = "datasets_dir"

    def __init__(self, spec: str, path: Path, fmt: str | None = None, split: str = "train") -> None:
        super().__init__(spec, fmt)
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise KdcacheError(f"{path}: cannot load saved dataset ({first_line(exc)})") from None
        self.root = path
        self.split = None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KdcacheError(f"{path}: no split {split!r} (splits: {', '.join(loaded)}); pick one with --split")
            loaded, self.split = loaded[split], split
        self.dataset = loaded.with_format(None)
        self.data_path = path / self.split if self.split else path

    def _source_rows(self) -> Iterator[SourceRow]:
        row_no = 0
        for batch in self.dataset.iter(batch_size=_PARQUET_BATCH):
            columns = list(batch)
            for i in range(len(batch[columns[0]]) if columns else 0):
                row_no += 1
                yield f"{self.data_path}:{row_no}", {c: batch[c][i] for c in columns}

    def fingerprint(self) -> str:
        """sha256 over the directory's JSON state files and its data files' names and sizes."""
        digest = hashlib.sha256(b"kdcache-datasets-dir-v1\0" + (self.split or "").encode() + b"\0")
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            rel = path.relative_to(self.root).as_posix()
            digest.update(rel.encode() + b"\0")
            digest.update(path.read_bytes() if path.suffix == ".json" else str(path.stat().st_size).encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def num_rows_hint(self) -> int | None:
        return len(self.dataset)

    def _describe_extra(self) -> dict[str, Any]:
        return {"path": str(self.root), "split": self.split, "num_rows": len(self.dataset)}


class HubDataset(InputDataset):
    """A Hugging Face hub dataset, streamed with ``datasets.load_dataset(streaming=True)``."""

    kind = "hub"

    def __init__(self, spec: str, name: str, fmt: str | None = None, split: str = "train") -> None:
        super().__init__(spec, fmt)
        import datasets

        self.name, self.split = name, split
        try:
            self.dataset = datasets.load_dataset(name, split=split, streaming=True)
        except Exception as exc:
            raise KdcacheError(
                f"{spec}: not a local file or directory, and loading it as a Hugging Face hub dataset "
                f"failed ({first_line(exc)})"
            ) from None

    def _source_rows(self) -> Iterator[SourceRow]:
        try:
            for row_no, row in enumerate(self.dataset, 1):
                yield f"{self.name}:{row_no}", dict(row)
        except KdcacheError:
            raise
        except Exception as exc:
            raise KdcacheError(f"{self.name}: error while streaming the hub dataset ({first_line(exc)})") from None

    def fingerprint(self) -> str:
        """sha256 over the dataset name, split, config, and hub metadata (splits, checksums)."""
        info = getattr(self.dataset, "info", None)
        meta = {
            "name": self.name,
            "split": self.split,
            "config": getattr(info, "config_name", None),
            "version": str(getattr(info, "version", None)),
            "splits": _jsonable(getattr(info, "splits", None)),
            "checksums": _jsonable(getattr(info, "download_checksums", None)),
        }
        return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()

    def _describe_extra(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split}


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    try:
        return json.loads(json.dumps(value, default=lambda o: getattr(o, "__dict__", str(o))))
    except Exception:
        return str(value)


def _file_sha256(path: Path) -> str:
    from kdcache.cache.writer import file_sha256

    try:
        return file_sha256(path)
    except OSError as exc:
        raise KdcacheError(f"{path}: cannot read file ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------- open_dataset

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _is_rollout(path: Path) -> bool:
    from kdcache.rollout import rows as layout

    return (path / layout.RUN_NAME).is_file() or (path / layout.MANIFEST_NAME).is_file()


def _files_in_dir(path: Path) -> list[Path]:
    """Supported files under ``path`` (recursively, hidden entries skipped), sorted by path."""
    found = [
        p
        for p in path.rglob("*")
        if p.is_file() and _is_supported(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not found:
        raise KdcacheError(f"{path}: directory holds no {_SUPPORTED_TEXT} files")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _files_from_glob(pattern: str) -> list[Path]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [Path(m) for m in matches if Path(m).is_file() and _is_supported(Path(m))]
    if not files:
        extra = f" (it matched {len(matches)} other entries)" if matches else ""
        raise KdcacheError(f"{pattern}: pattern matches no {_SUPPORTED_TEXT} files{extra}")
    return files


def open_dataset(spec: str | os.PathLike, fmt: str | None = None, split: str = "train") -> InputDataset:
    """Open an input dataset for streaming.

    ``spec`` is, in order of precedence:

    * ``hf:NAME`` -- a Hugging Face hub dataset (``datasets.load_dataset(NAME, split=split,
      streaming=True)``; needs network);
    * a directory saved by ``datasets`` ``save_to_disk`` (has ``state.json`` or
      ``dataset_dict.json``; ``split`` picks the split of a ``DatasetDict``);
    * a ``kdcache rollout`` directory (has ``rollout-run.json``): the shards of its
      ``rollout.json`` (an unfinished rollout is refused);
    * any other directory: all ``.jsonl``, ``.jsonl.zst``, ``.parquet`` files under it;
    * a file with one of those suffixes;
    * a glob pattern (``*``, ``?``, ``[``; ``**`` recurses), matching files of those types;
    * otherwise, a name that looks like ``owner/name`` is tried on the hub.

    Files are read in sorted path order, so ``seq_id`` is deterministic. ``fmt`` forces the
    format (see :mod:`kdcache.data.formats`); by default it is detected from the first
    parseable row.

    Raises:
        KdcacheError: the spec matches nothing readable (message names it).
    """
    text = os.fspath(spec)
    if fmt:
        normalize_format(fmt)  # fail early on a bad --format
    if text.startswith("hf:"):
        return HubDataset(text, text[3:], fmt, split)
    path = Path(text).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return DiskDataset(text, path, fmt, split)
        if _is_rollout(path):
            return RolloutDataset(text, path, fmt)
        return FileDataset(text, _files_in_dir(path), fmt)
    if path.is_file():
        if not _is_supported(path):
            raise KdcacheError(f"{text}: unsupported file type (supported: {_SUPPORTED_TEXT})")
        return FileDataset(text, [path], fmt)
    if glob.has_magic(text):
        return FileDataset(text, _files_from_glob(text), fmt)
    if path.exists():
        raise KdcacheError(f"{text}: not a regular file or directory")
    if _HUB_NAME.match(text) and not _is_supported(path):
        return HubDataset(text, text, fmt, split)
    raise KdcacheError(f"{text}: no such file or directory")
