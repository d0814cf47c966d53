"""Host cost of sampled runs through vLLM: draws from whole vocabulary rows, per token, one core.

vLLM can give kdcache a position's distribution only as prompt log-probs; for ``--sampling
random`` or ``tail`` that means every logit row of every position (``prompt_logprobs=-1``).
Whatever the GPU does, the frontend process must then turn ``V`` (id, log-prob) pairs per
token into draws (``kdcache.teacher.vllm_backend.draws_from_rows``). This times that step
alone on rows shaped like vLLM's (all ``V`` ids in rank order), so its tokens/s is a ceiling
for a sampled run through vLLM on one frontend core, before vLLM's own cost of sorting,
copying and sending the rows. The transformers backend draws on the device instead
(``draw_counts_torch``), so it has no such ceiling.

    python benchmarks/bench_full_rows.py                 # vocabularies of SmolLM2 and Qwen2.5
    python benchmarks/bench_full_rows.py --vocab 128256  # Llama 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 152064])
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from kdcache.teacher.base import ScoringSettings
    from kdcache.teacher.sampling import sequence_rng
    from kdcache.teacher.vllm_backend import draws_from_rows

    settings = ScoringSettings(top_k=args.top_k, num_samples=args.samples, seed=0, sample_tail=True, draws="systematic")
    rows = []
    for vocab in args.vocab:
        rng = np.random.default_rng(0)
        logits = rng.normal(0.0, 3.0, size=(args.positions, vocab)).astype(np.float32)
        lps = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True)).astype(np.float32)
        ids = np.argsort(-lps, axis=1)  # vLLM's order: descending log-prob
        ranked = np.take_along_axis(lps, ids, 1)
        best = min(_timed(lambda: draws_from_rows(ids, ranked, vocab, vocab, settings, sequence_rng(0, 1),
                                                  ids[:, : args.top_k])) for _ in range(args.repeats))
        rows.append({"vocab": vocab, "us_per_token": round(best / args.positions * 1e6, 1),
                     "tokens_per_s_ceiling": round(args.positions / best)})
    print(json.dumps({
        "benchmark": "host work per token of a sampled run through vLLM (whole rows -> draws), one core",
        "top_k": args.top_k, "samples": args.samples, "positions": args.positions, "rows": rows,
        "machine": platform.processor() or platform.machine(), "numpy": np.__version__,
    }, indent=2))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
