"""Loss curves of a training run as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train records, eval records)`` from a ``metrics.jsonl``."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        (evals if record.get("type") == "eval" else train).append(record)
    return train, evals


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Draw train loss / KD / CE and the eval metrics against the optimizer step.

    Left panel: training ``loss`` (the objective), ``kd`` and ``ce`` per step. Right panel:
    eval ``kl``, ``ce`` and ``loss`` (whatever the run logged). Returns ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    steps = [r["step"] for r in train]
    for key, style in (("loss", "-"), ("kd", "--"), ("ce", ":")):
        values = [r.get(key) for r in train]
        if steps and all(v is not None and v == v for v in values):
            left.plot(steps, values, style, label=f"train {key}")
    left.set_xlabel("step")
    left.set_ylabel("nats / supervised token")
    left.set_title("training")
    if left.lines:
        left.legend()
    eval_steps = [r["step"] for r in evals]
    for key, style in (("eval_loss", "-o"), ("eval_kl", "--o"), ("eval_ce", ":o")):
        values = [r.get(key) for r in evals]
        if eval_steps and all(v is not None for v in values):
            right.plot(eval_steps, values, style, label=key.replace("_", " "))
    right.set_xlabel("step")
    right.set_title("evaluation" if evals else "evaluation (no --eval-cache)")
    if right.lines:
        right.legend()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
