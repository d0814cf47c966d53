"""Stage one through vLLM, every cache mode against the bare engine, side by side in one run.

Arms, on the same tokenized inputs (every position from 1 on supervised), interleaved in
rounds so that load drift on a shared machine hits each alike; medians are reported:

  bare      the bare vLLM engine call for top-64 prompt log-probs (``llm.generate`` with
            ``SamplingParams(prompt_logprobs=64, flat_logprobs=True, detokenize=False,
            max_tokens=1)``, nothing converted): the ceiling of the prompt-log-prob route;
  default   kdcache's default mode (top-4 + tail + 8 systematic tail draws) end to end through
            ``VLLMBackend.score`` (statistics computed inside the engine, converted to
            ``TeacherScores``);
  top64     ``--top-k 64 --sampling none`` through the same backend;
  random    ``--top-k 0 --sampling random --samples 50`` through the same backend;
  hf        the default mode through the transformers backend (``--with-hf``).

Goal (issue 11): default / bare >= 0.9. With ``--flops``, each arm also reports the model FLOP
utilization ``2 x parameters x tokens / s / peak`` (``--peak-tflops``, 790 for an H200's bf16).

    python benchmarks/bench_engine_stats.py                           # SmolLM2-135M-Instruct on CPU
    python benchmarks/bench_engine_stats.py --texts 200 --max-length 1024 --with-hf
    python benchmarks/bench_engine_stats.py --make-model qwen2.5-7b DIR   # random-init 7B shapes (GPU)
    python benchmarks/bench_engine_stats.py --model DIR --dtype bfloat16 --flops --peak-tflops 790
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
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ARMS = ("bare", "default", "top64", "random", "hf")


def machine() -> dict:
    import torch
    import transformers
    import vllm

    import kdcache

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm": vllm.__version__, "kdcache": kdcache.__version__}


def make_model(shape: str, out: Path, tokenizer_dir: str | None = None) -> None:
    """A random-init model of real shapes (no download): Qwen2.5-7B (28 layers, hidden 3584,
    vocabulary 152064 rows) with SmolLM2's tokenizer grown to 151665 tokens by added tokens,
    so the statistics run over a vocabulary of Qwen2.5's size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from kdcache.teacher.gguf import convert_gguf_to_hf
    from kdcache.testing.models import smollm2_gguf_path

    shapes = {
        "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                           rope_theta=1_000_000.0, tie_word_embeddings=False),
        "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                             rope_theta=1_000_000.0, tie_word_embeddings=True),
    }
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or str(convert_gguf_to_hf(smollm2_gguf_path())))
    tok.add_tokens([f"<kdcache_pad_{i}>" for i in range(151665 - len(tok))])
    config = Qwen2Config(**shapes[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="teacher (default: the SmolLM2 demo teacher)")
    parser.add_argument("--make-model", nargs=2, metavar=("SHAPE", "DIR"), help="write a random-init model and exit")
    parser.add_argument("--tokenizer", default=None, help="--make-model: tokenizer directory (default: SmolLM2's)")
    parser.add_argument("--texts-json", default=None, help="a JSON list of texts (default: the Wikipedia leads package)")
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--arms", nargs="+", default=["bare", "default", "top64"], choices=ARMS)
    parser.add_argument("--with-hf", action="store_true", help="add the transformers arm")
    parser.add_argument("--flops", action="store_true", help="report model FLOP utilization")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.make_model:
        make_model(args.make_model[0], Path(args.make_model[1]), args.tokenizer)
        return
    if args.with_hf and "hf" not in args.arms:
        args.arms.append("hf")

    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kdcache.data.example import TokenizedExample
    from kdcache.demo import wiki_entries
    from kdcache.teacher.base import ScoringSettings
    from kdcache.teacher.loading import resolve_teacher
    from kdcache.teacher.vllm_backend import VLLMBackend

    if args.model is None:
        from kdcache.testing.models import smollm2_gguf_path

        args.model = str(smollm2_gguf_path())
    teacher = resolve_teacher(args.model)
    memory = {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {}
    t0 = time.perf_counter()
    backend = VLLMBackend(teacher, dtype=args.dtype, max_model_len=args.max_length, **memory)
    start_s = {"kdcache_engine": time.perf_counter() - t0}
    bare_llm = hf = None
    try:
        tok = backend.tokenizer
        texts = (json.loads(Path(args.texts_json).read_text()) if args.texts_json
                 else [e["extract"] for e in wiki_entries()])
        examples = []
        for i, text in enumerate(texts):
            if len(examples) == args.texts:
                break
            ids = np.asarray(tok(text)["input_ids"][: args.max_length], dtype=np.int32)
            if len(ids) >= 8:
                examples.append(TokenizedExample(i, f"wiki:{i + 1}", ids, np.arange(1, len(ids), dtype=np.int32)))
        tokens = sum(len(ex.target_positions) for ex in examples)
        if "bare" in args.arms:
            t0 = time.perf_counter()
            # a prompt-log-prob request also emits one token: one more position of context
            options = {**backend.engine_options, "max_model_len": args.max_length + 1}
            bare_llm = LLM(str(teacher.path), skip_tokenizer_init=True, max_logprobs=64, enable_prefix_caching=False,
                           **options)
            start_s["bare_engine"] = time.perf_counter() - t0
        if "hf" in args.arms:
            from kdcache.teacher.hf_backend import HFBackend

            hf = HFBackend(teacher, dtype=args.dtype)
        prompts = [TokensPrompt(prompt_token_ids=ex.input_ids.tolist()) for ex in examples]
        flat = SamplingParams(prompt_logprobs=64, flat_logprobs=True, detokenize=False, max_tokens=1)
        modes = {
            "default": ScoringSettings(top_k=4, num_samples=8, sample_tail=True, draws="systematic"),
            "top64": ScoringSettings(top_k=64),
            "random": ScoringSettings(top_k=0, num_samples=50, draws="systematic"),
        }

        def run(arm: str) -> float:
            t = time.perf_counter()
            if arm == "bare":
                outs = bare_llm.generate(prompts, flat, use_tqdm=False)
                assert len(outs) == len(prompts)
            elif arm == "hf":
                assert len(list(hf.score(examples, modes["default"]))) == len(examples)
            else:
                assert len(list(backend.score(examples, modes[arm]))) == len(examples)
            return time.perf_counter() - t

        for arm in args.arms:  # warm-up
            run(arm)
        seconds: dict[str, list[float]] = {arm: [] for arm in args.arms}
        for r in range(args.rounds):
            order = args.arms if r % 2 == 0 else args.arms[::-1]  # ABBA
            for arm in order:
                seconds[arm].append(run(arm))
        tps = {arm: tokens / statistics.median(s) for arm, s in seconds.items()}
        report = {
            "benchmark": "bench_engine_stats: supervised tokens/s, vLLM bare top-64 vs kdcache's in-engine statistics",
            "machine": machine(),
            "model": {"spec": args.model, "dtype": args.dtype, "vocab": backend.vocab_size,
                      "rows": backend.model_vocab_rows},
            "inputs": {"texts": len(examples), "supervised_tokens": tokens, "max_length": args.max_length,
                       "rounds": args.rounds},
            "engine_options": backend.engine_options,
            "engine_start_s": {k: round(v, 1) for k, v in start_s.items()},
            "tokens_per_s": {arm: round(v, 1) for arm, v in tps.items()},
            "ratios_to_bare": {arm: round(v / tps["bare"], 3) for arm, v in tps.items()} if "bare" in tps else {},
            "goal": "default / bare >= 0.9",
            "seconds": {arm: [round(x, 3) for x in s] for arm, s in seconds.items()},
        }
        if args.flops:
            from transformers import AutoConfig, AutoModelForCausalLM

            with __import__("torch").device("meta"):
                params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(str(teacher.path))).parameters())
            report["parameters"] = params
            report["mfu"] = {arm: round(2 * params * v / (args.peak_tflops * 1e12), 4) for arm, v in tps.items()}
    finally:
        backend.close()
        if bare_llm is not None:
            from kdcache.teacher.vllm_engine import close_engine

            close_engine(bare_llm)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
