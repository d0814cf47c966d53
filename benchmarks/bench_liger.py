#!/usr/bin/env python
"""kdcache's KD step from the cache vs Liger-Kernel's SFT step (fused linear cross-entropy), side by side.

Goal (issue 13): the KD step at most 1.0x the time and 1.0x the peak memory of Liger SFT, the
fastest plain fine-tuning step users pick.

Arms, each in its own process (Liger patches transformers' Qwen2 classes for the whole
process, and a separate process keeps each arm's memory its own), in the order ``kd, liger``
repeated ``--rounds`` times:

* ``kd``: ``benchmarks/bench_kd_step.py``'s KD arm, i.e. what train-student runs: lean
  RMSNorm/SwiGLU layers, the decoder body, then ``chunked_kd_loss`` on cached top-64 + tail
  targets;
* ``liger``: ``liger_kernel.transformers.apply_liger_kernel_to_qwen2`` (its RoPE, RMSNorm,
  SwiGLU and fused linear cross-entropy kernels) and ``model(input_ids, labels=input_ids)``,
  which never builds the full logits either.

Same shapes and settings in both: Qwen2.5-1.5B (random init, tied embeddings), bf16
weights, sdpa, batch 4 x 2048, AdamW, median step over ``--steps`` after ``--warmup``, peak
``torch.cuda.max_memory_allocated`` over the steps.

Needs CUDA and ``liger-kernel`` 0.8.5 (pure Python; needs triton, which ships with CUDA
torch). On a machine without network, carry the wheel (do not commit it), from the repo root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl liger-kernel==0.8.5
    # on the GPU machine (benchmarks/gpu_check.sh does this for every wheel in .whl/):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site

    python benchmarks/bench_liger.py            # [--grad-ckpt] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", choices=["kd", "liger"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both arms")
    return ap.parse_args(argv)


def run_arm(args: argparse.Namespace) -> dict:
    import torch

    import bench_kd_step as base
    from kdcache.student.lean import apply_lean_layers
    from kdcache.student.losses import KDLossConfig

    kd_args = base.parse_args(["--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k)]
                              + (["--grad-ckpt"] if args.grad_ckpt else []))
    device = torch.device("cuda")
    model = base.build_model(kd_args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, base.QWEN25_TOKENIZER_VOCAB, (args.batch, args.seq), generator=g, device=device)
    if args.arm == "kd":
        apply_lean_layers(model)
        targets = base.synthetic_targets(args.batch * (args.seq - 1), base.QWEN25_TOKENIZER_VOCAB, args.k, "tail", device, 1)
        gold = input_ids[:, 1:].reshape(-1)
        config = KDLossConfig(loss="tail")

        def step() -> float:
            return base.kd_step(model, opt, input_ids, targets, gold, config, kd_args)
    else:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)

        def step() -> float:
            return base.sft_step(model, opt, input_ids, kd_args)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"arm": args.arm, "median_step_s": statistics.median(times), "step_s": times, "last_loss": loss,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_liger.py: needs a CUDA GPU (this machine has none)")
    if args.arm:
        print(json.dumps(run_arm(args)))
        return {}
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        sys.exit("bench_liger.py: needs liger-kernel 0.8.5 (pip install liger-kernel==0.8.5; offline: see this file's docstring)")
    runs: dict[str, list[dict]] = {"kd": [], "liger": []}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for _ in range(args.rounds):
        for arm in ("kd", "liger"):
            proc = subprocess.run([sys.executable, __file__, "--arm", arm, *passthrough], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
            if proc.returncode != 0:
                sys.exit(f"bench_liger.py: the {arm} arm failed:\n{proc.stderr[-3000:]}")
            runs[arm].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {arm: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                     "peak_gib": max(r["peak_gib"] for r in rs), "rounds": rs} for arm, rs in runs.items()}
    import liger_kernel  # noqa: F401
    import transformers
    from importlib.metadata import version

    time_ratio = summary["kd"]["median_step_s"] / summary["liger"]["median_step_s"]
    mem_ratio = summary["kd"]["peak_gib"] / summary["liger"]["peak_gib"]
    result = {
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "liger_kernel": version("liger-kernel")},
        "config": {"model": "Qwen2.5-1.5B shapes (random init)", "dtype": "bfloat16", "attn": "sdpa",
                   "batch": args.batch, "seq": args.seq, "k": args.k, "grad_ckpt": args.grad_ckpt,
                   "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "order": "kd, liger per round"},
        **summary,
        "ratios": {"time_kd_over_liger": time_ratio, "peak_mem_kd_over_liger": mem_ratio},
        "goals": {"time_kd_over_liger_le_1.0": time_ratio <= 1.0, "peak_mem_kd_over_liger_le_1.0": mem_ratio <= 1.0},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
