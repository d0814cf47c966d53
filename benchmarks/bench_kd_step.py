#!/usr/bin/env python
"""One KD training step from cached sparse targets vs one plain SFT step, side by side.

Arms (same randomly initialized model, same AdamW, same batch, one process):

* ``sft``: ``model(input_ids, labels=input_ids).loss.backward()``; AdamW step.
  transformers materializes the full ``[B, L, V]`` logits (bf16, then float32 in the loss).
* ``kd``: what ``kdcache train-student`` runs: the memory-lean RMSNorm/SwiGLU forwards of
  ``kdcache.student.lean`` (its default ``--lean-layers``; off with ``--no-lean-layers``),
  ``model.model(input_ids)`` (hidden states only, no lm_head), then
  ``kdcache.student.chunked.chunked_kd_loss`` on synthetic cache targets (``k`` top-k ids
  and log-probs plus the tail, consistent with one distribution per position); AdamW step.

Repetitions alternate the arms (ABBA order) after a warm-up that also creates the AdamW
state. Reported per arm: median / min step seconds and ``torch.cuda.max_memory_allocated``
over the step (plus the allocation right before the step: weights and AdamW state).
Output: one JSON object on stdout.

Defaults are Qwen2.5-1.5B shapes (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocab 151936 with 151665 tokenizer ids, tied embeddings), bf16, sdpa
attention, seq 2048, batch 4. ``--tiny`` runs a small model on CPU as a smoke check.

    python benchmarks/bench_kd_step.py                 # H100: the real measurement
    python benchmarks/bench_kd_step.py --grad-ckpt     # both arms with gradient checkpointing
    python benchmarks/bench_kd_step.py --dtype float32 --autocast   # fp32 master weights, bf16 autocast
    python benchmarks/bench_kd_step.py --tiny          # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdcache.student.lean import apply_lean_layers  # noqa: E402
from kdcache.student.chunked import DEFAULT_MAX_CHUNK_BYTES, choose_chunk_size, chunked_kd_loss, head_inputs  # noqa: E402
from kdcache.student.losses import LOSS_NAMES, KDLossConfig, TeacherTargets  # noqa: E402

QWEN25_15B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)
QWEN25_TOKENIZER_VOCAB = 151665
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1024,
    tie_word_embeddings=True,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)
TINY_TOKENIZER_VOCAB = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke check)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument("--k", type=int, default=None, help="cached top-k (default 64; tiny 16)")
    ap.add_argument("--loss", choices=LOSS_NAMES, default="tail")
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("--chunk-size", type=int, default=None, help="positions per loss chunk (default: from budget)")
    ap.add_argument("--max-chunk-bytes", type=int, default=DEFAULT_MAX_CHUNK_BYTES)
    ap.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm (default 2; tiny 1)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both arms")
    ap.add_argument("--lean-layers", action=argparse.BooleanOptionalAction, default=True,
                    help="memory-lean RMSNorm/SwiGLU in the kd arm, as train-student's default (default: on)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--autocast", action="store_true",
                    help="bf16 autocast in both arms (with --dtype float32: train-student's full fine-tuning default)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    defaults = (2, 64, 16, 2, 1) if args.tiny else (4, 2048, 64, 10, 2)
    for name, value in zip(("batch", "seq", "k", "steps", "warmup"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    return args


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Random-init Qwen2 causal LM in ``args.dtype`` with sdpa attention, built on ``device``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**(TINY if args.tiny else QWEN25_15B), use_cache=False)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model.to(device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def synthetic_targets(
    num_pos: int, tokenizer_vocab: int, k: int, loss: str, device: torch.device, seed: int
) -> TeacherTargets:
    """Cache-like targets for ``num_pos`` positions.

    Each row: ``k`` distinct random ids below the tokenizer size, and log-probs from one
    random (k+1)-outcome distribution (top-k sorted descending, last outcome = tail), so
    ``sum exp(topk) + exp(tail) = 1``. For ``rs_kd``: 64 draws over the first 32 ids.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for start in range(0, num_pos, 1024):
        n = min(1024, num_pos - start)
        rows.append(torch.rand(n, tokenizer_vocab, generator=g, device=device).topk(k, dim=-1).indices)
    ids = torch.cat(rows)
    logits = torch.randn(num_pos, k + 1, generator=g, device=device) * 2.0
    logits[:, k] += 2.0  # give the tail bucket a realistic share of the mass
    lp = torch.log_softmax(logits, dim=-1)
    targets = TeacherTargets(
        topk_ids=ids, topk_logprobs=lp[:, :k].sort(dim=-1, descending=True).values, tail_logmass=lp[:, k].contiguous()
    )
    if loss == "rs_kd":
        m, n_draws = min(32, k), 64
        probs = torch.softmax(torch.randn(num_pos, m, generator=g, device=device), dim=-1)
        draws = torch.multinomial(probs, n_draws, replacement=True, generator=g)
        ones = torch.ones_like(draws, dtype=torch.float)
        counts = torch.zeros(num_pos, m, device=device).scatter_add_(1, draws, ones)
        targets.sample_ids = torch.where(counts > 0, ids[:, :m], -1)
        targets.sample_weights = counts / n_draws
    return targets


def amp_context(args: argparse.Namespace):
    """bf16 autocast over the forward pass with ``--autocast``, else nothing."""
    return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast)


def sft_step(model: torch.nn.Module, opt: torch.optim.Optimizer, input_ids: torch.Tensor, args: argparse.Namespace) -> float:
    with amp_context(args):
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def kd_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    targets: TeacherTargets,
    gold: torch.Tensor,
    config: KDLossConfig,
    args: argparse.Namespace,
) -> float:
    with amp_context(args):
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # the rows that predict tokens 1..L-1
    amp = torch.bfloat16 if args.autocast else None
    h, weight, bias = head_inputs(rows, model.lm_head.weight, model.lm_head.bias, 1.0, amp)
    loss, metrics = chunked_kd_loss(
        h,
        weight,
        targets,
        gold,
        config,
        bias=bias,
        chunk_size=args.chunk_size,
        max_chunk_bytes=args.max_chunk_bytes,
    )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return metrics["loss"]


def timed(fn: Callable[[], float], device: torch.device) -> dict:
    """Run one step; seconds, peak bytes allocated during it, bytes allocated before it."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    try:
        loss = fn()
    except torch.OutOfMemoryError:
        return {"oom": True}
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "loss": loss}
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["before_bytes"] = before
    return out


def summarize(runs: list[dict], tokens: int) -> dict:
    if any(r.get("oom") for r in runs):
        return {"oom": True}
    secs = [r["seconds"] for r in runs]
    out = {
        "median_step_s": statistics.median(secs),
        "min_step_s": min(secs),
        "step_s": secs,
        "tokens_per_s": tokens / statistics.median(secs),
        "last_loss": runs[-1]["loss"],
    }
    if "peak_bytes" in runs[0]:
        peak = max(r["peak_bytes"] for r in runs)
        before = max(r["before_bytes"] for r in runs)
        out.update(peak_bytes=peak, peak_gib=peak / 2**30, before_step_gib=before / 2**30,
                   step_extra_gib=(peak - before) / 2**30)
    return out


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def ratio(kd: dict, sft: dict, key: str) -> float | None:
    if key not in kd or key not in sft or not sft[key]:
        return None
    return kd[key] / sft[key]


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args, device)
    vocab = model.config.vocab_size
    tok_vocab = TINY_TOKENIZER_VOCAB if args.tiny else QWEN25_TOKENIZER_VOCAB
    g = torch.Generator(device=device).manual_seed(args.seed)
    input_ids = torch.randint(0, tok_vocab, (args.batch, args.seq), generator=g, device=device)
    num_pos = args.batch * (args.seq - 1)
    targets = synthetic_targets(num_pos, tok_vocab, args.k, args.loss, device, args.seed + 1)
    gold = input_ids[:, 1:].reshape(-1)
    config = KDLossConfig(loss=args.loss, ce_weight=args.ce_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lean = apply_lean_layers(model) if args.lean_layers else None

    def sft_arm() -> float:  # transformers as it ships
        if lean is not None:
            lean.set_active(False)
        return sft_step(model, opt, input_ids, args)

    def kd_arm() -> float:  # what train-student runs
        if lean is not None:
            lean.set_active(True)
        return kd_step(model, opt, input_ids, targets, gold, config, args)

    arms = {"sft": sft_arm, "kd": kd_arm}
    for _ in range(args.warmup):
        for name in ("sft", "kd"):
            timed(arms[name], device)
    runs: dict[str, list[dict]] = {"sft": [], "kd": []}
    for rep in range(args.steps):
        order = ("sft", "kd") if rep % 2 == 0 else ("kd", "sft")
        for name in order:
            runs[name].append(timed(arms[name], device))

    tokens = args.batch * args.seq
    sft, kd = summarize(runs["sft"], tokens), summarize(runs["kd"], tokens)
    chunk = args.chunk_size or choose_chunk_size(vocab, args.max_chunk_bytes)
    ratios = {
        "time_kd_over_sft": ratio(kd, sft, "median_step_s"),
        "peak_mem_kd_over_sft": ratio(kd, sft, "peak_bytes"),
        "step_extra_mem_kd_over_sft": ratio(kd, sft, "step_extra_gib"),
    }
    result = {
        "machine": machine_info(device),
        "config": {
            "model": "tiny-qwen2" if args.tiny else "Qwen2.5-1.5B shapes (random init)",
            "model_config": TINY if args.tiny else QWEN25_15B,
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": args.dtype,
            "autocast": "bfloat16" if args.autocast else None,
            "attn_implementation": "sdpa",
            "batch": args.batch,
            "seq": args.seq,
            "supervised_positions": num_pos,
            "k": args.k,
            "kd_loss": asdict(config),
            "chunk_size": chunk,
            "num_chunks": -(-num_pos // chunk),
            "grad_ckpt": args.grad_ckpt,
            "kd_lean_layers": lean.summary() if lean is not None else "off",
            "warmup_steps_per_arm": args.warmup,
            "measured_steps_per_arm": args.steps,
            "order": "warm-up, then alternating ABBA repetitions",
        },
        "sft": sft,
        "kd": kd,
        "ratios": ratios,
        "goals": {
            "time_kd_over_sft_le_1.0": at_most(ratios["time_kd_over_sft"], 1.0),
            "peak_mem_kd_over_sft_le_0.6": at_most(ratios["peak_mem_kd_over_sft"], 0.6),
        },
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
