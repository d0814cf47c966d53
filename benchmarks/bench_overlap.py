"""Stage one with and without overlap: does the teacher wait for tokenizing and shard writing?

``generate-teacher`` tokenizes the next shard and writes the previous one in background
threads while the teacher scores the current one (``GenerateConfig.overlap``, on by default).
This runs the same job both ways, alternating (serial, overlapped, serial, ...), on real
Wikipedia text, and reports end-to-end supervised tokens/s and their ratio.

The gain depends on how fast the teacher is next to the host work (about 2 us per token to
write a top-64 shard on one core, plus tokenizing). A GPU teacher is the case that matters;
on a CPU-only machine the benchmark stands one in by pinning the teacher's torch to one
thread (one core), leaving the other core to the host threads, and by using a small
random-init Llama (``--hidden``, ``--layers``, about 15k tokens/s by default).

    python benchmarks/bench_overlap.py                    # 1500 texts, top-64, 3 rounds
    python benchmarks/bench_overlap.py --top-k 4 --sampling tail --samples 8
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1500)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=150, help="rows per shard")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--sampling", default="none")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024, help="size of the BPE tokenizer trained on the texts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import pyarrow
    import torch
    import transformers

    from kdcache.demo import wiki_entries
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache
    from kdcache.testing.models import build_tiny_model

    torch.set_num_threads(1)
    texts = [entry["extract"] for entry in wiki_entries()[: args.texts]]
    work = Path(tempfile.mkdtemp(prefix="kdcache-overlap-"))
    try:
        model = build_tiny_model(work / "teacher", texts, vocab_size=args.vocab, hidden_size=args.hidden,
                                 num_layers=args.layers)
        data = work / "wiki.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        runs: dict[str, list[float]] = {"serial": [], "overlapped": []}
        tokens = 0
        for round_index in range(args.rounds):
            for mode in runs:
                out = work / f"cache-{mode}-{round_index}"
                cfg = GenerateConfig(
                    teacher=str(model), dataset=str(data), output=str(out), backend="hf", dtype="float32",
                    top_k=args.top_k, sampling=args.sampling, samples=args.samples, max_length=args.max_length,
                    shard_size=args.shard_size, progress=False, overlap=mode == "overlapped",
                )
                start = time.perf_counter()
                manifest = generate_teacher_cache(cfg)
                runs[mode].append(time.perf_counter() - start)
                tokens = manifest["totals"]["supervised_tokens"]
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = {mode: statistics.median(times) for mode, times in runs.items()}
    result = {
        "benchmark": "generate-teacher end to end, serial vs overlapped tokenize/score/write",
        "teacher": f"random-init Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
                   "transformers backend, float32, torch on 1 thread",
        "texts": len(texts), "supervised_tokens": tokens, "top_k": args.top_k, "sampling": args.sampling,
        "shard_size_rows": args.shard_size,
        "seconds_median": {m: round(s, 3) for m, s in seconds.items()},
        "seconds_all": {m: [round(t, 3) for t in times] for m, times in runs.items()},
        "tokens_per_s": {m: round(tokens / s) for m, s in seconds.items()},
        "overlapped_over_serial_speed": round(seconds["serial"] / seconds["overlapped"], 3),
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "pyarrow": pyarrow.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
