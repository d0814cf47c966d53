"""Depth pruning: a student made of some of the teacher's own decoder layers (prune, then distill).

The student keeps the teacher's embedding, final norm and LM head, and ``n`` of its decoder
layers copied unchanged: the first and the last, and the rest evenly spaced between them,
``round(i * (L - 1) / (n - 1))`` for ``i = 0 .. n-1``. For SmolLM2-135M (``L = 30``) and
``n = 10`` that is layers 0, 3, 6, 10, 13, 16, 19, 23, 26, 29. Keeping the first layer (which
maps embeddings into the residual stream's working basis) and the last (which shapes it for the
LM head) leaves the cut model far better than a contiguous block does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

INIT_INFO = "kdcache_student_init.json"


def choose_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """First and last layer plus evenly spaced ones between: ``round(i * (L-1) / (n-1))``."""
    L, n = num_teacher_layers, num_student_layers
    if not 1 <= n <= L:
        raise ValueError(f"student layers must be in [1, {L}], got {n}")
    if n == 1:
        return [L - 1]
    return [int(round(i * (L - 1) / (n - 1))) for i in range(n)]


def build_pruned_student(teacher_path: str | Path, out_dir: str | Path, num_layers: int,
                         layers: Sequence[int] | None = None) -> Path:
    """Save the pruned student (float32 HF directory with the teacher's tokenizer) to ``out_dir``.

    Skips the work if ``out_dir`` already holds a student made from the same teacher layers.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher_path, out_dir = Path(teacher_path), Path(out_dir)
    config = AutoConfig.from_pretrained(teacher_path)
    layers = list(layers) if layers is not None else choose_layers(config.num_hidden_layers, num_layers)
    info = {"teacher": str(teacher_path), "teacher_layers": config.num_hidden_layers, "layers": layers}
    if (out_dir / INIT_INFO).exists() and json.loads((out_dir / INIT_INFO).read_text()) == info:
        return out_dir
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    source = teacher.state_dict()
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.dtype = "float32"  # the teacher's (bf16) values, exactly upcast
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    mapped = {}
    for key in student.state_dict():
        src = key
        if key.startswith("model.layers."):
            j = key.split(".")[2]
            head = f"model.layers.{j}."
            src = f"model.layers.{layers[int(j)]}." + key[len(head):]
        mapped[key] = source[src]
    student.load_state_dict(mapped, strict=True)
    if config.tie_word_embeddings:
        student.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher_path).save_pretrained(tmp)
    (tmp / INIT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
