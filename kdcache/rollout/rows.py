"""The layout of a rollout directory (written by ``kdcache rollout``, read by ``generate-teacher``).

::

    OUT/rollout-run.json          settings + their hash (claims the directory; written first)
    OUT/engine.json               the engine that samples (backend, dtype): one per directory
    OUT/shards/part-00000.parquet one row per (prompt, sample): prompts [0, shard_size) ...
    OUT/shards/part-00000.json    the shard's record (counts, bytes, sha256): marks it finished
    OUT/workers/worker-I-of-W.json  a worker that finished its shards
    OUT/rollout.json              the manifest, written last, once every shard is finished

A directory holding ``rollout-run.json`` but no ``rollout.json`` is unfinished, and
``kdcache.data.open_dataset`` refuses it. Shard ``i`` holds the completions of prompts
``i * shard_size .. (i + 1) * shard_size - 1`` ordered by prompt, then sample index, so the
files read in name order give every row a stable position.

Row fields (:data:`ROW_FIELDS`; JSONL rows carry the same keys):
"""

from __future__ import annotations

ROLLOUT_FORMAT = "kdcache-rollout"
ROLLOUT_VERSION = 1
RUN_NAME = "rollout-run.json"
MANIFEST_NAME = "rollout.json"
ENGINE_NAME = "engine.json"
SHARD_DIR = "shards"
WORKERS_DIR = "workers"
RECORD_PATTERN = "part-{index:05d}.json"
OUTPUT_FORMATS = ("parquet", "jsonl")

ROW_FIELDS: dict[str, str] = {
    "prompt_seq_id": "int64. Row of the prompt in the prompt dataset (0-based).",
    "sample_index": "int32. 0 .. samples_per_prompt - 1.",
    "prompt_source": "string. 'path:row' (1-based) of the prompt row.",
    "prompt_ids": "list<int32>. The prompt as the model saw it (chat template applied).",
    "response_ids": "list<int32>. The sampled tokens, ending with the EOS id when finish_reason is 'stop'.",
    "response_logprobs": "list<float32>. log mu(x_t) of each sampled token under the sampling distribution "
    "(after temperature and top-p, over the tokenizer's vocabulary; 0 for greedy decoding).",
    "finish_reason": "string. 'stop' (an EOS id was sampled) or 'length' (max_new_tokens or max_length reached).",
    "prompt": "string. prompt_ids decoded (special tokens kept), for reading.",
    "response": "string. response_ids decoded without special tokens.",
    "reference": "string or null. The prompt row's own response, when it has one (for ROUGE-L).",
    "tokenizer": "string. '<vocab_size>:<vocab_sha256>' of the tokenizer that made the ids; a reader "
    "with another vocabulary refuses the rows.",
}

__doc__ += "\n".join(f"* ``{name}``: {doc}" for name, doc in ROW_FIELDS.items()) + "\n"


def shard_name(index: int, output_format: str) -> str:
    return f"part-{index:05d}.{output_format}"


def row_schema():
    """The Arrow schema of a Parquet rollout shard (field order of :data:`ROW_FIELDS`)."""
    import pyarrow as pa

    return pa.schema([
        pa.field("prompt_seq_id", pa.int64(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("prompt_source", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("reference", pa.string(), nullable=True),
        pa.field("tokenizer", pa.string(), nullable=False),
    ])
