"""``kdcache rollout``: a student samples responses to a dataset's prompts, into shards that
``generate-teacher`` reads as they are (layout: :mod:`kdcache.rollout.rows`).

Sharding and resume work like stage one: prompt ``seq_id`` belongs to shard
``seq_id // shard_size``; worker ``I`` of ``W`` fills the shards with ``index % W == I``; a
shard is written to a hidden temporary file, fsynced and renamed, then its record is
written the same way, so a ``kill -9`` loses at most the shard in flight and a rerun of the
same command writes it again with the same rows (every sample has its own seed, see
:mod:`kdcache.rollout.engine`). The last worker to finish writes ``rollout.json``.

A LoRA adapter directory (``adapter_config.json``) is merged into its base in a temporary
directory (``$TMPDIR``) before the engine starts, and removed after: vLLM then loads a plain
checkpoint (its LoRA support limits ranks and target modules, and the transformers engine
would need peft at every step), the two engines sample the same merged weights, and
``train-student``'s ``run/model`` (already merged) needs no extra copy.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import itertools
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache import __version__
from kdcache.cache import run_dir
from kdcache.cache.storage import Store, is_url, open_store
from kdcache.errors import KdcacheError, first_line
from kdcache.progress import RowProgress
from kdcache.rollout import rows as layout
from kdcache.rollout.engine import Completion, RolloutEngine, SamplingSettings


@dataclass
class RolloutConfig:
    """Everything ``kdcache rollout`` takes. Lengths in tokens; ``shard_size`` in prompts."""

    student: str
    dataset: str
    output: str
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_length: int = 2048
    seed: int = 0
    round: int = 0
    backend: str = "auto"
    data_format: str | None = None
    split: str = "train"
    shard_size: int = 256
    num_workers: int = 1
    worker_index: int = 0
    output_format: str = "parquet"
    max_prompts: int | None = None
    skip_bad_rows: bool = False
    dtype: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    progress: bool = True
    engine_options: dict = field(default_factory=dict)

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.samples_per_prompt, self.temperature, self.top_p, self.max_new_tokens, self.seed,
                                self.max_length)

    def check(self) -> None:
        self.sampling().check()
        if self.backend not in ("auto", "vllm", "hf"):
            raise KdcacheError(f"--backend must be auto, vllm or hf, got {self.backend!r}")
        if self.output_format not in layout.OUTPUT_FORMATS:
            raise KdcacheError(f"--output-format must be parquet or jsonl, got {self.output_format!r}")
        if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
            raise KdcacheError(f"--worker-index must be in [0, --num-workers), got {self.worker_index} of {self.num_workers}")
        if self.shard_size < 1 or self.max_length < 2:
            raise KdcacheError("--shard-size must be >= 1 and --max-length >= 2")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise KdcacheError(f"--max-prompts must be >= 1, got {self.max_prompts}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise KdcacheError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")


# --------------------------------------------------------------------------- student


@dataclass
class Student:
    """The model that samples: an HF directory, or an adapter to merge into its base first."""

    spec: str
    path: Path  # the HF directory, or the adapter directory
    base: Path | None  # the adapter's base model, or None
    identity: dict  # what rollout.json records (content hashes)

    def tokenizer_dir(self) -> Path:
        if self.base is None or (self.path / "tokenizer_config.json").exists():
            return self.path
        return self.base


def resolve_student(spec: str) -> Student:
    """Locate the student and hash it (config and weights; base and adapter for an adapter).

    Raises:
        KdcacheError: not a model or adapter directory (one line naming it).
    """
    from kdcache.rollout.provenance import weights_sha256
    from kdcache.teacher.loading import read_config

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise KdcacheError(f"{spec}: the student must be a local model directory or a LoRA adapter directory")
    adapter_config = path / "adapter_config.json"
    if adapter_config.exists():
        try:
            base_spec = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError) as exc:
            raise KdcacheError(f"{adapter_config}: unreadable adapter config ({first_line(exc)})") from None
        base = Path(base_spec).expanduser()
        if not base.is_dir():
            raise KdcacheError(f"{spec}: the adapter's base model {base_spec!r} is not a local directory")
        config = base / "config.json"
        read_config(base)
        adapter = {"path": str(path.resolve()), "weights_sha256": weights_sha256(path),
                   "config_sha256": _sha256_bytes(adapter_config)}
        combined = hashlib.sha256(f"{weights_sha256(base)}+{adapter['weights_sha256']}".encode()).hexdigest()
        identity = {"spec": spec, "path": str(base.resolve()), "config_sha256": _sha256_bytes(config),
                    "weights_sha256": combined, "adapter": adapter}
        return Student(spec, path, base, identity)
    read_config(path)
    identity = {"spec": spec, "path": str(path.resolve()), "config_sha256": _sha256_bytes(path / "config.json"),
                "weights_sha256": weights_sha256(path), "adapter": None}
    return Student(spec, path, None, identity)


def _sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merged_student(student: Student, tokenizer: Any) -> tuple[Path, Path | None]:
    """``(model directory, temporary directory to remove)``: the student itself, or its
    adapter merged into the base (in the base's dtype) in a new temporary directory."""
    if student.base is None:
        return student.path, None
    from kdcache.student.modeling import checkpoint_dtype, export_model

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-student-"))
    target = tmp / "model"
    export_model(student.path, target, tokenizer=tokenizer, dtype=checkpoint_dtype(student.base), base=str(student.base))
    return target, tmp


# ------------------------------------------------------------------------ directory


def _has_finished_work(out: Store) -> bool:
    return bool(fnmatch.filter(out.list(layout.SHARD_DIR), layout.RECORD_PATTERN.replace("{index:05d}", "*")))


def claim_directory(out: Store, settings: dict) -> str:
    """Record the settings in ``rollout-run.json``, or refuse a directory holding a rollout
    with other settings (:func:`kdcache.cache.run_dir.claim_directory`); returns the hash."""
    return run_dir.claim_directory(
        out, settings, run_name=layout.RUN_NAME, own={layout.ENGINE_NAME},
        stale=(layout.SHARD_DIR, layout.WORKERS_DIR, layout.ENGINE_NAME), has_finished_work=_has_finished_work,
        what="rollout",
    )


def claim_engine(out: Store, engine: dict) -> None:
    """All shards of a rollout come from one engine: the same seed gives other samples in
    vLLM and in transformers, so a worker that loaded another backend, dtype or release stops."""
    run_dir.claim_uniform(out, layout.ENGINE_NAME, engine, lambda have, got: (
        f"its shards are sampled with {have.get('version')} in {have.get('dtype')}, but this worker loaded "
        f"{got.get('version')} in {got.get('dtype')}; pass --backend {have.get('backend')} --dtype {have.get('dtype')} "
        "with the same release"))


def load_record(out: Store, index: int) -> dict | None:
    """The record of a finished shard, or None (missing, unreadable, or its file changed size)."""
    try:
        record = out.read_json(f"{layout.SHARD_DIR}/{layout.RECORD_PATTERN.format(index=index)}")
        return record if out.size(record["file"]) == record["bytes"] else None
    except (KdcacheError, OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- shards


def completion_rows(completions: list[Completion], tokenizer: Any, references: dict[int, str | None],
                    tokenizer_key: str) -> dict[str, list]:
    """Column lists of a shard (:data:`kdcache.rollout.rows.ROW_FIELDS`) from its completions."""
    columns: dict[str, list] = {name: [] for name in layout.ROW_FIELDS}
    for c in completions:
        columns["prompt_seq_id"].append(int(c.seq_id))
        columns["sample_index"].append(int(c.sample_index))
        columns["prompt_source"].append(c.source)
        columns["prompt_ids"].append(c.prompt_ids.astype(np.int32))
        columns["response_ids"].append(c.response_ids.astype(np.int32))
        columns["response_logprobs"].append(c.logprobs.astype(np.float32))
        columns["finish_reason"].append(c.finish_reason)
        columns["prompt"].append(tokenizer.decode(c.prompt_ids.tolist(), skip_special_tokens=False))
        columns["response"].append(tokenizer.decode(c.response_ids.tolist(), skip_special_tokens=True))
        columns["reference"].append(references.get(c.seq_id))
        columns["tokenizer"].append(tokenizer_key)
    return columns


def encode_shard(columns: dict[str, list], output_format: str) -> bytes:
    """The shard file's bytes: zstd Parquet (one row group) or JSON Lines."""
    if output_format == "jsonl":
        keys = list(layout.ROW_FIELDS)
        lines = []
        for values in zip(*(columns[k] for k in keys)):
            row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in zip(keys, values)}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        return "".join(lines).encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = layout.row_schema()
    arrays = []
    for f in schema:
        values = columns[f.name]
        if pa.types.is_list(f.type):
            offsets = np.zeros(len(values) + 1, dtype=np.int32)
            np.cumsum([len(v) for v in values], out=offsets[1:])
            flat = np.concatenate(values) if values else np.zeros(0)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, f.type.value_type)))
        else:
            arrays.append(pa.array(values, f.type))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), sink, compression="zstd",
                   row_group_size=max(1, len(columns["prompt_seq_id"])))
    return sink.getvalue().to_pybytes()


def write_shard(out: Store, index: int, data: bytes, output_format: str, stats: dict) -> dict:
    """Write shard ``index``, then its record (each whole: :meth:`Store.write_bytes`); returns the record."""
    name = f"{layout.SHARD_DIR}/{layout.shard_name(index, output_format)}"
    record = {"index": index, "file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **stats}
    try:
        out.write_bytes(name, data)
        out.write_json(f"{layout.SHARD_DIR}/{layout.RECORD_PATTERN.format(index=index)}", record, indent=1)
    except OSError as exc:
        raise KdcacheError(f"{out.where(name)}: cannot write ({exc.strerror or exc}); free space or fix permissions "
                           "and rerun the same command (finished shards are kept)") from None
    return record


# ------------------------------------------------------------------------------- run


def run_rollout(cfg: RolloutConfig, engine: RolloutEngine | None = None) -> dict | None:
    """Sample this worker's shards; returns ``rollout.json`` if the rollout is complete afterwards.

    Args:
        cfg: the settings.
        engine: an engine already loaded with ``cfg.student`` (left open); None builds one
            from ``cfg`` when a shard needs sampling and closes it at the end.
    """
    from transformers import AutoTokenizer

    from kdcache.data import SkippedRow, open_dataset, reference_text, tokenize_rows
    from kdcache.rollout.engine import make_engine
    from kdcache.teacher.loading import resolve_local, tokenizer_fingerprint

    cfg.check()
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if is_url(cfg.output):
        raise KdcacheError(f"--output {cfg.output}: rollouts are written to a local directory (generate-teacher reads "
                           "them from there); copy the finished directory to the bucket if needed")
    out = open_store(cfg.output)
    student = resolve_student(cfg.student)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(student.tokenizer_dir()))
    except Exception as exc:  # noqa: BLE001 - missing or broken tokenizer files fail in many ways
        raise KdcacheError(f"{cfg.student}: cannot load the student's tokenizer ({first_line(exc)})") from None
    tok_fp = tokenizer_fingerprint(tokenizer)
    tokenizer_key = f"{tok_fp['vocab_size']}:{tok_fp['vocab_sha256']}"
    dataset = open_dataset(cfg.dataset, fmt=cfg.data_format, split=cfg.split)
    data_format = dataset.format
    fingerprint = dataset.fingerprint()
    sampling = cfg.sampling()
    settings = {
        "format_version": layout.ROLLOUT_VERSION,
        "student": {k: student.identity[k] for k in ("config_sha256", "weights_sha256")},
        "tokenizer": tok_fp,
        "round": cfg.round,
        "sampling": sampling.to_json(),
        "prompts": {"fingerprint": fingerprint, "format": data_format, "max_prompts": cfg.max_prompts},
        "shard_size": cfg.shard_size,
        "output_format": cfg.output_format,
    }
    settings_hash = claim_directory(out, settings)

    total = dataset.num_rows_hint()
    if total is None:
        total = sum(1 for _ in dataset.rows())
    if cfg.max_prompts is not None:
        total = min(total, cfg.max_prompts)
    n_shards = math.ceil(total / cfg.shard_size)
    todo = [i for i in range(n_shards) if i % cfg.num_workers == cfg.worker_index and load_record(out, i) is None]

    own_engine, merged_tmp = engine is None, None
    todo_samples = sampling.samples_per_prompt * sum(min(cfg.shard_size, total - i * cfg.shard_size) for i in todo)
    bar: RowProgress | None = None
    try:
        rows = itertools.takewhile(lambda item: item[0] < total, dataset.rows())
        for index, shard_rows in run_dir.shards_of_rows(rows, cfg.shard_size):
            if index not in todo:
                continue
            examples, skipped = [], []
            for item in tokenize_rows(shard_rows, tokenizer, cfg.max_length, fmt=data_format,
                                      skip_bad_rows=cfg.skip_bad_rows, prompt_only=True):
                if isinstance(item, SkippedRow):
                    skipped.append({"seq_id": item.seq_id, "source": item.source, "reason": item.reason})
                else:
                    examples.append(item)
            if engine is None:  # loaded once the first shard is tokenized: a bad first row fails fast
                model_dir, merged_tmp = merged_student(student, tokenizer)
                engine = make_engine(cfg.backend, resolve_local(model_dir), dtype=cfg.dtype,
                                     **_engine_options(cfg, model_dir))
            if bar is None:  # rate and ETA count from here, not from the model's load
                bar = RowProgress(todo_samples, cfg.progress, unit="sample")
            claim_engine(out, {"backend": engine.name, "dtype": str(engine.dtype), "version": engine.engine_version()})
            references = {seq_id: reference_text(row, data_format) if isinstance(row, dict) else None
                          for seq_id, _, row in shard_rows}
            completions = list(engine.sample(examples, sampling, progress=bar.finished))
            bar.update(len(skipped) * sampling.samples_per_prompt, sum(c.num_tokens for c in completions))
            columns = completion_rows(completions, tokenizer, references, tokenizer_key)
            stats = {"prompts": len(shard_rows), "rows": len(completions),
                     "response_tokens": int(sum(c.num_tokens for c in completions)),
                     "stopped": sum(c.finish_reason == "stop" for c in completions), "skipped": skipped}
            run_dir.check_claim(out, layout.RUN_NAME, settings_hash, "rollout")
            write_shard(out, index, encode_shard(columns, cfg.output_format), cfg.output_format, stats)
    finally:
        if bar is not None:
            bar.close()
        if own_engine and engine is not None:
            engine.close()
        if merged_tmp is not None:
            shutil.rmtree(merged_tmp, ignore_errors=True)

    out.write_json(f"{layout.WORKERS_DIR}/worker-{cfg.worker_index}-of-{cfg.num_workers}.json", {
        "prompts": {"source": str(cfg.dataset), "format": data_format, "fingerprint": fingerprint, "rows": total,
                    "split": getattr(dataset, "split", None), "max_length": cfg.max_length},
        "student": student.identity,
        "finished_at": _now(),
    })
    return finalize(out)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def finalize(out: str | Path | Store) -> dict | None:
    """Write ``rollout.json`` if every shard is finished; returns it, else None."""
    out = open_store(out)
    workers = sorted(fnmatch.filter(out.list(layout.WORKERS_DIR), "worker-*.json"))
    if not workers:
        return None
    run = out.read_json(layout.RUN_NAME)
    meta = out.read_json(f"{layout.WORKERS_DIR}/{workers[0]}")
    settings = run["settings"]
    n_shards = math.ceil(meta["prompts"]["rows"] / settings["shard_size"])
    records = [load_record(out, i) for i in range(n_shards)]
    if any(r is None for r in records):
        return None
    engine = out.read_json(layout.ENGINE_NAME) if out.exists(layout.ENGINE_NAME) else {}
    manifest = {
        "format": layout.ROLLOUT_FORMAT,
        "format_version": layout.ROLLOUT_VERSION,
        "complete": True,
        "created_at": _now(),
        "tool_version": f"kdcache {__version__}",
        "round": settings["round"],
        "student": meta["student"],
        "tokenizer": settings["tokenizer"],
        "engine": engine,
        "sampling": {**settings["sampling"], "logprobs": "sampling distribution: log-softmax after temperature and "
                     "top-p over the tokenizer's vocabulary (0 for greedy decoding)"},
        "prompts": meta["prompts"],
        "output_format": settings["output_format"],
        "shard_size": settings["shard_size"],
        "settings_hash": run["settings_hash"],
        "shards": records,
        "totals": {
            "prompts": sum(r["prompts"] for r in records),
            "rows": sum(r["rows"] for r in records),
            "response_tokens": sum(r["response_tokens"] for r in records),
            "stopped": sum(r["stopped"] for r in records),
            "skipped_prompts": sum(len(r["skipped"]) for r in records),
            "bytes": sum(r["bytes"] for r in records),
        },
    }
    out.write_json(layout.MANIFEST_NAME, manifest)
    return manifest


def _engine_options(cfg: RolloutConfig, model_dir: Path) -> dict:
    """vLLM options; the context defaults to ``--max-length`` (prompt + response), capped at the model's."""
    from kdcache.teacher.loading import context_length, read_config

    context = context_length(read_config(model_dir))
    options = {
        "quantization": cfg.quantization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_model_len": cfg.max_model_len or min(cfg.max_length, context or cfg.max_length),
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed,
    }
    options.update(cfg.engine_options)
    return options
