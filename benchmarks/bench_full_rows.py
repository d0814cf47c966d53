"""Host cost of sampled runs through vLLM's prompt log-probs: whole vocabulary rows to draws,
per token, one core.

Through prompt log-probs (kdcache's fallback for vLLM outside the tested range) a position's
distribution arrives only as ranked (id, log-prob) pairs; for ``--sampling random`` or
``tail`` that means every logit row of every position (``prompt_logprobs=-1``). The frontend
process must then scatter ``V`` pairs per token back into id order and compute the
statistics on the host (``VLLMPromptLogprobsBackend._scores_from_dense``). This times that
step alone on rows shaped like vLLM's, so its tokens/s is a ceiling for a sampled run on that
path on one frontend core, before vLLM's own cost of sorting, copying and sending the rows.
The in-engine path (``kdcache.teacher.vllm_model``) computes the same statistics next to the
logits, so it has no such ceiling (``bench_engine_stats.py``).

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
    import torch

    from kdcache.teacher.statistics import StatsSpec, position_statistics

    torch.set_num_threads(1)

    def draws_from_rows(ids: np.ndarray, ranked: np.ndarray, vocab: int) -> np.ndarray:
        dense = np.full(ids.shape, -np.inf, dtype=np.float32)
        np.put_along_axis(dense, ids, ranked, axis=1)
        spec = StatsSpec(args.top_k, args.samples, True, "systematic", 0, vocab)
        n = ids.shape[0]
        return position_statistics(torch.from_numpy(dense), torch.zeros(n, dtype=torch.long),
                                   torch.zeros(n, dtype=torch.long), torch.arange(n), spec).numpy()

    rows = []
    for vocab in args.vocab:
        rng = np.random.default_rng(0)
        logits = rng.normal(0.0, 3.0, size=(args.positions, vocab)).astype(np.float32)
        lps = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True)).astype(np.float32)
        ids = np.argsort(-lps, axis=1)  # vLLM's order: descending log-prob
        ranked = np.take_along_axis(lps, ids, 1)
        best = min(_timed(lambda: draws_from_rows(ids, ranked, vocab)) for _ in range(args.repeats))
        rows.append({"vocab": vocab, "us_per_token": round(best / args.positions * 1e6, 1),
                     "tokens_per_s_ceiling": round(args.positions / best)})
    print(json.dumps({
        "benchmark": "host work per token of a sampled run through vLLM (whole rows -> draws), one core",
        "top_k": args.top_k, "samples": args.samples, "positions": args.positions, "rows": rows,
        "machine": platform.processor() or platform.machine(), "numpy": np.__version__,
        "torch": torch.__version__,
    }, indent=2))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
