"""Which stage-one worker this process is: from ``--num-workers/--worker-index``, or from the
launcher that started it.

Launchers and their variables:

- SLURM array job (``sbatch --array``): ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``.
  Task ids need not start at 0 (``--array=1-8``) nor be consecutive (``--array=0-15:4``): the
  position is ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``. An
  array whose ids are not evenly spaced (``--array=1,2,7``) is refused: pass the flags.
- ``srun`` step: ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` (the step's tasks: an ``sbatch``
  script that runs kdcache directly is one process even with ``--ntasks 8``, so
  ``SLURM_NTASKS`` is not read; stage two's launcher detection reads the same variables).
- ``torchrun`` (and other ``torch.distributed`` launchers): ``RANK`` / ``WORLD_SIZE``.

``torchrun``'s ``RANK`` already counts across the nodes it spans (one ``srun`` task per node),
so it replaces the ``srun`` pair when both are set. An array job whose tasks each start several
processes (an ``srun`` step or ``torchrun`` per task) gives ``count x tasks`` workers, task
``position`` taking indices ``position x tasks + rank``. A launcher that starts one process
(``SLURM_STEP_NUM_TASKS=1``, ``WORLD_SIZE=1``) says nothing about splitting and is ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class WorkerSlot:
    """``worker_index`` of ``num_workers``, and where that came from (one line for the log)."""

    num_workers: int
    worker_index: int
    source: str


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name, "")
    if value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise KdcacheError(f"environment variable {name}={value!r} is not an integer; fix the launcher or pass "
                           "--num-workers and --worker-index") from None


def _array_position(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """``(position, count, description)`` of a SLURM array task, or None outside an array job."""
    task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        return None
    low = _int(env, "SLURM_ARRAY_TASK_MIN", 0)
    step = _int(env, "SLURM_ARRAY_TASK_STEP", 1)
    high = _int(env, "SLURM_ARRAY_TASK_MAX", low + (count - 1) * step)
    offset = task - low
    if count < 1 or step < 1 or offset < 0 or offset % step or offset // step >= count or high != low + (count - 1) * step:
        raise KdcacheError(
            f"SLURM array task {task} (min {low}, max {high}, step {step}, count {count}): the array's task ids are not "
            f"evenly spaced, so the worker index is ambiguous; pass --num-workers {count} and --worker-index explicitly"
        )
    where = f"SLURM_ARRAY_TASK_ID={task} of SLURM_ARRAY_TASK_COUNT={count}"
    if low or step != 1:
        where += f" (ids from {low} in steps of {step})"
    return offset // step, count, where


def _process_rank(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """``(rank, size, description)`` from torchrun, else an srun step; None if neither is set."""
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        rank, size = _int(env, rank_name), _int(env, size_name)
        if rank is None or size is None:
            continue
        if not 0 <= rank < size:
            raise KdcacheError(f"{rank_name}={rank} is outside [0, {size_name}={size}); fix the launcher or pass "
                               "--num-workers and --worker-index")
        return rank, size, f"{rank_name}={rank} of {size_name}={size}"
    return None


def launcher_slot(env: Mapping[str, str] | None = None) -> WorkerSlot | None:
    """The worker slot the launcher's environment gives, or None when it gives no split."""
    env = os.environ if env is None else env
    parts = [p for p in (_array_position(env), _process_rank(env)) if p is not None and p[1] > 1]
    if not parts:
        return None
    index, count = 0, 1
    for position, size, _ in parts:
        index, count = index * size + position, count * size
    return WorkerSlot(count, index, " x ".join(where for _, _, where in parts))


def resolve_workers(num_workers: int | None, worker_index: int | None,
                    env: Mapping[str, str] | None = None) -> WorkerSlot:
    """This process's worker slot from the flags (None = not given) and the launcher.

    Flags alone: as given (``--worker-index`` defaults to 0, ``--num-workers`` to 1). The
    launcher alone: its slot. Both: the flags must agree with the launcher.

    Raises:
        KdcacheError: flags that contradict the launcher, or unusable launcher variables.
    """
    slot = launcher_slot(env)
    if slot is None:
        workers = 1 if num_workers is None else num_workers
        return WorkerSlot(workers, 0 if worker_index is None else worker_index, "--num-workers/--worker-index")
    given = {"--num-workers": num_workers, "--worker-index": worker_index}
    launched = {"--num-workers": slot.num_workers, "--worker-index": slot.worker_index}
    conflicts = [f"{flag} {value}" for flag, value in given.items() if value is not None and value != launched[flag]]
    if conflicts:
        raise KdcacheError(
            f"{' '.join(conflicts)} conflicts with the launcher ({slot.source}: worker {slot.worker_index} of "
            f"{slot.num_workers}); drop the flag to use the launcher's, or make them agree"
        )
    return WorkerSlot(slot.num_workers, slot.worker_index, slot.source)
