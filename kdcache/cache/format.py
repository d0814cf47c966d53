"""Cache format v1: the Parquet shard schema, its encodings, and the shard file layout.

One Parquet row per sequence. Per-position lists are flattened row-major, so a row with
``S`` supervised positions and top-k ``k`` has ``S * k`` entries in each top-k column.
The human-readable spec is ``schemas/v1/FORMAT.md``; ``python -m kdcache.cache.format
schemas`` regenerates the machine-readable files there from this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

SHARD_DIR = "shards"
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
SHARD_PATTERN = "part-{index:05d}.parquet"
SHARD_RECORD_PATTERN = "part-{index:05d}.json"

# Parquet key/value metadata keys written in every shard footer.
META_VERSION = b"kdcache.format_version"
META_ID_TABLE = b"kdcache.topk_id_table"  # zstd+base64 uint32 table: code -> token id
META_SHARD_INDEX = b"kdcache.shard_index"
META_TOP_K = b"kdcache.top_k"

ZSTD_LEVEL = 3

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
    "kdcache.topk_id_table: ids ordered by how often they occur in the shard's top-k lists); "
    "id = table[code].",
    "topk_code_b1": "binary [S*k bytes]. Byte 1 of each top-k code.",
    "topk_code_b2": "binary [S*k bytes, or empty when the shard's id table has <= 65536 ids]. Byte 2.",
    "topk_lpq_b0": "binary [S*k bytes]. Low byte of each top-k log-prob gap g (uint16 = b0 | b1 << 8). "
    "Per position: the quantized code of the top-1 log-prob, then the gaps between consecutive "
    "codes (codes are non-decreasing along descending log-prob); codes = cumulative sum of g.",
    "topk_lpq_b1": "binary [S*k bytes]. High byte of each top-k log-prob gap.",
    "sample_lengths": "list<uint16> [S]. Random-sampling mode: number of unique sampled ids per position.",
    "sample_id_gaps": "list<uint32> [sum(sample_lengths)]. Per position: the smallest sampled id, then "
    "gaps to the next (ids ascending).",
    "sample_counts": "list<uint16> [sum(sample_lengths)]. How many of the N draws hit each id.",
}


def shard_schema() -> pa.Schema:
    """The Arrow schema of every v1 shard (top-k and sampling columns are always present;
    unused ones hold empty lists)."""
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
            pa.field("sample_id_gaps", pa.list_(pa.uint32()), nullable=False),
            pa.field("sample_counts", pa.list_(pa.uint16()), nullable=False),
        ]
    )


def shard_schema_json() -> dict:
    """Language-neutral description of the shard schema (written to schemas/v1/shard.schema.json)."""
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
            META_ID_TABLE.decode(): "base64 of zstd-compressed little-endian uint32 array: code -> token id",
        },
    }


def write_schema_files(out_dir: str | Path) -> list[Path]:
    """Regenerate ``schemas/v1/*.json`` from the code (a test checks they are up to date)."""
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
