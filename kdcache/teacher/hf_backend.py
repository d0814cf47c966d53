"""Teacher scoring with plain transformers (the fallback when vLLM is missing or cannot load).

The backbone runs on right-padded batches sorted by length; the output layer runs only on
the supervised positions' hidden states, a bounded chunk of rows at a time, and every
statistic comes from :func:`kdcache.teacher.statistics.position_statistics` on the model's
device, the same function vLLM's engine runs. The output layer is ``lm_head`` followed by the
architecture's transform, found at load time by checking against ``model.forward``
(:mod:`kdcache.output_head`), so the cached log-probs equal ``log_softmax(model(ids).logits)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


from kdcache.cache.records import TeacherScores
from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError, first_line
from kdcache.teacher.base import ScoringSettings, TeacherBackend
from kdcache.teacher.loading import ResolvedTeacher, resolve_dtype, resolve_local, teacher_description
from kdcache.teacher.sampling import validate_request
from kdcache.teacher.statistics import (
    DEFAULT_CHUNK_BYTES,
    rows_per_chunk,
    scores_from_statistics,
    spec_for,
    statistics_in_chunks,
)

logger = logging.getLogger("kdcache")

_DTYPES = {"float32": "float32", "float": "float32", "fp32": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16"}

SCORING_PATH = "transformers"


class HFBackend(TeacherBackend):
    """Teacher backend on ``AutoModelForCausalLM``.

    Args:
        teacher: local HF directory or ``ResolvedTeacher``.
        dtype: ``"auto"`` (the checkpoint's dtype) or a torch dtype name.
        device: torch device (None: CUDA when available, else CPU).
        max_batch_tokens: padded tokens (batch x longest) per backbone forward.
        logits_chunk_bytes: memory for one chunk of float32 full-vocabulary rows (64 MiB).

    Raises:
        KdcacheError: the model cannot be loaded, or kdcache cannot reproduce its logits
            outside ``model.forward`` (:func:`kdcache.output_head.probe_output_transform`).
    """

    name = "hf"
    scoring_path = SCORING_PATH

    def __init__(
        self,
        teacher: ResolvedTeacher | str | Path,
        *,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_tokens: int = 8192,
        logits_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **unused: Any,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kdcache.output_head import probe_output_transform

        if unused:
            logger.debug("HF backend ignores options %s", sorted(unused))
        self.teacher = teacher if isinstance(teacher, ResolvedTeacher) else resolve_local(teacher)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # quantized checkpoints are dequantized by transformers, so "auto" may still mean float32
        dtype = resolve_dtype(dtype, self.device.type == "cpu", None)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.teacher.path))
        self.vocab_size = len(self.tokenizer)
        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, _DTYPES.get(dtype, dtype))
        extra: dict[str, Any] = {}
        if self.teacher.quantization == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            # Decompress at load: the compressed forward of transformers 5.19 with
            # compressed-tensors 0.17 fails ("'Linear' object has no attribute 'weight'").
            extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.teacher.path), dtype=torch_dtype, **extra)
        except Exception as exc:  # noqa: BLE001 - surfaced as one line
            raise KdcacheError(f"{self.teacher.spec}: transformers cannot load the teacher ({first_line(exc)})") from None
        self.model = model.to(self.device).eval()
        weight_dtype = next(self.model.parameters()).dtype
        self.dtype = str(weight_dtype).removeprefix("torch.") if dtype == "auto" else dtype
        self.backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        self.lm_head = self.model.get_output_embeddings()
        self.model_vocab_rows = int(self.lm_head.weight.shape[0])
        self.max_batch_tokens = max_batch_tokens
        self.rows_per_chunk = rows_per_chunk(self.model_vocab_rows, logits_chunk_bytes)
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        with torch.inference_mode():
            self.output_transform = probe_output_transform(
                lambda ids: self.model(input_ids=ids).logits[0],
                lambda ids: self.backbone(input_ids=ids).last_hidden_state[0],
                self.lm_head,
                vocab_rows=min(self.vocab_size, self.model_vocab_rows),
                config_softcap=getattr(cfg, "final_logit_softcapping", None),
                dtype=weight_dtype, device=self.device,
                name=f"{self.teacher.spec} ({type(self.model).__name__})",
            )

    # ------------------------------------------------------------------ API

    def describe(self) -> dict:
        import transformers

        desc = teacher_description(self.teacher, self.dtype, backend=self.name)
        desc.update(
            engine=f"transformers {transformers.__version__}",
            scoring_path=self.scoring_path,
            tokenizer_vocab_size=self.vocab_size,
            model_vocab_rows=self.model_vocab_rows,
            logprob_normalization="tokenizer vocabulary (padded rows dropped before the log-softmax)",
            output_transform={"scale": self.output_transform.scale, "softcap": self.output_transform.softcap},
            device=str(self.device),
        )
        return desc

    def score(self, examples: Sequence[TokenizedExample], settings: ScoringSettings,
              progress: Callable[[int], None] | None = None) -> Iterator[TeacherScores]:
        """Teacher-forced scoring; yields one result per example, in input order (``progress``:
        see :meth:`kdcache.teacher.base.TeacherBackend.score`)."""
        import torch

        validate_request(examples, settings, self.vocab_size, self.model_vocab_rows)
        spec = self._spec(settings)
        results: dict[int, TeacherScores] = {}
        order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
        with torch.inference_mode():
            for batch in self._batches([examples[i] for i in order], order, spec):
                for idx, scores in batch:
                    results[idx] = scores
                if progress is not None:
                    progress(len(batch))
        for i in range(len(examples)):
            yield results[i]

    def close(self) -> None:
        """Drop the model (and the CUDA cache, on a GPU)."""
        import gc

        import torch

        self.model = self.backbone = self.lm_head = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ internals

    def _spec(self, settings: ScoringSettings):  # noqa: ANN202 - StatsSpec
        return spec_for(settings.top_k, settings.num_samples, settings.sample_tail, settings.draws, settings.seed,
                        self.vocab_size)

    def _logits(self, hidden: Any) -> Any:
        return self.output_transform.apply(self.lm_head(hidden))

    def _batches(self, examples: list[TokenizedExample], indices: list[int], spec) -> Iterator[list[tuple[int, TeacherScores]]]:  # noqa: ANN001
        """Backbone over length-sorted (longest first) right-padded batches of at most
        ``max_batch_tokens`` padded tokens; yields ``(input index, scores)`` per batch."""
        start = 0
        while start < len(examples):
            longest = examples[start].num_tokens
            size = max(1, min(len(examples) - start, self.max_batch_tokens // max(1, longest)))
            yield self._score_batch(examples[start:start + size], indices[start:start + size], spec)
            start += size

    def _score_batch(self, batch: list[TokenizedExample], indices: list[int], spec) -> list[tuple[int, TeacherScores]]:  # noqa: ANN001
        import torch

        longest = max(int(ex.target_positions[-1]) for ex in batch)  # the last target needs no hidden state
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, ex in enumerate(batch):
            n = min(ex.num_tokens, longest)
            ids[b, :n] = torch.as_tensor(ex.input_ids[:n], dtype=torch.long)
            mask[b, :n] = 1
        hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        rows, targets, seq_ids, positions = [], [], [], []
        for b, ex in enumerate(batch):
            pos = torch.as_tensor(ex.target_positions, dtype=torch.long, device=self.device)
            rows.append(hidden[b, pos - 1])  # the distribution of token p is read at position p - 1
            targets.append(torch.as_tensor(ex.input_ids, dtype=torch.long, device=self.device)[pos])
            seq_ids.append(torch.full_like(pos, ex.seq_id))
            positions.append(pos)
        block = statistics_in_chunks(self._logits, torch.cat(rows), torch.cat(targets), torch.cat(seq_ids),
                                     torch.cat(positions), spec, self.rows_per_chunk).cpu().numpy()
        out, start = [], 0
        for idx, ex in zip(indices, batch):
            stop = start + len(ex.target_positions)
            out.append((idx, scores_from_statistics(ex.seq_id, ex.source, ex.input_ids, ex.target_positions,
                                                    block[start:stop], spec)))
            start = stop
        return out
