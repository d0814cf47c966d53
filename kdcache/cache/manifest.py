"""``manifest.json``: what a finished cache holds, how it was made, and every shard's checksum.

The manifest is written last, atomically, and only when every shard of the input is
finished; a directory without it is an unfinished run that ``generate-teacher`` resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from kdcache.cache import format as fmt
from kdcache.cache.storage import LocalStore, ObjectStore, Store, open_store
from kdcache.errors import KdcacheError

_SHARD = {
    "type": "object",
    "required": ["index", "file", "rows", "first_seq_id", "last_seq_id", "supervised_tokens",
                 "topk_entries", "sample_entries", "bytes", "sha256", "skipped"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "file": {"type": "string"},
        "rows": {"type": "integer", "minimum": 0},
        "first_seq_id": {"type": "integer"},
        "last_seq_id": {"type": "integer"},
        "supervised_tokens": {"type": "integer", "minimum": 0},
        "topk_entries": {"type": "integer", "minimum": 0},
        "sample_entries": {"type": "integer", "minimum": 0},
        "topk_mass_sum": {"type": "number"},
        "max_input_tokens": {"type": "integer", "minimum": 0,
                             "description": "longest model input (tokens up to the last supervised position); "
                                            "absent or 0 in caches of kdcache <= 0.2"},
        "bytes": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "skipped": {"type": "array", "items": {"type": "object", "required": ["seq_id", "source", "reason"]}},
    },
}


def manifest_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of a manifest of the current format version."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kdcache cache manifest",
        "type": "object",
        "required": ["format", "format_version", "complete", "created_at", "tool_version", "teacher",
                     "tokenizer", "top_k", "sampling", "logprobs", "mode", "dataset", "shard_size",
                     "settings_hash", "shards", "totals"],
        "properties": {
            "format": {"const": fmt.FORMAT_NAME},
            "format_version": {"type": "integer"},
            "complete": {"const": True},
            "created_at": {"type": "string", "description": "UTC ISO-8601 time the manifest was written"},
            "tool_version": {"type": "string"},
            "teacher": {
                "type": "object",
                "required": ["model", "dtype", "quantization", "backend"],
                "properties": {
                    "model": {"type": "string", "description": "path or hub id as given"},
                    "revision": {"type": ["string", "null"]},
                    "config_sha256": {"type": ["string", "null"]},
                    "dtype": {"type": "string"},
                    "quantization": {"type": ["string", "null"]},
                    "backend": {"enum": ["vllm", "hf", "auto"], "description": "backend that scored the shards ('auto' only if no worker loaded a teacher)"},
                },
            },
            "tokenizer": {
                "type": "object",
                "required": ["vocab_size", "vocab_sha256", "special_tokens", "chat_template_sha256"],
                "properties": {
                    "vocab_size": {"type": "integer", "minimum": 1},
                    "vocab_sha256": {"type": "string"},
                    "special_tokens": {"type": "object"},
                    "chat_template_sha256": {"type": ["string", "null"]},
                },
            },
            "top_k": {"type": "integer", "minimum": 0},
            "sampling": {
                "type": "object",
                "required": ["mode", "num_samples", "seed"],
                "properties": {
                    "mode": {"enum": ["none", "random", "tail"],
                             "description": "random: draws from the full distribution; tail: from the distribution "
                                            "restricted to the ids outside the position's top-k"},
                    "num_samples": {"type": "integer", "minimum": 0},
                    "seed": {"type": "integer"},
                    "draws": {"enum": ["iid", "systematic"],
                              "description": "iid: N independent draws; systematic: N evenly spaced points on the "
                                             "CDF from one uniform offset (kdcache 0.4; absent means iid)"},
                },
            },
            "logprobs": {
                "type": "object",
                "required": ["mode", "temperature", "quantization"],
                "properties": {
                    "mode": {"const": "raw", "description": "log_softmax of the unscaled logits"},
                    "temperature": {"type": "number"},
                    "quantization": {"type": "object"},
                },
            },
            "mode": {"enum": ["score", "generate"]},
            "generation": {"type": ["object", "null"]},
            "dataset": {
                "type": "object",
                "required": ["source", "format", "fingerprint", "max_length", "rows"],
                "properties": {
                    "rollout": {
                        "type": "object",
                        "description": "present when the dataset is a kdcache rollout (format v3): which student, "
                                       "round and sampling settings produced the responses; the shards then hold "
                                       "rollout_logprob_q",
                        "required": ["round", "student", "engine", "sampling", "settings_hash", "prompts"],
                        "properties": {
                            "round": {"type": "integer"},
                            "student": {"type": "object", "required": ["spec", "weights_sha256"]},
                            "engine": {"type": "object"},
                            "sampling": {"type": "object"},
                            "settings_hash": {"type": "string"},
                            "prompts": {"type": "object"},
                        },
                    },
                },
            },
            "shard_size": {"type": "integer", "minimum": 1},
            "settings_hash": {"type": "string"},
            "shards": {"type": "array", "items": _SHARD},
            "totals": {
                "type": "object",
                "required": ["sequences", "supervised_tokens", "skipped_rows", "bytes", "shards"],
            },
        },
    }


def validate_manifest(manifest: dict, path: Path) -> None:
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version not in fmt.SUPPORTED_VERSIONS:
        raise fmt.version_error(path, version)
    try:
        jsonschema.validate(manifest, manifest_json_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(top level)"
        raise KdcacheError(f"{path}: invalid manifest at {where}: {exc.message}") from None


def load_manifest(cache_dir: str | Path | Store) -> dict:
    """Read and validate ``cache_dir/manifest.json`` (a directory or a store URL); one-line
    KdcacheError if unusable."""
    store = open_store(cache_dir)
    path = store.where(fmt.MANIFEST_NAME)
    try:
        raw = store.read_bytes(fmt.MANIFEST_NAME)
    except FileNotFoundError:
        if not store.exists():
            if isinstance(store, ObjectStore):
                store.check_bucket()
            raise KdcacheError(f"{store.where()}: no such cache directory") from None
        hint = "the run is unfinished: rerun the same generate-teacher command to complete it"
        if not store.exists(fmt.RUN_NAME):
            hint = "not a kdcache directory (no manifest.json or run.json)"
        raise KdcacheError(f"{path}: missing; {hint}") from None
    except IsADirectoryError:
        raise KdcacheError(f"{path}: is a directory; not a kdcache cache") from None
    except NotADirectoryError:
        raise KdcacheError(f"{store.where()}: no such cache directory") from None
    try:
        manifest = json.loads(bytes(raw))
    except ValueError as exc:
        raise KdcacheError(f"{path}: invalid JSON ({exc}); rerun generate-teacher to rewrite it") from exc
    validate_manifest(manifest, path)
    if manifest["totals"]["sequences"] == 0:
        skipped = [row for shard in manifest["shards"] for row in shard.get("skipped", [])]
        why = (f"; all {len(skipped)} input rows were skipped as bad, e.g. {skipped[0]['source']}: {skipped[0]['reason']}"
               if skipped else "")
        raise KdcacheError(f"{path}: the cache is empty (0 sequences{why}); check the dataset given to generate-teacher")
    return manifest


def sampling_mode(manifest: dict) -> str:
    """"none", "random" (draws from the full distribution) or "tail" (from outside the top-k)."""
    sampling = manifest["sampling"]
    return sampling["mode"] if int(sampling["num_samples"]) > 0 else "none"


def sampling_draws(manifest: dict) -> str:
    """How a sampling cache's draws were made: "iid" or "systematic" (caches before kdcache
    0.4 do not say, and are iid)."""
    return manifest["sampling"].get("draws", "iid")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temp file, fsync, rename; on failure (e.g. disk full) nothing is left."""
    path = Path(path)
    LocalStore(path.parent).write_json(path.name, payload)
