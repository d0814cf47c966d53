"""Which backend scores each cache mode faster? vLLM and transformers, top-64 and the default mode.

Each (backend, mode) runs in its own process (vLLM's engine wants one per process) on the
same tokenized Wikipedia texts and the real SmolLM2-135M-Instruct teacher; the engine start
is excluded, one warm-up call is made, and the best of ``--repeats`` calls of
``backend.score`` is kept. Modes: ``top64`` (``--top-k 64 --sampling none``) and ``default``
(``--top-k 4 --sampling tail --samples 8``, systematic draws). The processes run one after
the other in the order given, so run the script twice to see the noise.

    python benchmarks/bench_backends.py                  # hf and vllm, both modes
    python benchmarks/bench_backends.py --texts 48 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

MODES = {"top64": dict(top_k=64, num_samples=0), "default": dict(top_k=4, num_samples=8, sample_tail=True)}


def measure(backend_name: str, mode: str, texts: int, max_length: int, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from kdcache.data.tokenize import tokenize_rows
    from kdcache.demo import wiki_entries
    from kdcache.teacher.base import ScoringSettings
    from kdcache.teacher.gguf import convert_gguf_to_hf
    from kdcache.teacher.loading import make_backend, resolve_teacher
    from kdcache.testing.models import smollm2_gguf_path

    model_dir = convert_gguf_to_hf(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [(i, f"wiki:{i + 1}", {"text": e["extract"]}) for i, e in enumerate(wiki_entries()[:texts])]
    examples = list(tokenize_rows(rows, tokenizer, max_length=max_length, fmt="text"))
    backend = make_backend(backend_name, resolve_teacher(str(model_dir)), dtype="float32")
    settings = ScoringSettings(seed=0, draws="systematic", **MODES[mode])
    list(backend.score(examples[:2], settings))
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = sum(r.num_targets for r in backend.score(examples, settings))
        best = min(best, time.perf_counter() - start)
    backend.close()
    return {"backend": backend.name, "mode": mode, "supervised_tokens": tokens, "tokens_per_s": round(tokens / best, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--texts", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = measure(*args.one, args.texts, args.max_length, args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # vLLM may abort at interpreter exit; the result is out
    results = []
    for mode in args.modes:
        for backend in args.backends:
            proc = subprocess.run([sys.executable, __file__, "--one", backend, mode, "--texts", str(args.texts),
                                   "--max-length", str(args.max_length), "--repeats", str(args.repeats)],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{backend}/{mode} failed:\n{proc.stderr[-2000:]}")
            results.append(json.loads(line.removeprefix("RESULT ")))
    import torch
    import transformers

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    print(json.dumps({
        "benchmark": "backend.score tokens/s, SmolLM2-135M-Instruct float32, Wikipedia texts",
        "texts": args.texts, "max_length": args.max_length, "results": results,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm_version,
    }, indent=2))


if __name__ == "__main__":
    main()
