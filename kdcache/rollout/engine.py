"""Sample responses for tokenized prompts: vLLM, or a transformers decode loop as fallback.

Both engines take :class:`~kdcache.data.example.TokenizedExample` prompts (only ``seq_id``,
``source`` and ``input_ids`` are read) and return one :class:`Completion` per (prompt,
sample index): the response token ids and the log-prob of every sampled token.

Which log-prob is recorded
--------------------------
``Completion.logprobs[t] = log mu(x_t | prompt, x_<t)`` where ``mu`` is the distribution the
token was actually drawn from, the *behaviour policy* of importance sampling:

    mu = top_p_filter(softmax(z[:V] / temperature))      (renormalized over the kept ids)

with ``z`` the model's logits and ``V`` the tokenizer's vocabulary (padded logit rows beyond
the tokenizer are never sampled and carry no mass). At ``temperature = 1, top_p = 1`` this is
the model's own temperature-1 distribution restricted to real tokens. Greedy decoding
(``temperature = 0``) draws from a point mass, so its recorded log-prob is exactly 0.
An importance weight ``q_theta(x) / mu(x)`` built from it corrects for whatever sampling
settings the rollout used (it cannot recover tokens that top-p removed: those have
``mu = 0`` and are never seen). vLLM returns exactly this with the engine's
``logprobs_mode="processed_logprobs"`` (log-softmax after the allowed-token mask,
temperature and top-k/top-p; ``raw_logprobs``, the mode the teacher's scoring engine uses,
would be the untempered, unfiltered distribution over all logit rows instead). The
transformers loop computes the same distribution itself.

Seeds
-----
Sample ``j`` of prompt ``seq_id`` is drawn with its own seed ``sample_seed(seed, seq_id, j)``
(a per-request seed in vLLM, a per-row ``torch.Generator`` in the transformers loop), so a
completion never depends on which other prompts share the batch, on the shard size or on
the worker layout. The two engines use different random streams: the same seed gives
different samples through vLLM and through transformers (a rollout records its engine).
What remains is floating point: a batched kernel may round one row differently depending
on the batch, which flips a draw only when it falls within rounding of a CDF boundary
(never seen on the CPU tests; vLLM's ``VLLM_BATCH_INVARIANT`` removes it on GPUs that
support it). The transformers loop decodes the ``samples_per_prompt`` samples of one prompt
as one batch and nothing else, so its batches are fixed by the settings.

Stopping
--------
A response ends at the first EOS id (from the tokenizer and ``generation_config.json``;
the EOS token is part of the response, ``finish_reason == "stop"``) or after
``SamplingSettings.budget`` tokens (``"length"``).
"""

from __future__ import annotations

import abc
import atexit
import gc
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError, first_line
from kdcache.progress import EngineProgress
from kdcache.teacher.loading import ResolvedTeacher, context_length, resolve_dtype, resolve_local, teacher_description
from kdcache.teacher.vllm_engine import EngineUnusable, close_engine, engine_setup, eos_ids

logger = logging.getLogger("kdcache")

#: vLLM treats temperatures below this as greedy; a smaller positive value is refused.
MIN_TEMPERATURE = 1e-5
#: Options only vLLM understands (dropped for the transformers engine).
VLLM_ONLY_OPTIONS = ("quantization", "tensor_parallel_size", "gpu_memory_utilization", "max_num_batched_tokens",
                     "max_model_len", "enforce_eager", "seed", "extra_engine_args")


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled.

    Attributes:
        samples_per_prompt: completions per prompt (sample indices ``0..n-1``).
        temperature: ``0`` is greedy; otherwise logits are divided by it before top-p.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose mass is
            at least ``top_p`` (``1`` keeps every token).
        max_new_tokens: longest response, in tokens.
        seed: base seed (see :func:`sample_seed`).
        max_length: bound on prompt + response tokens (None: none).
    """

    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    max_length: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> None:
        """Raise a one-line :class:`KdcacheError` naming the flag that is out of range."""
        if self.samples_per_prompt < 1:
            raise KdcacheError(f"--samples-per-prompt must be >= 1, got {self.samples_per_prompt}")
        if self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise KdcacheError(f"--temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KdcacheError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise KdcacheError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.greedy and self.samples_per_prompt > 1:
            raise KdcacheError("--temperature 0 (greedy) gives the same response every time; use --samples-per-prompt 1")

    def budget(self, prompt_tokens: int) -> int:
        """New tokens allowed after a prompt of ``prompt_tokens`` tokens (may be <= 0)."""
        if self.max_length is None:
            return self.max_new_tokens
        return min(self.max_new_tokens, self.max_length - prompt_tokens)

    def to_json(self) -> dict:
        return {"samples_per_prompt": self.samples_per_prompt, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "max_length": self.max_length}


def sample_seed(seed: int, seq_id: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``seq_id``: 63 bits of
    ``sha256("kdcache-rollout", seed, seq_id, sample_index)`` (independent streams for
    neighbouring indices; fits vLLM's and torch's seed types)."""
    digest = hashlib.sha256(f"kdcache-rollout\0{seed}\0{seq_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Completion:
    """One sampled response.

    Attributes:
        seq_id: the prompt's ``seq_id``.
        sample_index: ``0 .. samples_per_prompt - 1``.
        source: the prompt's ``"path:row"``.
        prompt_ids: int32 ``[P]`` the prompt as sent.
        response_ids: int32 ``[G]`` sampled tokens (``G >= 1``), ending with the EOS id when
            ``finish_reason == "stop"``.
        logprobs: float32 ``[G]`` ``log mu`` of each sampled token under the sampling
            distribution (module docstring); 0 for greedy decoding.
        finish_reason: ``"stop"`` (an EOS id was sampled) or ``"length"`` (budget reached).
    """

    seq_id: int
    sample_index: int
    source: str
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str

    @property
    def num_tokens(self) -> int:
        return int(self.response_ids.shape[0])


class RolloutEngine(abc.ABC):
    """Samples :class:`Completion` s for tokenized prompts (see the module docstring).

    Attributes:
        name: ``"vllm"`` or ``"hf"``.
        model: the model on local disk.
        tokenizer: its tokenizer; ``vocab_size = len(tokenizer)``.
        eos_ids: ids that end a response.
        dtype: the dtype the weights were loaded in.
        max_model_len: the longest prompt + response the engine takes (None: unknown).
    """

    name: str
    model: ResolvedTeacher
    tokenizer: Any
    vocab_size: int
    eos_ids: list[int]
    dtype: str
    max_model_len: int | None

    @abc.abstractmethod
    def sample(self, prompts: Sequence[TokenizedExample], settings: SamplingSettings,
               progress: Callable[[int], None] | None = None) -> Iterator[Completion]:
        """Completions ordered by prompt, then sample index; ``progress(n)`` is called as ``n``
        more completions finish (a live progress bar while a shard is in the engine).

        Raises:
            KdcacheError: a prompt with a token id outside the vocabulary, or without room
                for one new token within ``settings.max_length`` or the engine's context.
        """

    @abc.abstractmethod
    def engine_version(self) -> str:
        """``"vllm X.Y"`` or ``"transformers X.Y"``."""

    def describe(self) -> dict:
        """The model entry of a manifest (path, config hash, dtype...) plus the engine that sampled."""
        return {**teacher_description(self.model, self.dtype, backend=self.name), "engine": self.engine_version()}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (engine processes, GPU memory). Idempotent."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_prompts(self, prompts: Sequence[TokenizedExample], settings: SamplingSettings,
                       context: int | None) -> None:
        for ex in prompts:
            if ex.num_tokens == 0:
                raise KdcacheError(f"{ex.source}: empty prompt")
            if int(ex.input_ids.min()) < 0 or int(ex.input_ids.max()) >= self.vocab_size:
                raise KdcacheError(f"{ex.source}: token id outside the model's vocabulary (0..{self.vocab_size - 1}); "
                                   "was the prompt tokenized with another tokenizer?")
            room = settings.budget(ex.num_tokens)
            if context is not None:
                room = min(room, context - ex.num_tokens)
            if room < 1:
                limit = f"--max-length {settings.max_length}" if context is None or (
                    settings.max_length is not None and settings.max_length <= context) else f"the context ({context})"
                raise KdcacheError(f"{ex.source}: the prompt is {ex.num_tokens} tokens, leaving no room to generate "
                                   f"within {limit}")


# ---------------------------------------------------------------------------- vLLM


class VLLMEngine(RolloutEngine):
    """Sampling on a vLLM ``LLM`` (``runner="generate"``, ``logprobs_mode="processed_logprobs"``).

    Args:
        model: local HF directory or ``ResolvedTeacher`` (a GGUF already converted, a
            quantized checkpoint...).
        dtype: ``"auto"`` (float32 on a CPU without native bf16) or a torch dtype name.
        quantization, tensor_parallel_size, gpu_memory_utilization, max_num_batched_tokens,
        max_model_len, enforce_eager: vLLM engine options; None means the default
            (``gpu_memory_utilization`` 0.85 on GPU, 0.3 on CPU; ``enforce_eager`` on CPU only).
        seed: engine seed (sampling uses per-request seeds; this only fixes the engine's own).
        extra_engine_args: passed to ``vllm.LLM`` unchanged.

    The engine runs without a tokenizer (token ids in, token ids out), ignores the model's
    ``generation_config.json`` sampling defaults (``generation_config="vllm"``) except its
    EOS ids, and never samples a padded logit row (``allowed_token_ids``).
    """

    name = "vllm"

    def __init__(
        self,
        model: ResolvedTeacher | str | Path,
        *,
        dtype: str = "auto",
        quantization: str | None = None,
        tensor_parallel_size: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int | None = 0,
        extra_engine_args: dict[str, Any] | None = None,
    ) -> None:
        from vllm import LLM

        self.model, self.dtype, self.tokenizer, self.engine_options = engine_setup(
            model, dtype, quantization, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
        )
        self.vocab_size = len(self.tokenizer)
        self.eos_ids = eos_ids(self.tokenizer, self.model.path)
        self._llm = LLM(
            str(self.model.path),
            runner="generate",
            skip_tokenizer_init=True,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            **self.engine_options,
            **(extra_engine_args or {}),
        )
        atexit.register(self.close)
        model_rows = int(self._llm.llm_engine.model_config.get_vocab_size())
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        self._allowed_ids = list(range(self.vocab_size)) if model_rows > self.vocab_size else None
        self._probe()

    def engine_version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}"

    def sample(self, prompts: Sequence[TokenizedExample], settings: SamplingSettings,
               progress: Callable[[int], None] | None = None) -> Iterator[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        settings.check()
        self._check_prompts(prompts, settings, self.max_model_len)
        if not prompts:
            return
        requests, params = [], []
        for ex in prompts:
            budget = min(settings.budget(ex.num_tokens), self.max_model_len - ex.num_tokens)
            for j in range(settings.samples_per_prompt):
                requests.append((ex, j))
                params.append(SamplingParams(
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    max_tokens=budget,
                    seed=sample_seed(settings.seed, ex.seq_id, j),
                    logprobs=0,
                    flat_logprobs=True,
                    detokenize=False,
                    stop_token_ids=self.eos_ids,
                    allowed_token_ids=self._allowed_ids,
                ))
        inputs = [TokensPrompt(prompt_token_ids=ex.input_ids.tolist()) for ex, _ in requests]
        outs = self._llm.generate(inputs, params, use_tqdm=EngineProgress.factory(progress))
        for (ex, j), out in zip(requests, outs):
            yield self._completion(ex, j, out.outputs[0], settings)

    def _completion(self, ex: TokenizedExample, j: int, output: Any, settings: SamplingSettings) -> Completion:
        ids = np.asarray(output.token_ids, dtype=np.int32)
        if settings.greedy:
            logprobs = np.zeros(ids.shape[0], dtype=np.float32)
        else:
            flat = output.logprobs  # logprobs=0: one entry per position, the sampled token
            got = np.fromiter(flat.token_ids, dtype=np.int64, count=len(flat.token_ids))
            if got.shape != ids.shape or not np.array_equal(got, ids):
                raise RuntimeError(f"{ex.source}: vLLM returned log-probs for other tokens than it sampled")
            logprobs = np.fromiter(flat.logprobs, dtype=np.float32, count=len(flat.logprobs))
        stopped = output.finish_reason == "stop" and ids.shape[0] > 0 and int(ids[-1]) in self.eos_ids
        return Completion(ex.seq_id, j, ex.source, ex.input_ids.astype(np.int32), ids, logprobs,
                          "stop" if stopped else "length")

    def _probe(self) -> None:
        """Sample one token: some builds start an engine whose first forward fails (vLLM CPU
        0.32's AVX2 library lacks the 4-bit ``cpu_gemm_wna16`` kernel), and ``auto`` must
        learn that while it can still fall back."""
        probe = TokenizedExample(-1, "probe", np.zeros(1, dtype=np.int32), np.zeros(0, dtype=np.int32))
        try:
            list(self.sample([probe], SamplingSettings(max_new_tokens=1)))
        except Exception as exc:  # noqa: BLE001 - the engine reports many error types
            self.close()
            raise EngineUnusable(f"{self.model.spec}: vLLM started but cannot run this model ({first_line(exc)}); "
                                 "the engine log names the cause; the hf backend can load it") from None

    def close(self, shutdown_timeout_s: float = 60.0) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        atexit.unregister(self.close)
        close_engine(llm, shutdown_timeout_s)


# -------------------------------------------------------------------- transformers

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class HFEngine(RolloutEngine):
    """Sampling with transformers: a KV-cached decode loop over ``model(...)``.

    Not ``model.generate``: that draws every row of a batch from torch's global generator,
    so a sample would depend on its batch; here each sample has its own generator and the
    loop computes the sampling distribution ``mu`` itself (module docstring). The
    ``samples_per_prompt`` samples of one prompt run as one batch (same length, no padding).

    Args:
        model: local HF directory or ``ResolvedTeacher``.
        dtype: ``"auto"`` (the checkpoint's dtype; float32 on a CPU without native bf16).
        device: torch device (None: CUDA when available, else CPU).
    """

    name = "hf"

    def __init__(self, model: ResolvedTeacher | str | Path, *, dtype: str = "auto", device: str | None = None,
                 **unused: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if unused:
            logger.debug("transformers engine ignores options %s", sorted(unused))
        self.model = model if isinstance(model, ResolvedTeacher) else resolve_local(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(dtype, self.device.type == "cpu", None)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model.path))
        self.vocab_size = len(self.tokenizer)
        self.eos_ids = eos_ids(self.tokenizer, self.model.path)
        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, _DTYPES.get(dtype, dtype))
        try:
            net = AutoModelForCausalLM.from_pretrained(str(self.model.path), dtype=torch_dtype)
        except Exception as exc:  # noqa: BLE001 - surfaced as one line
            raise KdcacheError(f"{self.model.spec}: transformers cannot load the model ({first_line(exc)})") from None
        self.net = net.to(self.device).eval()
        self.dtype = str(next(self.net.parameters()).dtype).removeprefix("torch.")
        self.max_model_len = context_length(net.config.to_dict())

    def engine_version(self) -> str:
        import transformers

        return f"transformers {transformers.__version__}"

    def sample(self, prompts: Sequence[TokenizedExample], settings: SamplingSettings,
               progress: Callable[[int], None] | None = None) -> Iterator[Completion]:
        settings.check()
        self._check_prompts(prompts, settings, self.max_model_len)
        for ex in prompts:
            completions = list(self._sample_prompt(ex, settings))
            if progress is not None:
                progress(len(completions))
            yield from completions

    def _sample_prompt(self, ex: TokenizedExample, settings: SamplingSettings) -> Iterator[Completion]:
        import torch

        n = settings.samples_per_prompt
        generators = [torch.Generator(device=self.device).manual_seed(sample_seed(settings.seed, ex.seq_id, j))
                      for j in range(n)]
        eos = torch.as_tensor(self.eos_ids, dtype=torch.long, device=self.device)
        budget = settings.budget(ex.num_tokens)
        if self.max_model_len is not None:
            budget = min(budget, self.max_model_len - ex.num_tokens)
        tokens = torch.zeros((n, budget), dtype=torch.long, device=self.device)
        logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=self.device)
        lengths = torch.zeros(n, dtype=torch.long, device=self.device)
        stopped = torch.zeros(n, dtype=torch.bool, device=self.device)
        prompt = torch.as_tensor(ex.input_ids, dtype=torch.long, device=self.device)[None].expand(n, -1)
        with torch.inference_mode():
            out = self.net(input_ids=prompt.contiguous(), use_cache=True, logits_to_keep=1)
            for step in range(tokens.shape[1]):
                next_ids, next_lps = self._draw(out.logits[:, -1], settings, generators)
                live = ~stopped
                tokens[:, step] = next_ids
                logprobs[:, step] = next_lps
                lengths += live.long()
                stopped |= live & torch.isin(next_ids, eos)
                if bool(stopped.all()) or step + 1 == tokens.shape[1]:
                    break
                out = self.net(input_ids=next_ids[:, None], past_key_values=out.past_key_values, use_cache=True)
        tokens, logprobs = tokens.cpu().numpy().astype(np.int32), logprobs.cpu().numpy()
        for j in range(n):
            g = int(lengths[j])
            yield Completion(ex.seq_id, j, ex.source, ex.input_ids.astype(np.int32), tokens[j, :g].copy(),
                             logprobs[j, :g].copy(), "stop" if bool(stopped[j]) else "length")

    def _draw(self, logits: Any, settings: SamplingSettings, generators: list) -> tuple[Any, Any]:
        """One token per row and its ``log mu``: ``[n, rows]`` logits -> ``([n], [n])``."""
        import torch

        z = logits[:, : self.vocab_size].float()  # padded rows are never sampled
        if settings.greedy:
            return z.argmax(dim=-1), torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
        logmu = policy_logprobs(z, settings.temperature, settings.top_p)
        probs = logmu.exp()
        ids = torch.cat([torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(generators)])
        return ids, logmu.gather(1, ids[:, None])[:, 0]

    def close(self) -> None:
        import torch

        if getattr(self, "net", None) is None:
            return
        self.net = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def policy_logprobs(logits: Any, temperature: float, top_p: float) -> Any:
    """``log mu`` over the rows of float ``[n, V]`` logits: temperature, then top-p, renormalized.

    Top-p as vLLM applies it: sort ascending, drop the tokens whose cumulative probability
    (from the least likely up) is ``<= 1 - top_p``, never the most likely one; dropped ids
    get ``-inf``.
    """
    import torch

    z = logits / temperature
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=False)
        cumulative = sorted_z.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False
        z = z.scatter(1, order, sorted_z.masked_fill(drop, float("-inf")))
    return torch.log_softmax(z, dim=-1)


# --------------------------------------------------------------------------- choice


def make_engine(backend: str, model: ResolvedTeacher | str | Path, dtype: str = "auto",
                **engine_options: Any) -> RolloutEngine:
    """Build a rollout engine.

    Args:
        backend: ``"vllm"``, ``"hf"`` or ``"auto"`` (vLLM when importable and it starts,
            else transformers, with a one-line warning).
        model: a local HF directory or a ``ResolvedTeacher``.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``.
        engine_options: :class:`VLLMEngine` options; the transformers engine takes only
            ``device``.

    Raises:
        KdcacheError: unknown backend, vLLM asked for but missing or unable to load the model.
    """
    resolved = model if isinstance(model, ResolvedTeacher) else resolve_local(model)
    if backend not in ("vllm", "hf", "auto"):
        raise KdcacheError(f"unknown --backend '{backend}' (use vllm, hf or auto)")
    if backend in ("vllm", "auto"):
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            if backend == "vllm":
                raise KdcacheError(f"--backend vllm needs vLLM installed ({exc})") from None
            logger.warning("vLLM is not importable (%s); sampling with transformers", exc)
        else:
            options = {k: v for k, v in engine_options.items() if k != "device"}
            try:
                return VLLMEngine(resolved, dtype=dtype, **options)
            except EngineUnusable as exc:
                if backend == "vllm":
                    raise
                logger.warning("sampling with transformers: %s", exc)
            except KdcacheError:
                raise
            except Exception as exc:  # noqa: BLE001 - engine start fails in many ways
                if backend == "vllm":
                    raise KdcacheError(
                        f"{resolved.spec}: vLLM could not load the model ({first_line(exc)}); check --dtype, "
                        "--max-model-len and --gpu-memory-utilization, or use --backend hf") from None
                logger.warning("vLLM could not load the model (%s); sampling with transformers", first_line(exc))
    hf_options = {k: v for k, v in engine_options.items() if k not in VLLM_ONLY_OPTIONS}
    return HFEngine(resolved, dtype=dtype, **hf_options)
