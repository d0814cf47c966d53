"""Cache reader alone: supervised tokens/s decoding a cache into TeacherScores, on one core.

Stage two decodes shards in its training loop, so this is host time per step: at k=64 a
student step that trains 40k tokens/s spends ``40k / (this rate)`` of its time decoding.

    python benchmarks/bench_reader.py CACHE_DIR [--repeats 7]
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
    parser.add_argument("cache")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import pyarrow

    from kdcache.cache.reader import CacheReader

    reader = CacheReader(args.cache)
    times, tokens = [], 0
    for _ in range(args.repeats):  # the first pass also checks the shards' sha256 (once per process)
        start = time.perf_counter()
        tokens = sum(seq.num_targets for seq in reader.iter_sequences())
        times.append(time.perf_counter() - start)
    best = min(times[1:] or times)
    print(json.dumps({
        "benchmark": "cache reader (Parquet + decode to TeacherScores), one core",
        "cache": args.cache, "top_k": reader.top_k, "num_samples": reader.num_samples,
        "supervised_tokens": tokens, "seconds_best": round(best, 4),
        "tokens_per_s": round(tokens / best),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "numpy": np.__version__, "pyarrow": pyarrow.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
