"""Stage one end to end: dataset -> teacher -> finished, verifiable cache directory.

Sharding: input row ``seq_id`` belongs to shard ``seq_id // shard_size``; worker ``I`` of
``W`` fills the shards with ``index % W == I``. A shard is finished when its record file
exists (see :mod:`kdcache.cache.writer`), so rerunning the same command after a crash skips
finished shards and rewrites only the missing ones. The last worker to finish writes
``manifest.json``; until then the directory holds ``run.json`` (the settings) and shards.
The output may be a local directory or an object-store URL: every file goes through
:mod:`kdcache.cache.storage`, whose docstring says what differs on an object store.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import itertools
import math
import os
import queue
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from kdcache import __version__
from kdcache.cache import format as fmt
from kdcache.cache import run_dir
from kdcache.cache.manifest import validate_manifest, write_json_atomic  # noqa: F401 - re-exported
from kdcache.cache.quantize import MAX_ABS_ERROR_COARSE, MAX_ABS_ERROR_FINE
from kdcache.cache.records import scores_problem
from kdcache.cache.storage import Store, open_store
from kdcache.cache.writer import ShardRecord, finished_shards, load_shard_record, write_shard
from kdcache.errors import KdcacheError, first_line
from kdcache.progress import RowProgress
from kdcache.teacher.base import ScoringSettings
from kdcache.teacher.launcher import resolve_workers
from kdcache.teacher.statistics import DRAW_SCHEMES

WORKERS_DIR = "workers"
TOKENIZER_DIR = "tokenizer"


@dataclass
class GenerateConfig:
    """Everything `kdcache generate-teacher` takes. Units: lengths in tokens, shard_size in rows."""

    teacher: str
    dataset: str
    output: str
    backend: str = "auto"
    # Defaults from benchmarks/results/quality_gpu.md: top-4 + tail bucket + 8 systematic draws
    # from outside the top-4 closed 100% of the online-KD gap (held-out KL) at 27 B/token.
    top_k: int = 4
    sampling: str = "tail"  # "none" | "random" (full distribution) | "tail" (outside the top-k)
    samples: int = 8
    draws: str = "systematic"  # "systematic" | "iid": how the N draws are placed on the CDF
    seed: int = 0
    max_length: int | None = None  # None: DEFAULT_MAX_LENGTH, or the teacher's context if shorter
    data_format: str | None = None
    split: str = "train"  # split of a `datasets` DatasetDict directory or hub dataset
    mode: str = "score"  # "score" | "generate"
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    shard_size: int = 1024
    # None: from the launcher (SLURM array / srun / torchrun), else 1 worker, index 0
    # (kdcache.teacher.launcher.resolve_workers).
    num_workers: int | None = None
    worker_index: int | None = None
    skip_bad_rows: bool = False
    dtype: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: 0.85 on GPU, 0.3 on CPU
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None  # None: eager on CPU, compiled on GPU
    zstd_level: int = fmt.ZSTD_LEVEL
    progress: bool = True
    # Read + tokenize the next shard and write the previous one in background threads while
    # the teacher scores, so the engine does not wait on the host (holds up to two shards'
    # results in memory). False runs the three steps in turn.
    overlap: bool = True
    engine_options: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.sampling not in ("none", "random", "tail"):
            raise KdcacheError(f"--sampling must be 'none', 'random' or 'tail', got {self.sampling!r}")
        if self.mode not in ("score", "generate"):
            raise KdcacheError(f"--mode must be 'score' or 'generate', got {self.mode!r}")
        if self.top_k < 0 or (self.top_k == 0 and self.sampling == "none"):
            raise KdcacheError("--top-k must be >= 1 (or 0 together with --sampling random)")
        if self.sampling == "tail" and self.top_k == 0:
            raise KdcacheError("--sampling tail draws from outside the top-k: it needs --top-k >= 1")
        if self.sampling != "none" and not 1 <= self.samples <= 65535:
            raise KdcacheError("--samples must be between 1 and 65535")
        if self.draws not in DRAW_SCHEMES:
            raise KdcacheError(f"--draws must be 'systematic' or 'iid', got {self.draws!r}")
        num_workers = 1 if self.num_workers is None else self.num_workers
        worker_index = 0 if self.worker_index is None else self.worker_index
        if num_workers < 1:
            raise KdcacheError(f"--num-workers must be >= 1, got {num_workers}")
        if not 0 <= worker_index < num_workers:
            raise KdcacheError(f"--worker-index must be in [0, {num_workers}), got {worker_index}")
        if self.shard_size < 1 or (self.max_length is not None and self.max_length < 2):
            raise KdcacheError("--shard-size must be >= 1 and --max-length >= 2")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise KdcacheError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.sampling == "none" and self.draws != "systematic":
            raise KdcacheError(f"--draws {self.draws} places the draws of --sampling random or tail; this run stores none")
        if self.mode == "score" and (self.temperature != 1.0 or self.top_p != 1.0):
            raise KdcacheError("--temperature and --top-p shape the responses of --mode generate; scoring always stores "
                               "the teacher's temperature-1 log-probs (the student's --temperature sets the KD temperature)")
        if self.mode == "generate":
            if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
                raise KdcacheError("--mode generate needs --temperature >= 0 (0 = greedy), --top-p in (0, 1] "
                                   "and --max-new-tokens >= 1")


def _content_settings(cfg: GenerateConfig, teacher_info: dict, tok_fp: dict, dataset_info: dict) -> dict:
    """Everything that changes what the shards contain; two runs may share a directory only
    if these match exactly."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        # What scored the shards (backend and dtype as loaded) is checked by claim_scorer.
        "teacher": {k: teacher_info.get(k) for k in ("model", "config_sha256", "gguf_sha256", "revision", "quantization")},
        "tokenizer": tok_fp,
        "top_k": cfg.top_k,
        "sampling": _sampling(cfg),
        "mode": cfg.mode,
        "generation": _generation(cfg),
        "dataset": {k: dataset_info[k] for k in ("fingerprint", "format")},
        "max_length": cfg.max_length,
        "shard_size": cfg.shard_size,
    }


def _sampling(cfg: GenerateConfig) -> dict:
    if cfg.sampling == "none":
        return {"mode": "none", "num_samples": 0, "seed": cfg.seed}
    return {"mode": cfg.sampling, "num_samples": cfg.samples, "seed": cfg.seed, "draws": cfg.draws}


def _generation(cfg: GenerateConfig) -> dict | None:
    if cfg.mode != "generate":
        return None
    return {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}


def _has_finished_work(out: Store) -> bool:
    """Whether any shard (or worker) of the run in ``out`` has finished."""
    shard_records = fnmatch.filter(out.list(fmt.SHARD_DIR), fmt.SHARD_RECORD_PATTERN.replace("{index:05d}", "*"))
    return bool(shard_records) or bool(fnmatch.filter(out.list(WORKERS_DIR), "worker-*.json"))


def claim_directory(out: str | Path | Store, settings: dict) -> str:
    """Record the run's settings in ``run.json``, or refuse a directory made with other settings
    (:func:`kdcache.cache.run_dir.claim_directory`); returns the settings' hash."""
    return run_dir.claim_directory(
        open_store(out), settings, run_name=fmt.RUN_NAME, own={TOKENIZER_DIR, SCORER_NAME},
        stale=(SCORER_NAME, fmt.SHARD_DIR, TOKENIZER_DIR), has_finished_work=_has_finished_work, what="run",
    )


def check_claim(out: str | Path | Store, settings_hash: str, scorer: dict | None = None) -> None:
    """Stop before recording a shard if the directory was claimed by a run with other settings
    (or, given this worker's ``scorer``, if ``scorer.json`` names another backend or dtype).

    Runs before every shard record: on an object store, where two workers can both create
    ``run.json`` or ``scorer.json`` at the same moment (see :mod:`kdcache.cache.storage`), this
    is what stops the worker whose claim lost before it records anything.
    """
    out = open_store(out)
    run_dir.check_claim(out, fmt.RUN_NAME, settings_hash, "generate-teacher run")
    if scorer is not None:
        run_dir.check_uniform(out, SCORER_NAME, scorer, _scorer_mismatch)


SCORER_NAME = "scorer.json"


def claim_scorer(out: str | Path | Store, scorer: dict) -> None:
    """Every shard of a cache must come from the same backend, dtype and scoring path: the
    first worker to load its teacher records them in ``scorer.json``; a worker that loaded
    something else (``--backend auto`` fell back to transformers on one machine, another
    vLLM release took the prompt-log-prob path) stops before writing."""
    run_dir.claim_uniform(open_store(out), SCORER_NAME, scorer, _scorer_mismatch)


def _scorer_mismatch(existing: dict, scorer: dict) -> str:
    return (f"its shards are scored with backend {existing.get('backend_used')} in {existing.get('dtype_loaded')} "
            f"({existing.get('scoring_path')}), but this worker loaded backend {scorer.get('backend_used')} in "
            f"{scorer.get('dtype_loaded')} ({scorer.get('scoring_path')}); pass --backend {existing.get('backend_used')} "
            f"--dtype {existing.get('dtype_loaded')} (and the same vLLM release) so the cache stays uniform")


#: ``--max-length`` when not given (or the teacher's context, if shorter).
DEFAULT_MAX_LENGTH = 2048


def _fit_to_teacher(cfg: GenerateConfig, teacher_path: Path, tokenizer) -> int:
    """Check, before any shard is written, that the teacher can score this run, and settle
    ``cfg.max_length``; returns the positions a sequence needs beyond its length (1 on vLLM's
    prompt-log-prob path, which also emits a token; else 0).

    One context rule for every backend (:func:`kdcache.teacher.loading.context_error`): an
    explicit ``--max-length`` beyond the teacher's context is refused; without one, the
    default is cut to the context. A tokenizer with more tokens than the model has output rows
    is refused too.
    """
    from kdcache.teacher.loading import context_error, context_length, read_config, vllm_path, vocab_rows_of
    from kdcache.teacher.sampling import vocab_rows_error

    path = vllm_path() if cfg.backend != "hf" else None
    extra = 1 if path == "vllm-prompt-logprobs" else 0
    try:
        config = read_config(teacher_path)
    except KdcacheError:
        config = None  # the backend reports an unloadable config itself
    if cfg.max_length is None:
        context = context_length(config) if config else None
        cfg.max_length = DEFAULT_MAX_LENGTH if context is None else min(DEFAULT_MAX_LENGTH, context - extra)
    if config is None:
        return extra
    if (error := context_error(cfg.teacher, config, cfg.max_length, extra)) is not None:
        raise error
    rows = vocab_rows_of(config)
    if rows is not None and rows < len(tokenizer):
        raise vocab_rows_error(cfg.teacher, len(tokenizer), rows)
    return extra


def save_tokenizer(out: str | Path | Store, tokenizer) -> None:
    """Keep the teacher's tokenizer in ``out/tokenizer`` so stage two can name the first token
    a student tokenizer maps differently, on a machine that has no copy of the teacher.

    A local directory gets it by one rename; on an object store the files are uploaded with
    ``tokenizer_config.json`` last, whose presence marks the copy complete."""
    import shutil
    import tempfile

    out = open_store(out)
    if not out.is_local:
        marker = f"{TOKENIZER_DIR}/tokenizer_config.json"
        if out.exists(marker):
            return
        with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            files = sorted((p for p in Path(tmp).rglob("*") if p.is_file()), key=lambda p: p.name == "tokenizer_config.json")
            for file in files:
                out.write_bytes(f"{TOKENIZER_DIR}/{file.relative_to(tmp).as_posix()}", file.read_bytes())
        return
    target = out.path(TOKENIZER_DIR)
    if target.exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.tmp-", dir=out.path()))
    try:
        tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700: stage two may run as another user
        os.replace(tmp, target)
    except OSError as exc:
        if not target.exists():
            raise KdcacheError(f"{target}: cannot save the teacher tokenizer ({exc.strerror or exc}); "
                               "free space or fix permissions and rerun the same command") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def record_worker(out: str | Path | Store, num_workers: int, worker_index: int, payload: dict) -> None:
    """``workers/worker-I-of-W.json``: this worker finished all its shards (what :func:`finalize` reads)."""
    open_store(out).write_json(f"{WORKERS_DIR}/worker-{worker_index}-of-{num_workers}.json", payload)


def finalize(out: str | Path | Store) -> dict | None:
    """Write ``manifest.json`` if every shard of the input is finished; returns it, else None."""
    out = open_store(out)
    run = out.read_json(fmt.RUN_NAME)
    done_files = fnmatch.filter(out.list(WORKERS_DIR), "*.json")
    if not done_files:
        return None
    done = [out.read_json(f"{WORKERS_DIR}/{name}") for name in done_files]
    # Prefer a worker that loaded the teacher: it knows the backend and dtype actually used.
    done.sort(key=lambda d: "backend_used" not in d["teacher"])
    total_rows = done[0]["dataset_rows"]
    settings = run["settings"]
    n_shards = math.ceil(total_rows / settings["shard_size"])
    listed = set(out.list(fmt.SHARD_DIR))
    if any(fmt.SHARD_RECORD_PATTERN.format(index=i) not in listed for i in range(n_shards)):
        return None  # one listing tells a worker that is not the last
    records: list[ShardRecord] = []
    for index in range(n_shards):
        record = load_shard_record(out, index)
        if record is None:
            return None
        records.append(record)
    meta = done[0]
    tokens = sum(r.supervised_tokens for r in records)
    manifest = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "complete": True,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": f"kdcache {__version__}",
        "teacher": _loaded_teacher(meta["teacher"]),
        "tokenizer": settings["tokenizer"],
        "top_k": settings["top_k"],
        "sampling": settings["sampling"],
        "logprobs": {
            "mode": "raw",
            "temperature": 1.0,
            "quantization": {
                "scheme": "kdcache-v1-two-zone",
                "fine_step_nats": 1 / 256,
                "fine_limit_nats": 9.25,
                "coarse_step_nats": 1 / 16,
                "max_abs_error_p_ge_1e-4": MAX_ABS_ERROR_FINE,
                "max_abs_error_below": MAX_ABS_ERROR_COARSE,
            },
        },
        "mode": settings["mode"],
        "generation": settings["generation"],
        "dataset": {**meta["dataset"], "max_length": settings["max_length"], "rows": total_rows},
        "shard_size": settings["shard_size"],
        "settings_hash": run["settings_hash"],
        "shards": [r.to_json() for r in records],
        "totals": {
            "sequences": sum(r.rows for r in records),
            "supervised_tokens": tokens,
            "skipped_rows": sum(len(r.skipped) for r in records),
            "bytes": sum(r.bytes for r in records),
            "shards": len(records),
            "topk_entries": sum(r.topk_entries for r in records),
            "sample_entries": sum(r.sample_entries for r in records),
            "mean_topk_mass": (sum(r.topk_mass_sum for r in records) / tokens) if tokens and settings["top_k"] else None,
        },
    }
    validate_manifest(manifest, out.where(fmt.MANIFEST_NAME))
    out.write_json(fmt.MANIFEST_NAME, manifest)
    return manifest


def _loaded_teacher(info: dict) -> dict:
    """The worker's teacher entry, with ``dtype`` set to what the backend actually loaded."""
    info = dict(info)
    loaded = info.pop("dtype_loaded", None)
    if loaded:
        info["dtype"] = str(loaded)
    used = info.pop("backend_used", None)
    if used:
        info["backend"] = used
    return info


class _Prefetch:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the caller.

    An exception raised by ``items`` is re-raised by the caller's ``next()`` at the point
    where the failing item would have arrived, so errors surface in the same order as
    without prefetching. ``close()`` stops the producer at its next item.
    """

    _DONE = object()

    def __init__(self, items: Iterator, depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name="kdcache-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                self._queue.put((item, None))
                if self._stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._queue.put((None, exc))
            return
        self._queue.put((self._DONE, None))

    def __iter__(self) -> "_Prefetch":
        return self

    def __next__(self):
        item, exc = self._queue.get()
        if exc is not None:
            raise exc
        if item is self._DONE:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:  # the producer is still working on an item
                pass


GENERATIONS_DIR = "generations"


def responses_key(index: int) -> str:
    """Where ``--mode generate`` keeps shard ``index``'s responses between its two phases."""
    return f"{GENERATIONS_DIR}/part-{index:05d}.json"


def generate_responses(cfg: GenerateConfig, out: Store, teacher, shards: Iterator[tuple[int, list, list[dict]]],
                       todo_rows: int, extra_positions: int) -> str:
    """Phase 1 of ``--mode generate``: the teacher writes a response for each prompt of the
    shards still to do, with the sampling engine of ``kdcache rollout``
    (:mod:`kdcache.rollout.engine`: vLLM's generation runner, or transformers), one file per
    shard (``generations/part-NNNNN.json``, written atomically; a rerun keeps finished ones).
    The engine is closed before phase 2 loads the scoring engine, so the two never share
    memory. Phase 2 then scores prompt + response like any row (every cache mode, in vLLM's
    engine), which gives the same statistics as recording them while sampling would.

    Returns the engine that wrote the responses (``"vllm"`` or ``"hf"``), which every shard of
    the cache must share (``scorer.json``).
    """
    from kdcache.rollout.engine import SamplingSettings, make_engine

    sampling = SamplingSettings(1, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed, max_length=cfg.max_length)
    engine = None
    engine_name = None
    progress = None
    try:
        for index, examples, skipped in shards:
            key = responses_key(index)
            if out.exists(key):
                engine_name = engine_name or out.read_json(key)["engine"]
                continue
            if engine is None:
                options = {k: v for k, v in _engine_options(cfg, extra_positions).items() if v is not None}
                engine = make_engine(cfg.backend, teacher, dtype=cfg.dtype, **options)
                engine_name = engine.name
                progress = RowProgress(todo_rows, cfg.progress, label="generating")
            responses = {str(c.seq_id): c.response_ids.tolist()
                         for c in engine.sample(examples, sampling, progress=progress.finished)}
            progress.update(len(skipped), sum(len(r) for r in responses.values()))
            out.write_json(key, {"engine": engine.name, "sampling": sampling.to_json(), "responses": responses})
    finally:
        if progress is not None:
            progress.close()
        if engine is not None:
            engine.close()
    return engine_name or "none"


def load_responses(out: Store, index: int) -> dict[int, list[int]]:
    key = responses_key(index)
    try:
        return {int(k): v for k, v in out.read_json(key)["responses"].items()}
    except (KdcacheError, OSError, ValueError, KeyError) as exc:
        raise KdcacheError(f"{out.where(key)}: the responses of phase 1 are missing or damaged ({first_line(exc)}); "
                           "delete it and rerun the same command to generate them again") from None


def with_responses(prompts: list, responses: dict[int, list[int]]) -> list:
    """Prompt examples + their responses -> examples whose response tokens are the targets."""
    import numpy as np

    from kdcache.data.example import TokenizedExample

    out = []
    for ex in prompts:
        response = np.asarray(responses[ex.seq_id], dtype=np.int32)
        ids = np.concatenate([ex.input_ids.astype(np.int32), response])
        out.append(TokenizedExample(ex.seq_id, ex.source, ids, np.arange(ex.num_tokens, len(ids), dtype=np.int32)))
    return out


def generate_teacher_cache(cfg: GenerateConfig) -> dict | None:
    """Run stage one for this worker; returns the manifest if the cache is complete afterwards."""
    from transformers import AutoTokenizer

    from kdcache.data import SkippedRow, open_dataset, tokenize_rows
    from kdcache.teacher.loading import make_backend, resolve_teacher, teacher_description, tokenizer_fingerprint

    slot = resolve_workers(cfg.num_workers, cfg.worker_index)
    cfg = replace(cfg, num_workers=slot.num_workers, worker_index=slot.worker_index)
    cfg.check()
    if slot.num_workers > 1:
        print(f"kdcache: worker {slot.worker_index} of {slot.num_workers} (from {slot.source})", file=sys.stderr)
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = open_store(cfg.output)
    teacher = resolve_teacher(cfg.teacher)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    except Exception as exc:  # noqa: BLE001 - missing or broken tokenizer files fail in many ways
        raise KdcacheError(f"{cfg.teacher}: cannot load the teacher's tokenizer ({first_line(exc)}); the model directory needs "
                           "its tokenizer files") from None
    if cfg.top_k > len(tokenizer):
        raise KdcacheError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary ({len(tokenizer)} tokens)")
    extra_positions = _fit_to_teacher(cfg, teacher.path, tokenizer)
    dataset = open_dataset(cfg.dataset, fmt=cfg.data_format, split=cfg.split)
    dataset_info = dataset.describe() | {"fingerprint": dataset.fingerprint()}
    backend_name = cfg.backend  # "auto" is resolved by make_backend (vLLM, else transformers)
    teacher_info = teacher_description(teacher, dtype=cfg.dtype, backend=backend_name)
    # A local path is recorded resolved, so `dir` and `/abs/dir` are the same teacher.
    teacher_info["model"] = str(Path(cfg.teacher).resolve()) if Path(cfg.teacher).exists() else cfg.teacher
    if cfg.quantization:
        teacher_info["quantization"] = cfg.quantization
    settings = _content_settings(cfg, teacher_info, tokenizer_fingerprint(tokenizer), dataset_info)
    settings_hash = claim_directory(out, settings)
    save_tokenizer(out, tokenizer)

    # Pass 1 (cheap, no tokenization): how many rows, hence shards, does this worker own?
    total_rows = dataset.num_rows_hint()
    if total_rows is None:
        total_rows = sum(1 for _ in dataset.rows())
    n_shards = math.ceil(total_rows / cfg.shard_size)
    mine = [i for i in range(n_shards) if i % cfg.num_workers == cfg.worker_index]
    todo = set(mine) - finished_shards(out, mine)
    todo_rows = sum(min(cfg.shard_size, total_rows - i * cfg.shard_size) for i in todo)

    backend = None
    scoring = ScoringSettings(top_k=cfg.top_k, num_samples=cfg.samples if cfg.sampling != "none" else 0, seed=cfg.seed,
                              sample_tail=cfg.sampling == "tail", draws=cfg.draws)

    def prepared_shards() -> Iterator[tuple[int, list, list[dict]]]:
        """``(shard_index, examples, skipped)`` for each shard this run must write."""
        for index, rows in run_dir.shards_of_rows(dataset.rows(), cfg.shard_size):
            if index not in todo:
                continue
            examples, skipped = [], []
            for item in tokenize_rows(
                rows, tokenizer, max_length=cfg.max_length, fmt=dataset_info["format"],
                skip_bad_rows=cfg.skip_bad_rows, prompt_only=cfg.mode == "generate",
            ):
                if isinstance(item, SkippedRow):
                    skipped.append({"seq_id": item.seq_id, "source": item.source, "reason": item.reason})
                else:
                    examples.append(item)
            yield index, examples, skipped

    generator = None
    if cfg.mode == "generate":  # phase 1: the teacher writes the responses (its own engine, freed after)
        generator = generate_responses(cfg, out, teacher, prepared_shards(), todo_rows, extra_positions)
    progress: RowProgress | None = None
    shards = prepared_shards()
    writer: ThreadPoolExecutor | None = None
    writing: Future | None = None  # the previous shard's write, running while this one is scored
    try:
        # The first shard is tokenized before the model loads, so a bad first row fails fast,
        # and before any helper thread starts, since vLLM may fork its engine process.
        first = next(shards, None)
        if first is not None:
            backend = make_backend(backend_name, teacher, dtype=cfg.dtype, full_rows=scoring.num_samples > 0,
                                   **_engine_options(cfg, extra_positions))
            teacher_info["dtype_loaded"] = getattr(backend, "dtype", cfg.dtype)
            teacher_info["backend_used"] = backend.name
            teacher_info["scoring_path"] = backend.scoring_path
            scorer_keys = ("backend_used", "dtype_loaded", "scoring_path")
            if generator is not None:
                teacher_info["generation_engine"] = generator
                scorer_keys += ("generation_engine",)
            scorer = {k: str(teacher_info[k]) for k in scorer_keys}
            claim_scorer(out, scorer)
            # Rate and ETA count from here: the model's load is not scoring time.
            progress = RowProgress(todo_rows, cfg.progress)
            if cfg.overlap:
                shards = _Prefetch(shards)
                writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
            for index, examples, skipped in itertools.chain([first], shards):
                if cfg.mode == "generate":  # phase 2: score prompt + response, the response supervised
                    examples = with_responses(examples, load_responses(out, index))
                # rows move the bar as the engine finishes them; tokens/s once the shard is back
                stream = backend.score(examples, scoring, progress=progress.finished)
                results = []
                for ex, result in zip(examples, stream):
                    if (problem := scores_problem(result)) is not None:
                        raise KdcacheError(problem)
                    result.rollout_logprobs = ex.rollout_logprobs  # rollout rows: the sampling policy's log-probs
                    results.append(result)
                progress.update(len(skipped), sum(r.num_targets for r in results))
                check_claim(out, settings_hash, scorer)
                if writer is None:
                    write_shard(out, index, results, cfg.top_k, skipped=skipped, zstd_level=cfg.zstd_level)
                    continue
                if writing is not None:
                    writing.result()  # a failed write (disk full) stops the run here, one shard late at most
                writing = writer.submit(write_shard, out, index, results, cfg.top_k, skipped=skipped,
                                        zstd_level=cfg.zstd_level)
            if writing is not None:
                writing.result()
    finally:
        if writer is not None:
            writer.shutdown(wait=True)  # a shard being written when the run fails is finished, not lost
        if isinstance(shards, _Prefetch):
            shards.close()
        if progress is not None:
            progress.close()
        if backend is not None:
            backend.close()

    if cfg.mode == "generate":  # every shard of this worker is recorded: its responses are in the shards
        for index in mine:
            out.delete(responses_key(index))
    record_worker(
        out, cfg.num_workers, cfg.worker_index,
        {
            "dataset_rows": total_rows,
            "teacher": teacher_info,
            "dataset": {k: dataset_info[k] for k in ("source", "format", "fingerprint", "rollout") if k in dataset_info},
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return finalize(out)


def _engine_options(cfg: GenerateConfig, extra_positions: int) -> dict:
    options = {
        "quantization": cfg.quantization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        # --max-length bounds the sequence (in generate mode, prompt + response); vLLM's
        # prompt-log-prob path needs one more position for the token each request emits.
        "max_model_len": cfg.max_model_len or cfg.max_length + extra_positions,
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed,
    }
    options.update(cfg.engine_options)
    return options
