"""Cache format (version ``FORMAT_VERSION``): the Parquet shard schema, its encodings, and the shard file layout.

One Parquet row per sequence. Per-position lists are flattened row-major, so a row with
``S`` supervised positions and top-k ``k`` has ``S * k`` entries in each top-k column.
The human-readable spec is ``schemas/v3/FORMAT.md``; ``python -m kdcache.cache.format
schemas`` regenerates the machine-readable files there from this module.

v3 adds one column to v2, ``rollout_logprob_q``: for a cache of ``kdcache
rollout`` samples, the sampling policy's log-prob of each target token. v2 shards, which
lack it, are read as caches of fixed data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa

from kdcache.errors import KdcacheError

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (2, 3)
# v1 (kdcache 0.1.x) stored sampled ids as raw id gaps and counts as list<uint16>, and an
# uncompressed-delta id table that the Arrow schema in the footer repeated.

SHARD_DIR = "shards"
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
SHARD_PATTERN = "part-{index:05d}.parquet"
SHARD_RECORD_PATTERN = "part-{index:05d}.json"

# Parquet key/value metadata keys written in every shard footer.
META_VERSION = b"kdcache.format_version"
META_ID_TABLE = b"kdcache.id_table"  # zstd+base64 uint32 table: code -> token id
META_SHARD_INDEX = b"kdcache.shard_index"
META_TOP_K = b"kdcache.top_k"

ZSTD_LEVEL = 1

COLUMNS_DOC: dict[str, str] = {
    "seq_id": "int64. 0-based row index in the input stream; shard i holds a fixed seq_id range.",
    "source": "string. 'path:row' (1-based) of the input row.",
    "input_ids": "list<int32> [L]. The exact tokens the teacher scored (prompt + response).",
    "target_positions": "list<int32> [S]. Ascending positions i (1 <= i < L) of supervised tokens; "
    "the stored distribution is p(. | input_ids[:i]).",
    "target_logprob_q": "list<uint16> [S]. Quantized teacher log-prob of input_ids[i] (see quantization).",
    "tail_logmass": "list<float32> [S]. log(1 - sum_j p_topk_j) from unquantized float64 sums; "
    "-inf if the top-k holds all mass. Empty list when top_k = 0.",
    "topk_code_b0": "binary [S*k bytes]. Byte 0 (least significant) of each top-k code; with b1 and b2 "
    "it forms a 24-bit code per entry: code = b0 | b1 << 8 | b2 << 16. Per position, the top-k "
    "token ids by descending log-prob, each as its code in the shard's id table (footer key "
    "kdcache.id_table: ids ordered by how often they occur in the shard's top-k lists and samples); "
    "id = table[code].",
    "topk_code_b1": "binary [S*k bytes]. Byte 1 of each top-k code.",
    "topk_code_b2": "binary [S*k bytes, or empty when the shard's id table has <= 65536 ids]. Byte 2.",
    "topk_lpq_b0": "binary [S*k bytes]. Low byte of each top-k log-prob gap g (uint16 = b0 | b1 << 8). "
    "Per position: the quantized code of the top-1 log-prob, then the gaps between consecutive "
    "codes (codes are non-decreasing along descending log-prob); codes = cumulative sum of g.",
    "topk_lpq_b1": "binary [S*k bytes]. High byte of each top-k log-prob gap.",
    "sample_lengths": "list<uint16> [S]. Random-sampling mode: number of unique sampled ids per position.",
    "sample_code_gaps": "list<uint32> [M = sum(sample_lengths)]. Per position, the sampled ids as codes "
    "in the shard's id table (as for top-k), ascending: the smallest code, then the gaps to the next.",
    "sample_count_b0": "binary [M bytes]. Low byte of how many of the N draws hit each sampled id "
    "(same order as sample_code_gaps).",
    "sample_count_b1": "binary [M bytes, or empty when every count of the shard is <= 255]. High byte.",
    "rollout_logprob_q": "list<uint16> [S] in a cache of kdcache rollout samples, else empty. Quantized log-prob "
    "of input_ids[i] under the policy that sampled it (the rollout's response_logprobs; same quantization as "
    "target_logprob_q). New in v3.",
}


def version_error(where: Path | str, version: int) -> KdcacheError:
    """The one-line refusal for a cache format this kdcache does not read."""
    supported = ", v".join(map(str, SUPPORTED_VERSIONS))
    if version < min(SUPPORTED_VERSIONS):
        hint = "regenerate the cache with this kdcache (or read it with the kdcache version that wrote it)"
    else:
        hint = "upgrade kdcache"
    return KdcacheError(f"{where}: cache format v{version} is not supported (this kdcache reads v{supported}); {hint}")


def shard_schema(version: int = FORMAT_VERSION) -> pa.Schema:
    """The Arrow schema of every shard of format ``version`` (top-k and sampling columns are always present;
    unused ones hold empty lists)."""
    if version not in SUPPORTED_VERSIONS:
        raise version_error("shard schema", version)
    v3 = [pa.field("rollout_logprob_q", pa.list_(pa.uint16()), nullable=False)] if version >= 3 else []
    return pa.schema(
        [
            pa.field("seq_id", pa.int64(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("target_positions", pa.list_(pa.int32()), nullable=False),
            pa.field("target_logprob_q", pa.list_(pa.uint16()), nullable=False),
            pa.field("tail_logmass", pa.list_(pa.float32()), nullable=False),
            pa.field("topk_code_b0", pa.binary(), nullable=False),
            pa.field("topk_code_b1", pa.binary(), nullable=False),
            pa.field("topk_code_b2", pa.binary(), nullable=False),
            pa.field("topk_lpq_b0", pa.binary(), nullable=False),
            pa.field("topk_lpq_b1", pa.binary(), nullable=False),
            pa.field("sample_lengths", pa.list_(pa.uint16()), nullable=False),
            pa.field("sample_code_gaps", pa.list_(pa.uint32()), nullable=False),
            pa.field("sample_count_b0", pa.binary(), nullable=False),
            pa.field("sample_count_b1", pa.binary(), nullable=False),
            *v3,
        ]
    )


def shard_schema_json() -> dict:
    """Language-neutral description of the shard schema (written to schemas/vN/shard.schema.json)."""
    schema = shard_schema()
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "compression": f"zstd (level {ZSTD_LEVEL} by default)",
        "row": "one sequence",
        "columns": [
            {"name": f.name, "arrow_type": str(f.type), "nullable": f.nullable, "doc": COLUMNS_DOC[f.name]}
            for f in schema
        ],
        "footer_metadata": {
            META_VERSION.decode(): "format version as decimal text",
            META_SHARD_INDEX.decode(): "shard index as decimal text",
            META_TOP_K.decode(): "k as decimal text",
            META_ID_TABLE.decode(): "code -> token id table: base64 of zstd of the byte planes (b0 of every entry, then b1, b2, b3) of the little-endian int32 deltas of the table (table = cumsum(deltas))",
        },
    }


def write_schema_files(out_dir: str | Path) -> list[Path]:
    """Regenerate ``schemas/vN/*.json`` (N = FORMAT_VERSION) from the code (a test checks they are up to date)."""
    from kdcache.cache.manifest import manifest_json_schema

    out = Path(out_dir) / f"v{FORMAT_VERSION}"
    out.mkdir(parents=True, exist_ok=True)
    files = {
        out / "shard.schema.json": shard_schema_json(),
        out / "manifest.schema.json": manifest_json_schema(),
    }
    for path, payload in files.items():
        path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return list(files)


if __name__ == "__main__":  # python -m kdcache.cache.format schemas
    for written in write_schema_files(sys.argv[1] if len(sys.argv) > 1 else "schemas"):
        print(written)
