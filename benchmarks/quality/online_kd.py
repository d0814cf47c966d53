"""The two reference arms, in plain torch: CE only (SFT) and online full-vocabulary forward KL.

Both train the student on the same examples in the same order with the same
:class:`~benchmarks.quality.hparams.TrainHParams` as the cache arms. Per optimizer step (one
"global batch" of ``rows_per_step`` rows, split into micro-batches of at most
``micro_batch_tokens`` padded tokens), the loss is

* ``sft``:    ``(1 / N) sum_t -log q(y_t)``
* ``online``: ``(1 / N) sum_t KL(p_t || q_t)`` with the teacher's full softmax ``p_t`` computed in
  the same process under ``no_grad`` at every step (temperature 1, float32 log-softmax over all
  output rows)

where ``N`` is the number of supervised tokens in the whole optimizer step, so accumulated
micro-batch gradients equal those of the global average. The LM head and loss run in chunks of
``logit_chunk`` positions on detached hidden states; their gradient is then pushed through the
decoder once (exact, and the ``[T, V]`` logits never exist for a whole micro-batch).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from benchmarks.quality.hparams import TrainHParams
from benchmarks.quality.metrics import full_kl
from benchmarks.quality.modeling import autocast, head_logprobs, load_lm, selected_hidden
from benchmarks.quality.tokens import Example, collate, global_batches, micro_batches

REFERENCE_LOSSES = ("sft", "online")

# (supervised tokens seen so far, the model being trained) -> metrics dict
EvalHook = Callable[[int, torch.nn.Module], dict]


@dataclass
class TrainLog:
    """What a reference run did: per-step loss, the evaluation curve, timing."""

    steps: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "curve": self.curve, "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds, "tokens": self.tokens}


def eval_every(total_steps: int, points: int) -> int:
    """Evaluation interval in optimizer steps for about ``points`` evaluations (``--eval-every``)."""
    return max(1, math.ceil(total_steps / max(1, points)))


def eval_steps(total_steps: int, points: int) -> set[int]:
    """Steps after which to evaluate: multiples of :func:`eval_every`, and always the last
    (the rule ``train-student`` applies to ``--eval-every``)."""
    every = eval_every(total_steps, points)
    return set(range(every, total_steps + 1, every)) | {total_steps}


def make_optimizer(model: torch.nn.Module, hp: TrainHParams) -> torch.optim.Optimizer:
    """AdamW over all parameters (tied weights counted once), fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps, weight_decay=hp.weight_decay)
    if params and params[0].is_cuda:
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def micro_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    group: Sequence[Example],
    loss: str,
    denominator: int,
    hp: TrainHParams,
    logit_chunk: int,
) -> float:
    """Forward + backward of one micro-batch; returns its share of the step loss (a float)."""
    device = next(student.parameters()).device
    batch = collate(group).to(device)
    with autocast(device, hp.dtype):
        hidden = selected_hidden(student, batch)
        t_hidden = None
        if loss == "online":
            with torch.no_grad():
                t_hidden = selected_hidden(teacher, batch)
    leaf = hidden.detach().requires_grad_(True)
    total = 0.0
    for start in range(0, batch.num_targets, logit_chunk):
        stop = min(start + logit_chunk, batch.num_targets)
        with autocast(device, hp.dtype):
            s_logp = head_logprobs(student, leaf[start:stop])
        if loss == "sft":
            per_token = -s_logp.gather(1, batch.gold[start:stop, None]).squeeze(1)
        else:
            with torch.no_grad(), autocast(device, hp.dtype):
                t_logp = head_logprobs(teacher, t_hidden[start:stop])
            per_token = full_kl(t_logp, s_logp)
        chunk_loss = per_token.sum() / denominator
        chunk_loss.backward()
        total += float(chunk_loss.detach())
    hidden.backward(leaf.grad)
    return total


def train_reference(
    loss: str,
    student_dir: str | Path,
    examples: Sequence[Example],
    hp: TrainHParams,
    *,
    seed: int,
    teacher: torch.nn.Module | None = None,
    device: torch.device,
    logit_chunk: int = 512,
    curve_points: int = 4,
    eval_hook: EvalHook | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, TrainLog]:
    """Train a fresh copy of the student with ``loss`` ("sft" or "online"); one epoch over
    ``examples`` in order. Saves the final model to ``out_dir`` (if given) with
    ``train_log.json``. Returns ``(model, log)``; ``eval_hook`` runs before the first step and
    at ``curve_points`` evenly spaced steps, its results go to ``log.curve``."""
    if loss not in REFERENCE_LOSSES:
        raise ValueError(f"loss must be one of {REFERENCE_LOSSES}, got {loss!r}")
    if loss == "online" and teacher is None:
        raise ValueError("the online arm needs the teacher")
    torch.manual_seed(seed)
    student = load_lm(student_dir, device, train=True)
    optimizer = make_optimizer(student, hp)
    steps = global_batches(examples, hp.rows_per_step)
    checkpoints = eval_steps(len(steps), curve_points)
    record = TrainLog()

    def run_eval(tokens_seen: int) -> None:
        if eval_hook is None:
            return
        began = time.perf_counter()
        student.eval()
        point = {"tokens": tokens_seen, **eval_hook(tokens_seen, student)}
        student.train()
        record.curve.append(point)
        record.eval_seconds += time.perf_counter() - began

    run_eval(0)
    for step, rows in enumerate(steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = hp.lr * hp.lr_factor(step, len(steps))
        denominator = sum(ex.num_targets for ex in rows)
        step_loss = sum(
            micro_step(student, teacher, group, loss, denominator, hp, logit_chunk)
            for group in micro_batches(rows, hp.micro_batch_tokens)
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), hp.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record.tokens += denominator
        record.train_seconds += time.perf_counter() - began
        record.steps.append({"step": step + 1, "tokens": record.tokens, "loss": step_loss,
                             "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"]})
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"{loss} arm: loss is {step_loss} at step {step + 1}")
        if step + 1 in checkpoints:
            run_eval(record.tokens)
            log(f"  [{loss}] step {step + 1}/{len(steps)} tokens {record.tokens:,} loss {step_loss:.4f}"
                f" curve {record.curve[-1] if record.curve else ''} ({record.train_seconds:.0f}s train)")
    student.eval().requires_grad_(False)
    if out_dir is not None:
        out_dir = Path(out_dir)
        student.save_pretrained(out_dir)
        (out_dir / "train_log.json").write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return student, record
