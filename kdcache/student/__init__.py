"""Stage two: train a student against a teacher cache (`train_student`) and score models on
a cache (`evaluate_model`).

Imports are lazy so that `kdcache.student.losses` / `.chunked` (plain torch) stay usable
without the cache stack (pyarrow, zstandard) installed.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainConfig": "kdcache.student.train",
    "train_student": "kdcache.student.train",
    "evaluate": "kdcache.student.evaluate",
    "evaluate_model": "kdcache.student.evaluate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdcache.student' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
