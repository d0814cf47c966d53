"""Shard writer alone: supervised tokens/s encoding + writing one shard, pinned to one core.

Goal (issue 2): >= 1M supervised tokens/s at k=64 on one core. Inputs are synthetic but
shaped like a real teacher's: top-k ids drawn from a Zipf-like vocabulary prior (so the id
table and compression behave realistically), log-probs sorted descending.

Side by side (alternating, best of ``--repeats``) with the whole writer, the same shard's
already-encoded Arrow table goes through only what any writer of this format must do:
Parquet encoding with zstd, sha256 of the bytes, one write + fsync. That "container floor"
bounds the writer's speed on the machine whatever the encoder costs.

    python benchmarks/bench_writer.py --tokens 1000000 --top-k 64
    python benchmarks/bench_writer.py --cache CACHE_DIR     # real teacher output, rewritten
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def synthetic_results(n_tokens: int, top_k: int, vocab: int, seq_len: int, seed: int = 0):
    from kdcache.cache.records import TeacherScores, tail_logmass_from_topk

    rng = np.random.default_rng(seed)
    prior = 1.0 / np.arange(1, vocab + 1) ** 1.1
    prior /= prior.sum()
    n_seq = max(1, n_tokens // seq_len)
    ids = rng.choice(vocab, size=(n_seq * seq_len, top_k), p=prior).astype(np.int32)
    gaps = rng.exponential(0.15, size=(n_seq * seq_len, top_k)).astype(np.float32)
    lps = -np.cumsum(gaps, axis=1) - 0.05
    tails = tail_logmass_from_topk(lps)
    results = []
    for s in range(n_seq):
        sl = slice(s * seq_len, (s + 1) * seq_len)
        results.append(
            TeacherScores(
                seq_id=s, source=f"bench:{s + 1}", input_ids=ids[sl, 0].copy(),
                target_positions=np.arange(1, seq_len + 1, dtype=np.int32), target_logprobs=lps[sl, 0].copy(),
                topk_ids=ids[sl], topk_logprobs=lps[sl], tail_logmass=tails[sl],
            )
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=None,
                        help="rewrite the records of this cache (all shards as one) instead of synthetic ones")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import pyarrow
    from kdcache.cache.writer import write_shard

    if args.cache:
        from kdcache.cache.reader import CacheReader

        reader = CacheReader(args.cache)
        results, args.top_k = list(reader.iter_sequences()), reader.top_k
    else:
        results = synthetic_results(args.tokens, args.top_k, args.vocab, args.seq_len)
    n_tokens = sum(r.num_targets for r in results)
    import hashlib
    from pathlib import Path

    from kdcache.cache.storage import _fsync_write
    from kdcache.cache.writer import build_shard_table, encode_parquet

    table, meta, _ = build_shard_table(results, args.top_k)

    def container_only(tmp: str) -> None:
        encoded = encode_parquet(table, meta)
        hashlib.sha256(memoryview(encoded)).hexdigest()
        _fsync_write(Path(tmp) / "floor.parquet", memoryview(encoded))

    times, floor_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            start = time.perf_counter()
            record = write_shard(tmp, i, results, args.top_k)
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            container_only(tmp)
            floor_times.append(time.perf_counter() - start)
    best = min(times)
    print(json.dumps({
        "benchmark": "shard writer (encode + zstd Parquet + fsync + sha256), one core",
        "input": args.cache or "synthetic (Zipf ids)", "supervised_tokens": n_tokens, "top_k": args.top_k,
        "seconds_best": round(best, 3), "seconds_all": [round(t, 3) for t in times],
        "tokens_per_s": round(n_tokens / best), "goal_tokens_per_s": 1_000_000,
        "container_floor_tokens_per_s": round(n_tokens / min(floor_times)),
        "encode_share_of_writer": round(1 - min(floor_times) / best, 3),
        "bytes_per_token": round(record.bytes / n_tokens, 2),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "numpy": np.__version__, "pyarrow": pyarrow.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
