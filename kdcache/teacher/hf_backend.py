"""Teacher scoring with plain transformers (fallback when vLLM is missing or cannot load).

The backbone runs on right-padded batches sorted by length; the LM head and the log-softmax
run only on the supervised positions, in chunks sized by ``logits_chunk_bytes``, so a batch
never materializes full-vocabulary fp32 log-probs for all of its tokens. Logits are sliced to
the tokenizer's vocabulary before the log-softmax, so padded logit rows carry no mass here
(vLLM's backend normalizes over all rows instead; for trained checkpoints the difference is
the padded rows' mass, normally negligible).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from kdcache.cache.records import TeacherScores, tail_logmass_from_topk
from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError, first_line
from kdcache.teacher.base import GenerationSettings, ScoringSettings, TeacherBackend
from kdcache.teacher.loading import ResolvedTeacher, resolve_dtype, resolve_local, teacher_description
from kdcache.teacher.sampling import concat_samples, draw_counts_torch, sequence_rng, validate_request

logger = logging.getLogger("kdcache")

_DTYPES = {"float32": "float32", "float": "float32", "fp32": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16"}


class HFBackend(TeacherBackend):
    """Teacher backend on ``AutoModelForCausalLM``.

    Args:
        teacher: local HF directory or ``ResolvedTeacher``.
        dtype: ``"auto"`` (the checkpoint's dtype) or a torch dtype name.
        device: torch device (None: CUDA when available, else CPU).
        max_batch_tokens: padded tokens (batch x longest) per backbone forward.
        logits_chunk_bytes: memory for one chunk of fp32 full-vocab logits/log-probs (256 MB).
    """

    name = "hf"

    def __init__(
        self,
        teacher: ResolvedTeacher | str | Path,
        *,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_tokens: int = 8192,
        logits_chunk_bytes: int = 256 << 20,
        **unused: Any,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.") if dtype == "auto" else dtype
        self.backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        self.lm_head = self.model.get_output_embeddings()
        self.model_vocab_rows = int(self.lm_head.weight.shape[0])
        self.max_batch_tokens = max_batch_tokens
        self.logits_chunk_bytes = logits_chunk_bytes
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        # Output transforms some architectures apply after the LM head (Gemma 2/3, Cohere, Granite).
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        self._logit_scale = getattr(cfg, "logit_scale", None)
        self._logits_scaling = getattr(cfg, "logits_scaling", None)

    # ------------------------------------------------------------------ API

    def describe(self) -> dict:
        import transformers

        desc = teacher_description(self.teacher, self.dtype, backend=self.name)
        desc.update(
            engine=f"transformers {transformers.__version__}",
            tokenizer_vocab_size=self.vocab_size,
            model_vocab_rows=self.model_vocab_rows,
            logprob_normalization="tokenizer vocabulary (padded rows sliced off before log_softmax)",
            device=str(self.device),
        )
        return desc

    def score(self, examples: Sequence[TokenizedExample], settings: ScoringSettings) -> Iterator[TeacherScores]:
        """Teacher-forced scoring; yields one result per example, in input order."""
        import torch

        validate_request(examples, settings, self.vocab_size)
        results: dict[int, TeacherScores] = {}
        order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
        with torch.inference_mode():
            for batch in self._batches([examples[i] for i in order], order, settings):
                for idx, scores in batch:
                    results[idx] = scores
        for i in range(len(examples)):
            yield results[i]

    def generate(
        self, examples: Sequence[TokenizedExample], settings: ScoringSettings, gen: GenerationSettings
    ) -> Iterator[TeacherScores]:
        """One ``model.generate`` per example, seeded with ``gen.seed + seq_id`` (through
        ``torch.manual_seed``, i.e. torch's global generator); records raw (temperature 1,
        pre-top-p) log-probs from ``output_logits``, over the tokenizer's vocabulary."""
        import torch
        from transformers import GenerationConfig

        validate_request(examples, settings, self.vocab_size)
        for ex in examples:
            sampling = gen.temperature > 0
            config = GenerationConfig(
                max_new_tokens=max(1, gen.budget(ex.num_tokens)),
                do_sample=sampling,
                temperature=gen.temperature if sampling else None,
                top_p=gen.top_p if sampling else None,
                top_k=0 if sampling else None,
                eos_token_id=_eos_ids(self.tokenizer, self.model),
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id,
                suppress_tokens=list(range(self.vocab_size, self.model_vocab_rows)) or None,
                output_logits=True,
                return_dict_in_generate=True,
            )
            torch.manual_seed(gen.seed + ex.seq_id)
            prompt = torch.as_tensor(ex.input_ids, dtype=torch.long, device=self.device)[None]
            with torch.inference_mode():
                out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
            gen_ids = out.sequences[0, prompt.shape[1]:]
            raw = torch.cat([step[:1] for step in out.logits], dim=0)  # [G, rows]
            input_ids = out.sequences[0].cpu().numpy().astype(np.int32)
            positions = np.arange(ex.num_tokens, ex.num_tokens + gen_ids.shape[0], dtype=np.int32)
            rng = sequence_rng(settings.seed, ex.seq_id)
            parts = self._score_rows(raw, gen_ids, settings, rng, transformed=False)
            yield self._finish(ex, input_ids, positions, parts, settings)

    def close(self) -> None:
        """Drop the model (and the CUDA cache, on a GPU)."""
        import gc

        import torch

        self.model = self.backbone = self.lm_head = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ internals

    def _batches(
        self, examples: list[TokenizedExample], indices: list[int], settings: ScoringSettings
    ) -> Iterator[list[tuple[int, TeacherScores]]]:
        """Backbone over length-sorted (longest first) right-padded batches of at most
        ``max_batch_tokens`` padded tokens; yields ``(input index, scores)`` per batch."""
        start = 0
        while start < len(examples):
            longest = examples[start].num_tokens
            size = max(1, min(len(examples) - start, self.max_batch_tokens // max(1, longest)))
            yield self._score_batch(examples[start:start + size], indices[start:start + size], settings)
            start += size

    def _score_batch(
        self, batch: list[TokenizedExample], indices: list[int], settings: ScoringSettings
    ) -> list[tuple[int, TeacherScores]]:
        import torch

        longest = max(ex.num_tokens for ex in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, ex in enumerate(batch):
            ids[b, : ex.num_tokens] = torch.as_tensor(ex.input_ids, dtype=torch.long)
            mask[b, : ex.num_tokens] = 1
        hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        out = []
        for b, (idx, ex) in enumerate(zip(indices, batch)):
            pos = torch.as_tensor(ex.target_positions, dtype=torch.long, device=self.device)
            # The distribution for token p is read at position p - 1.
            rows = hidden[b, pos - 1]
            targets = torch.as_tensor(ex.input_ids, dtype=torch.long, device=self.device)[pos]
            rng = sequence_rng(settings.seed, ex.seq_id)
            parts = self._score_rows(rows, targets, settings, rng, transformed=True)
            out.append((idx, self._finish(ex, ex.input_ids.astype(np.int32), ex.target_positions, parts, settings)))
        return out

    def _score_rows(self, rows: Any, targets: Any, settings: ScoringSettings, rng: np.random.Generator,
                    transformed: bool) -> dict:
        """Top-k / target log-probs / samples for ``rows`` (hidden ``[R, H]`` when ``transformed``,
        else raw logits ``[R, model rows]``), processed ``chunk`` rows at a time."""
        import torch

        chunk = max(1, self.logits_chunk_bytes // (4 * 4 * self.model_vocab_rows))
        k = settings.top_k
        tgt, top_ids, top_lps, samples = [], [], [], []
        for s in range(0, rows.shape[0], chunk):
            part = rows[s:s + chunk]
            logits = self._logits(part) if transformed else part
            logp = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
            tgt.append(logp.gather(1, targets[s:s + chunk, None])[:, 0].cpu())
            if k:
                values, indices = torch.topk(logp, k, dim=-1)
                top_ids.append(indices.cpu())
                top_lps.append(values.cpu())
            if settings.num_samples:
                # on the model's device: the [rows, V] float64 CDF never crosses to the host
                exclude = indices if settings.sample_tail else None
                samples.append(draw_counts_torch(rng, logp, settings.num_samples, exclude, settings.draws))
        return {"tgt": tgt, "ids": top_ids, "lps": top_lps, "samples": samples}

    def _logits(self, hidden: Any) -> Any:
        import torch

        logits = self.lm_head(hidden)
        if self._logit_scale is not None:
            logits = logits * self._logit_scale
        if self._logits_scaling is not None:
            logits = logits / self._logits_scaling
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _finish(self, ex: TokenizedExample, input_ids: np.ndarray, positions: np.ndarray, parts: dict,
                settings: ScoringSettings) -> TeacherScores:
        """Concatenate the per-chunk outputs of ``_score_rows`` into a ``TeacherScores``."""
        import torch

        def cat(key: str, dtype: Any, width: int | None = None) -> np.ndarray:
            chunks = parts[key]
            if not chunks:
                shape = (0,) if width is None else (0, width)
                return np.zeros(shape, dtype=dtype)
            return torch.cat(chunks).numpy().astype(dtype)

        scores = TeacherScores(ex.seq_id, ex.source, input_ids, np.asarray(positions, dtype=np.int32),
                               cat("tgt", np.float32))
        if settings.top_k:
            scores.topk_ids = cat("ids", np.int32, settings.top_k)
            scores.topk_logprobs = cat("lps", np.float32, settings.top_k)
            scores.tail_logmass = tail_logmass_from_topk(scores.topk_logprobs)
        if settings.num_samples:
            chunks = parts["samples"]
            empty = (np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))
            offsets, ids, counts = concat_samples(chunks or [empty])
            scores.sample_offsets, scores.sample_ids, scores.sample_counts = offsets, ids, counts
        return scores


def _eos_ids(tokenizer: Any, model: Any) -> list[int] | None:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids) or None
