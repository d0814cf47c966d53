"""`kdcache inspect` and `kdcache verify`: summaries and integrity checks of a cache (a directory
or a store URL)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache import format as fmt
from kdcache.cache.manifest import load_manifest, sampling_draws
from kdcache.cache.reader import _check_shard_meta
from kdcache.cache.storage import Store, open_store
from kdcache.cache.writer import file_sha256
from kdcache.errors import KdcacheError


def summarize(cache_dir: str | Path | Store) -> dict:
    """Headline numbers of a finished cache, from its manifest (no shard is read)."""
    manifest = load_manifest(cache_dir)
    totals = manifest["totals"]
    tokens = max(1, totals["supervised_tokens"])
    entries = totals.get("topk_entries", 0)
    return {
        "path": str(cache_dir),
        "format_version": manifest["format_version"],
        "teacher": manifest["teacher"]["model"],
        "backend": manifest["teacher"]["backend"],
        "mode": manifest["mode"],
        "top_k": manifest["top_k"],
        "sampling": manifest["sampling"],
        "sequences": totals["sequences"],
        "supervised_tokens": totals["supervised_tokens"],
        "skipped_rows": totals["skipped_rows"],
        "shards": totals["shards"],
        "bytes": totals["bytes"],
        "bytes_per_supervised_token": totals["bytes"] / tokens,
        "bytes_per_topk_entry": (totals["bytes"] / entries) if entries else None,
        "mean_topk_mass": totals.get("mean_topk_mass"),
        "mean_unique_samples_per_token": (totals.get("sample_entries", 0) / tokens) if manifest["sampling"]["num_samples"] else None,
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"cache            {summary['path']} (format v{summary['format_version']})",
        f"teacher          {summary['teacher']} via {summary['backend']}, mode {summary['mode']}",
        f"top-k            {summary['top_k']}",
    ]
    if summary["sampling"]["num_samples"]:
        lines.append(
            f"{('tail' if summary['sampling']['mode'] == 'tail' else 'random') + ' sampling':<17}N={summary['sampling']['num_samples']} "
            f"({sampling_draws(summary)} draws), "
            f"{summary['mean_unique_samples_per_token']:.1f} unique ids per token"
        )
    lines += [
        f"sequences        {summary['sequences']:,} ({summary['skipped_rows']:,} bad rows skipped)",
        f"supervised tok.  {summary['supervised_tokens']:,}",
        f"shards           {summary['shards']}",
        f"bytes            {summary['bytes']:,}",
        f"bytes / token    {summary['bytes_per_supervised_token']:.2f}",
    ]
    if summary["bytes_per_topk_entry"]:
        lines.append(f"bytes / entry    {summary['bytes_per_topk_entry']:.3f} (all columns / (tokens x k))")
    if summary["mean_topk_mass"] is not None:
        lines.append(f"mean top-k mass  {summary['mean_topk_mass']:.4f}")
    return "\n".join(lines)


def verify_shard(cache_dir: str | Path | Store, shard: dict, top_k: int) -> str | None:
    """None if the shard matches its manifest entry, else a one-line problem description.

    A local shard is hashed from disk in blocks; an object-store shard is fetched once
    (one shard's bytes in memory) and checked from memory."""
    store = open_store(cache_dir)
    if store.is_local:
        path = source = store.path(shard["file"])
        if not path.exists():
            return f"{path}: missing"
        size = path.stat().st_size
        if size == shard["bytes"]:
            digest = file_sha256(path)
    else:
        path = store.where(shard["file"])
        try:
            data = pa.py_buffer(store.read_bytes(shard["file"]))
        except FileNotFoundError:
            return f"{path}: missing"
        size, source = data.size, pa.BufferReader(data)
        if size == shard["bytes"]:
            digest = hashlib.sha256(data).hexdigest()
    if size != shard["bytes"]:
        return f"{path}: {size} bytes, manifest says {shard['bytes']} (truncated or replaced)"
    if digest != shard["sha256"]:
        return f"{path}: checksum mismatch (damaged copy)"
    try:
        pf = pq.ParquetFile(source)
        _check_shard_meta(path, pf.schema_arrow.metadata)
        version = int(pf.schema_arrow.metadata[fmt.META_VERSION])
        if pf.schema_arrow.remove_metadata() != fmt.shard_schema(version):
            return f"{path}: schema differs from format v{version}"
        table = pf.read(columns=["seq_id", "target_positions", "topk_code_b0"])
    except KdcacheError as exc:
        return str(exc)
    except Exception as exc:
        return f"{path}: unreadable Parquet ({type(exc).__name__}: {exc})"
    if table.num_rows != shard["rows"]:
        return f"{path}: {table.num_rows} rows, manifest says {shard['rows']}"
    n_targets = int(np.diff(table.column("target_positions").combine_chunks().offsets.to_numpy()).sum())
    if n_targets != shard["supervised_tokens"]:
        return f"{path}: {n_targets} supervised tokens, manifest says {shard['supervised_tokens']}"
    seq = table.column("seq_id").to_numpy()
    if seq.size and (seq.min() < shard["first_seq_id"] or seq.max() > shard["last_seq_id"]):
        return f"{path}: seq_id outside the shard's range {shard['first_seq_id']}..{shard['last_seq_id']}"
    return _value_problem(pf, path)


def _value_problem(pf: pq.ParquetFile, path: Path | str) -> str | None:
    """The first impossible value in the shard (NaN, a log-prob above 0, top-k masses that do
    not sum to 1 with the tail), as stored; a shard written before kdcache refused them can
    hold what a non-finite teacher forward produced."""
    from kdcache.cache.reader import iter_parquet_shard
    from kdcache.cache.records import QUANTIZED_MASS_TOLERANCE, scores_problem

    for scores in iter_parquet_shard(pf, path):
        problem = scores_problem(scores, QUANTIZED_MASS_TOLERANCE)
        if problem is not None:
            return f"{path}: {problem}; delete the shard and rerun generate-teacher"
    return None


def verify_cache(cache_dir: str | Path | Store) -> list[str]:
    """Check every shard's size, checksum, schema and counts; returns the problems found."""
    store = open_store(cache_dir)
    manifest = load_manifest(store)
    problems = []
    for shard in manifest["shards"]:
        problem = verify_shard(store, shard, manifest["top_k"])
        if problem:
            problems.append(problem)
    total_rows = sum(s["rows"] + len(s["skipped"]) for s in manifest["shards"])
    if total_rows != manifest["dataset"]["rows"]:
        problems.append(
            f"{store.where(fmt.MANIFEST_NAME)}: shards cover {total_rows} rows, dataset has {manifest['dataset']['rows']}"
        )
    return problems
