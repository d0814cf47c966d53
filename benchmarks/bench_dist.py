#!/usr/bin/env python
"""train-student's step on one GPU: today's single-process path vs the FSDP2 path at world size 1.

Both arms run kdcache's own training pieces (:func:`kdcache.student.train.forward_backward`,
``build_optimizer``, the lean layers, the chunked KD loss) on the same packed micro-batch:

* ``single``: what ``kdcache train-student`` runs without a launcher: float32 master weights,
  bf16 autocast, fused AdamW;
* ``fsdp2``: what ``torchrun --nproc_per_node 1 -m kdcache train-student`` runs: the student
  sharded by :func:`kdcache.student.distributed.shard_fsdp2` (MixedPrecisionPolicy: bf16
  compute copies, float32 master weights and gradient reduction) in a one-rank NCCL group,
  foreach AdamW.

Every arm runs in its own process (so neither sees the other's memory), in the order
``single, fsdp2`` repeated ``--rounds`` times; each reports the median step time over
``--steps`` steps after ``--warmup`` and ``torch.cuda.max_memory_allocated`` over the steps.
Output: one JSON object with both arms' medians over rounds and the ratios fsdp2 / single.

Shapes: Qwen2.5-1.5B (random init, tied embeddings), 4 sequences x 2048 tokens packed in one
micro-batch (sdpa with a block-diagonal mask, as train-student packs them), every position
supervised, cached top-64 + tail targets, ``--loss tail``.

    python benchmarks/bench_dist.py              # one CUDA GPU (the measurement)
    python benchmarks/bench_dist.py --tiny       # CPU smoke check of the script (gloo), no figures
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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
    ap.add_argument("--arm", choices=["single", "fsdp2"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks that the script runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm (default 2; tiny 1)")
    ap.add_argument("--batch", type=int, default=None, help="sequences packed per step (default 4; tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args(argv)
    for name, full, tiny in (("steps", 10, 2), ("warmup", 2, 1), ("batch", 4, 2), ("seq", 2048, 64)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(args: argparse.Namespace) -> dict:
    """One arm, in this process: build, warm up, measure."""
    import torch

    from bench_kd_step import QWEN25_15B, QWEN25_TOKENIZER_VOCAB, TINY, TINY_TOKENIZER_VOCAB, synthetic_targets
    from kdcache.student.data import MicroBatch
    from kdcache.student.lean import apply_lean_layers
    from kdcache.student.losses import KDLossConfig
    from kdcache.student.modeling import StudentStep
    from kdcache.student.train import Runtime, build_optimizer, forward_backward
    from transformers import AutoModelForCausalLM, Qwen2Config

    device = torch.device("cpu" if args.tiny else "cuda")
    amp = None if args.tiny else torch.bfloat16
    env = None
    if args.arm == "fsdp2":
        from kdcache.student.distributed import init_distributed, shard_fsdp2, Launch

        env = init_distributed("cpu" if args.tiny else "cuda", Launch(0, 1, 0, "bench", "127.0.0.1", free_port()))
    torch.manual_seed(0)
    config = Qwen2Config(**(TINY if args.tiny else QWEN25_15B), use_cache=False)
    build_device = torch.device("cpu") if args.arm == "fsdp2" else device  # as train-student: shard from CPU
    with torch.device(build_device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    lean = apply_lean_layers(model)
    model.train()
    step_module = shard_fsdp2(StudentStep(model), amp, device) if env is not None else model
    optimizer = build_optimizer(model, 1e-5, 0.0, device, fused=env is None)
    runtime = Runtime(device, amp, "sdpa", torch.float32)
    loss_config = KDLossConfig(loss="tail")

    tok_vocab = TINY_TOKENIZER_VOCAB if args.tiny else QWEN25_TOKENIZER_VOCAB
    n = args.batch * args.seq
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, tok_vocab, (1, n), generator=g)
    targets = synthetic_targets(n, tok_vocab, args.k, "tail", torch.device("cpu"), 2)
    mb = MicroBatch(
        input_ids=input_ids, position_ids=torch.arange(args.seq).repeat(args.batch)[None], seq_lengths=[args.seq] * args.batch,
        hidden_index=torch.arange(n), gold_ids=torch.randint(0, tok_vocab, (n,), generator=g), targets=targets,
        teacher_logprobs=torch.zeros(n),
    )

    def step() -> float:
        metrics = forward_backward(step_module, [mb], loss_config, runtime, n)
        torch.nn.utils.clip_grad_norm_([p for grp in optimizer.param_groups for p in grp["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return metrics["loss"]

    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"arm": args.arm, "median_step_s": statistics.median(times), "step_s": times, "last_loss": loss,
           "lean_layers": lean.summary()}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if env is not None:
        env.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args)))
        return {}
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_dist.py: needs a CUDA GPU (this machine has none); --tiny checks the script on CPU without figures")
    runs: dict[str, list[dict]] = {"single": [], "fsdp2": []}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for _ in range(args.rounds):
        for arm in ("single", "fsdp2"):
            proc = subprocess.run([sys.executable, __file__, "--arm", arm, *passthrough], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                sys.exit(f"bench_dist.py: the {arm} arm failed:\n{proc.stderr[-3000:]}")
            runs[arm].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {arm: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                     **({"peak_gib": max(r["peak_gib"] for r in rs)} if "peak_gib" in rs[0] else {}),
                     "rounds": rs} for arm, rs in runs.items()}
    import transformers

    result = {
        "machine": {"torch": torch.__version__, "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else None},
        "config": {"model": "tiny-qwen2" if args.tiny else "Qwen2.5-1.5B shapes (random init)", "batch": args.batch,
                   "seq": args.seq, "k": args.k, "loss": "tail", "master_weights": "float32",
                   "compute": "cpu float32" if args.tiny else "bf16 (autocast / FSDP2 param_dtype)",
                   "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "order": "single, fsdp2 per round"},
        **summary,
        "ratios": {"time_fsdp2_over_single": summary["fsdp2"]["median_step_s"] / summary["single"]["median_step_s"],
                   "peak_mem_fsdp2_over_single": (summary["fsdp2"]["peak_gib"] / summary["single"]["peak_gib"])
                   if "peak_gib" in summary["single"] else None},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
