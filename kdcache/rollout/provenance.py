"""Which student and round produced a rollout, and the check that stops training on a mix of rounds.

A rollout's ``rollout.json`` names the student by content (``weights_sha256``: the hash of
its weight files, and of the adapter's for base + adapter) and by the ``round`` label the
caller gives (``kdcache rollout --round R``). ``generate-teacher`` copies that into the
cache manifest as ``dataset.rollout`` (:func:`provenance`), so the cache says whose samples
it scored. The on-policy losses weight each token by ``q_theta(x) / mu(x)`` with ``mu`` the
sampling policy stored per token; samples of several policies in one run are legal for the
estimator but usually a mistake (a stale round fed again, two directories mixed up), so
``train-student`` refuses them unless told (proposed flag: ``--allow-mixed-rounds``), through
:func:`check_rollout_rounds`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from kdcache.errors import KdcacheError

#: Weight files that define a checkpoint's parameters.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ALLOW_FLAG = "--allow-mixed-rounds"


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the names and sha256s of a model (or adapter) directory's weight files,
    sorted by name; the same weights copied elsewhere give the same hash.

    Raises:
        KdcacheError: the directory holds no weight file.
    """
    from kdcache.cache.writer import file_sha256

    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise KdcacheError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to identify the model by")
    digest = hashlib.sha256(b"kdcache-weights-v1\0")
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode() + b"\0")
    return digest.hexdigest()


def provenance(rollout_manifest: dict) -> dict:
    """What a cache of these rows records about them (``manifest.dataset.rollout``).

    Returns ``{"round", "student", "engine", "sampling", "settings_hash", "prompts"}``:
    ``student`` holds ``spec``, ``weights_sha256``, ``config_sha256`` and ``adapter``;
    ``prompts`` the prompt dataset's ``source`` and ``fingerprint``.
    """
    m = rollout_manifest
    return {
        "round": int(m["round"]),
        "student": {k: m["student"].get(k) for k in ("spec", "weights_sha256", "config_sha256", "adapter")},
        "engine": dict(m["engine"]),
        "sampling": dict(m["sampling"]),
        "settings_hash": m["settings_hash"],
        "prompts": {k: m["prompts"].get(k) for k in ("source", "fingerprint")},
    }


def cache_rollout(manifest: dict) -> dict | None:
    """The rollout a cache scored (``manifest.dataset.rollout``), or None for fixed data."""
    return (manifest.get("dataset") or {}).get("rollout")


def _policy(rollout: dict) -> tuple[int, str]:
    return int(rollout["round"]), str(rollout["student"]["weights_sha256"])


def check_rollout_rounds(caches: Sequence[tuple[str | Path, dict]], allow_mixed_rounds: bool = False) -> dict | None:
    """Refuse to train on samples of more than one (round, student) unless allowed.

    Args:
        caches: ``(cache directory, manifest)`` of every cache one training run reads
            (training and evaluation caches alike); caches of fixed data are ignored.
        allow_mixed_rounds: the user's ``--allow-mixed-rounds``.

    Returns:
        The provenance shared by the rollout caches (:func:`cache_rollout`), or None when no
        cache is a rollout or, with ``allow_mixed_rounds``, they differ.

    Raises:
        KdcacheError: two caches hold samples of different rounds or students (the message
            names both caches and the flag).
    """
    first: tuple[str | Path, dict] | None = None
    for path, manifest in caches:
        rollout = cache_rollout(manifest)
        if rollout is None:
            continue
        if first is None:
            first = (path, rollout)
            continue
        if _policy(rollout) != _policy(first[1]):
            if allow_mixed_rounds:
                return None
            (r0, s0), (r1, s1) = _policy(first[1]), _policy(rollout)
            what = f"round {r0} vs round {r1}" if r0 != r1 else f"round {r0} of students {s0[:12]}... vs {s1[:12]}..."
            raise KdcacheError(f"{first[0]} and {path} hold samples of different policies ({what}); train on one round's "
                               f"rollout, or pass {ALLOW_FLAG} to mix them on purpose")
    return None if first is None else first[1]


def rollout_student_warning(manifest: dict, cache_dir: str | Path, student_weights_sha256: str) -> str | None:
    """A warning when the student about to train is not the one that sampled the cache's
    rollout: the importance weights ``q_theta / mu`` then start far from 1 and clip often."""
    rollout = cache_rollout(manifest)
    if rollout is None or rollout["student"]["weights_sha256"] == student_weights_sha256:
        return None
    return (f"{cache_dir} holds samples of round {rollout['round']} from student {rollout['student']['spec']} "
            f"(weights {rollout['student']['weights_sha256'][:12]}...), not of the student being trained; on-policy "
            "losses will treat them as off-policy samples")
