"""Stage two: train a student against a teacher cache (`train_student`) and score models on
a cache (`evaluate_model`).

`apply_lean_layers` swaps memory-lean RMSNorm/SwiGLU forwards into any transformers model.

Imports are lazy so that `kdcache.student.losses` / `.chunked` / `.lean` (plain torch) stay usable
without the cache stack (pyarrow, zstandard) installed.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainConfig": "kdcache.student.train",
    "train_student": "kdcache.student.train",
    "evaluate": "kdcache.student.evaluate",
    "evaluate_model": "kdcache.student.evaluate",
    "apply_lean_layers": "kdcache.student.lean",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdcache.student' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
