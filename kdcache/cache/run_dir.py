"""The resumable, sharded output directory shared by ``generate-teacher`` and ``kdcache rollout``.

Both jobs fill a directory (or object-store prefix, :mod:`kdcache.cache.storage`) with shards
of ``shard_size`` input rows: a settings file claims the directory, a create-once file pins
what produced the shards (scorer or sampling engine) so that no two workers mix theirs, and
each shard counts once its record exists. These are the pieces both use.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Callable, Iterator

from kdcache import __version__
from kdcache.cache.storage import Store
from kdcache.config import changed_keys
from kdcache.errors import KdcacheError


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def claim_directory(
    out: Store, settings: dict, *, run_name: str, own: set[str], stale: tuple[str, ...],
    has_finished_work: Callable[[Store], bool], what: str,
) -> str:
    """Record the job's settings in ``run_name``, or refuse a directory made with other settings.

    Returns the settings' hash (what :func:`check_claim` compares with).

    A directory holding anything but ``own`` files and no ``run_name`` is refused (not ours). A
    job that stopped before finishing any shard (a bad row, a wrong flag) holds nothing to keep:
    its directory is claimed afresh with the new settings, ``stale`` entries deleted. A worker of
    the old settings still running there stops before recording a shard (:func:`check_claim`).
    """
    out.prepare()
    payload = {"settings_hash": settings_hash(settings), "settings": settings, "tool_version": __version__}
    if not out.exists(run_name):
        # The own files may appear from a worker that started at the same moment.
        if any(name for name in out.list() if not name.startswith(".") and name not in own | {run_name}):
            raise KdcacheError(f"{out.where()}: directory is not empty and holds no kdcache {what}; "
                               "choose an empty --output")
        out.create_json_once(run_name, payload)
    existing = out.read_json(run_name)
    if existing.get("settings_hash") == payload["settings_hash"]:
        return payload["settings_hash"]
    diffs = ", ".join(changed_keys(existing.get("settings", {}), settings))
    if has_finished_work(out):
        raise KdcacheError(f"{out.where()}: holds a {what} made with different settings ({diffs} differ); use a new "
                           "--output directory or rerun with the original settings")
    print(f"kdcache: {out.where()} held an unfinished {what} with other settings ({diffs} differ) and no finished "
          "shard; starting over with these settings", file=sys.stderr)
    for name in stale:
        out.delete(name)
    out.write_json(run_name, payload)
    return payload["settings_hash"]


def check_claim(out: Store, run_name: str, settings_hash_: str, what: str) -> None:
    """Stop before recording a shard if another job with other settings took over the directory."""
    if out.read_json(run_name).get("settings_hash") != settings_hash_:
        raise KdcacheError(f"{out.where()}: another {what} with other settings took over this directory; this run "
                           "stops (its shards would mix with theirs)")


def claim_uniform(out: Store, name: str, payload: dict, mismatch: Callable[[dict, dict], str]) -> None:
    """Every shard comes from one producer: the first worker records ``payload`` in ``name``
    (create-once); a worker whose payload differs stops with ``mismatch(existing, payload)``."""
    out.create_json_once(name, payload)
    check_uniform(out, name, payload, mismatch)


def check_uniform(out: Store, name: str, payload: dict, mismatch: Callable[[dict, dict], str]) -> None:
    existing = out.read_json(name)
    if existing != payload:
        raise KdcacheError(f"{out.where()}: {mismatch(existing, payload)}")


def shards_of_rows(rows: Iterator[tuple[int, str, object]], shard_size: int) -> Iterator[tuple[int, list]]:
    """Group ``(seq_id, source, row)`` into ``(shard_index, rows)`` by ``seq_id // shard_size``."""
    current, bucket = -1, []
    for item in rows:
        index = item[0] // shard_size
        if index != current and bucket:
            yield current, bucket
            bucket = []
        current = index
        bucket.append(item)
    if bucket:
        yield current, bucket
