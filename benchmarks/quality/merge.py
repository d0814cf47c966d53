"""Merge quality-benchmark results of the same setup run as separate processes (e.g. one seed
per CPU core or per machine) into one report.

    python -m benchmarks.quality.merge runs/a/quality.json runs/b/quality.json \\
        --results-dir benchmarks/results --results-name quality

The parts must share the scale, hyper-parameters, training file, held-out sets, student and
teacher; their arms are pooled, the summary and choices recomputed, and the report written
like a single run's (``<name>.json``, ``.md``, ``.png``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from benchmarks.quality.report import summarize, write_outputs

#: Keys that must be identical in every part for the pooled comparison to be fair.
SHARED_KEYS = ("scale", "hparams", "eval", "train", "student", "teacher", "init")


def choices_from(summary: Sequence[dict]) -> dict:
    """The report's choices from pooled rows: lowest mean held-out text KL."""
    def best(rows: list[dict]) -> dict | None:
        rows = [r for r in rows if r["status"] == "ok"]
        return min(rows, key=lambda r: r["text_kl"]) if rows else None

    choices = {}
    tail = best([r for r in summary if r["loss"] == "tail" and r["ce_weight"] == 0.0 and r["arm"].startswith("tail-k")])
    if tail is not None:
        choices["best top-k (lowest held-out KL among tail arms)"] = int(tail["arm"].removeprefix("tail-k"))
    mode = best([r for r in summary if r["ce_weight"] == 0.0 and r["loss"] in ("tail", "topk_renorm", "rs_kd", "tail_rs")
                 and not r["arm"].startswith(("rkl", "jsd"))])
    if mode is not None:
        choices["best cache mode (lowest held-out KL among tail, renorm, rs, tail_rs)"] = mode["arm"]
    return choices


def merge(parts: Sequence[dict]) -> dict:
    """One results dict from several; raises ValueError if the parts are not comparable."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for part in parts[1:]:
        for key in SHARED_KEYS:
            if part.get(key) != first.get(key):
                raise ValueError(f"parts differ in {key!r}: not the same benchmark setup")
    seen: set[tuple[str, int]] = set()
    arms = []
    for part in parts:
        for arm in part["arms"]:
            if (arm["arm"], arm["seed"]) in seen:
                raise ValueError(f"arm {arm['arm']} seed {arm['seed']} appears in two parts")
            seen.add((arm["arm"], arm["seed"]))
            arms.append(arm)
    order = list(dict.fromkeys(a["arm"] for part in parts for a in part["arms"]))
    arms.sort(key=lambda a: (order.index(a["arm"]), a["seed"]))
    summary = summarize(arms)
    return {
        **first,
        "command": " ; ".join(p["command"] for p in parts),
        "seeds": sorted({s for p in parts for s in p["seeds"]}),
        "arms": arms,
        "summary": summary,
        "choices": choices_from(summary),
        "total_seconds": max(p["total_seconds"] for p in parts),
        "parts": [{"command": p["command"], "seeds": p["seeds"], "total_seconds": p["total_seconds"],
                   "machine": p["machine"]} for p in parts],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", type=Path, help="results JSON files of the runs to pool")
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--results-name", default="quality")
    args = parser.parse_args(argv)
    merged = merge([json.loads(p.read_text()) for p in args.parts])
    merged["command"] += " ; python -m benchmarks.quality.merge " + " ".join(
        [*map(str, args.parts), "--results-dir", str(args.results_dir), "--results-name", args.results_name])
    for path in write_outputs(merged, args.results_dir, args.results_name):
        print(path)
    return merged


if __name__ == "__main__":
    main()
