"""Cache statistics inside vLLM: a pooling model built on the teacher's own vLLM class.

Loaded in vLLM's engine processes through the ``vllm.general_plugins`` entry point
(:func:`register`). For an architecture ``A`` named in ``$KDCACHE_VLLM_ARCHITECTURES``
(the backend sets it before starting the engine), the plugin registers
``A + STATS_SUFFIX``: a subclass of vLLM's own class for ``A`` that keeps its weights,
``lm_head`` and ``compute_logits`` (so the architecture's logit scaling and soft-capping
come with it, and quantized, GGUF-converted and tensor-parallel checkpoints load as usual),
and replaces only the pooler. The engine is started with ``runner="pooling"``,
``convert="none"`` and ``hf_overrides={"architectures": [A + STATS_SUFFIX]}``; requests go
through ``LLM.encode(..., pooling_task="token_classify")``.

The pooler (:class:`StatsPooler`) collects each request's hidden states over chunked
prefill (vLLM's ``AllPool``), keeps the rows of the supervised positions named in the
request, turns them into logits a chunk at a time with the model's ``compute_logits`` and
hands them to :func:`kdcache.teacher.statistics.position_statistics`, the same function the
transformers backend calls. What leaves the engine is ``[S, width]`` float32 per request
(18 floats per supervised token in the default mode), instead of whole vocabulary rows.

Per-request settings travel in ``PoolingParams.extra_kwargs["kdcache"]``: ``seq_id``,
``spans`` (``[[start, stop], ...]`` target positions, ascending), ``spec``
(:class:`StatsSpec` fields) and ``chunk_bytes``. A request without them (vLLM's warm-up and
memory-profiling runs) gets statistics of every position under :data:`PROFILE_SPEC`, so the
profile sees the head's real memory.

Tensor parallelism: ``compute_logits`` returns the gathered logits on the rank that
produces the output (all ranks where vLLM all-gathers) and None elsewhere; those ranks
return zeros of the right shape, which vLLM discards.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kdcache.teacher.statistics import DEFAULT_CHUNK_BYTES, StatsSpec, rows_per_chunk, statistics_in_chunks

#: Suffix of the architecture names this plugin registers.
STATS_SUFFIX = "KdcacheStats"
#: Environment variable listing the teacher architectures to wrap (comma-separated).
ARCHITECTURES_ENV = "KDCACHE_VLLM_ARCHITECTURES"
#: The key of ``PoolingParams.extra_kwargs`` kdcache uses.
REQUEST_KEY = "kdcache"
#: Statistics computed for requests that carry no kdcache settings (vLLM's dummy runs).
PROFILE_SPEC = {"top_k": 8, "num_samples": 8, "sample_tail": True, "draws": "systematic", "seed": 0}


def register() -> None:
    """``vllm.general_plugins`` entry point: register the wrappers kdcache asked for.

    Does nothing unless kdcache started the engine (``$KDCACHE_ENGINE_OWNER``: the engine's
    processes then die with it, :func:`kdcache.teacher.vllm_engine.die_with_parent`; and
    ``$KDCACHE_VLLM_ARCHITECTURES``: the wrappers), so an unrelated vLLM process on a machine
    with kdcache installed is left alone.
    """
    from kdcache.teacher.vllm_engine import die_with_parent

    die_with_parent()
    wanted = [a.strip() for a in os.environ.get(ARCHITECTURES_ENV, "").split(",") if a.strip()]
    if not wanted:
        return
    from vllm import ModelRegistry

    for arch in wanted:
        name = arch + STATS_SUFFIX
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"{__name__}:{name}")


def __getattr__(name: str) -> Any:
    """Build ``<Arch>KdcacheStats`` on first use (vLLM's lazy registry imports it by name)."""
    if not name.endswith(STATS_SUFFIX) or name == STATS_SUFFIX:
        raise AttributeError(name)
    cls = _build_model_class(name[: -len(STATS_SUFFIX)])
    globals()[name] = cls
    return cls


def _build_model_class(arch: str) -> type:
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces_base import VllmModelForPooling

    base = ModelRegistry._try_load_model_cls(arch)  # noqa: SLF001 - no public lookup by name
    if base is None:
        raise ValueError(f"vLLM has no model class for architecture {arch!r}")
    if not hasattr(base, "compute_logits"):
        raise ValueError(f"{arch} is not a causal LM in vLLM (no compute_logits)")

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # noqa: ANN001 - vLLM's config
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.pooler = StatsPooler(self)

    return type(arch + STATS_SUFFIX, (base, VllmModelForPooling), {
        "__init__": __init__,
        "is_pooling_model": True,
        "default_tok_pooling_type": "ALL",
        "__module__": __name__,
        "__doc__": f"vLLM's {arch} with kdcache's statistics pooler (see {__name__}).",
    })


def _pooler_base() -> type:
    from vllm.model_executor.layers.pooler.abstract import Pooler

    return Pooler


class StatsPooler(_pooler_base()):  # type: ignore[misc]
    """Token-wise pooler whose output per request is the cache statistics of its supervised
    positions: float32 ``[S, width]``, rows in the order of the request's spans."""

    def __init__(self, model: torch.nn.Module) -> None:
        from vllm.model_executor.layers.pooler.tokwise import AllPool

        super().__init__()
        self.collect = AllPool()  # hidden states of every prompt position, across chunked prefill
        # A plain attribute would register the model as a submodule of its own pooler.
        self._model = [model]

    def get_supported_tasks(self):  # noqa: ANN201 - vLLM's Set[PoolingTask]
        return {"token_classify"}

    def get_pooling_updates(self, task):  # noqa: ANN001, ANN201
        from vllm.model_executor.layers.pooler import PoolingParamsUpdate

        return PoolingParamsUpdate(requires_token_ids=True)  # the targets' log-probs need the ids

    def forward(self, hidden_states: torch.Tensor, pooling_metadata) -> list[torch.Tensor | None]:  # noqa: ANN001
        """Statistics of every request whose prompt finished in this step, computed together
        (requests with the same settings share the chunks of rows), split back per request."""
        pooled = self.collect(hidden_states, pooling_metadata)
        token_ids = pooling_metadata.get_prompt_token_ids_cpu()
        outputs: list[torch.Tensor | None] = [None] * len(pooled)
        groups: dict[tuple[StatsSpec, int | None], list[tuple[int, torch.Tensor, torch.Tensor, int]]] = {}
        for i, (hidden, ids, params) in enumerate(zip(pooled, token_ids, pooling_metadata.pooling_params)):
            if hidden is None:  # prefill still in progress
                continue
            spec, chunk_bytes, positions, seq_id = self._request(params, int(ids.shape[0]), hidden.shape[0])
            groups.setdefault((spec, chunk_bytes), []).append((i, positions, ids, seq_id))
        for (spec, chunk_bytes), items in groups.items():
            device = pooled[items[0][0]].device
            rows = torch.cat([pooled[i].index_select(0, (pos - 1).to(device)) for i, pos, _, _ in items])
            targets = torch.cat([ids.to(torch.int64)[pos] for _, pos, ids, _ in items]).to(device)
            positions = torch.cat([pos for _, pos, _, _ in items]).to(device)
            seq_ids = torch.cat([torch.full_like(pos, seq_id) for _, pos, _, seq_id in items]).to(device)
            block = statistics_in_chunks(self._head(spec), rows, targets, seq_ids, positions, spec,
                                         rows_per_chunk(self._logit_rows(spec), chunk_bytes or DEFAULT_CHUNK_BYTES))
            for (i, _, _, _), part in zip(items, block.split([len(pos) for _, pos, _, _ in items])):
                outputs[i] = part
        return outputs

    def _request(self, params, num_tokens: int, hidden_rows: int) -> tuple[StatsSpec, int | None, torch.Tensor, int]:  # noqa: ANN001
        """``(spec, chunk bytes, target positions, seq_id)`` of a request; vLLM's warm-up and
        profiling requests carry no kdcache settings and get every position under :data:`PROFILE_SPEC`."""
        request = (params.extra_kwargs or {}).get(REQUEST_KEY)
        if request is None:
            model = self._model[0]
            vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or self._logit_rows(None))
            positions = torch.arange(1, max(1, min(num_tokens, hidden_rows)), dtype=torch.int64)
            return StatsSpec(vocab_size=vocab, **PROFILE_SPEC), None, positions, 0
        positions = torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in request["spans"]])
        return StatsSpec(**request["spec"]), request.get("chunk_bytes"), positions, int(request["seq_id"])

    def _logit_rows(self, spec: StatsSpec | None) -> int:
        processor = getattr(self._model[0], "logits_processor", None)
        return int(getattr(processor, "vocab_size", 0) or (spec.vocab_size if spec else 0) or 1)

    def _head(self, spec: StatsSpec):  # noqa: ANN202 - Callable[[Tensor], Tensor]
        model = self._model[0]

        def head(hidden: torch.Tensor) -> torch.Tensor:
            logits = model.compute_logits(hidden)
            if logits is None:  # a tensor-parallel rank that does not hold the gathered logits
                return torch.zeros((hidden.shape[0], spec.vocab_size), dtype=torch.float32, device=hidden.device)
            return logits

        return head
