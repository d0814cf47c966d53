"""Stage-one worker slots from the launcher's environment (SLURM array, srun, torchrun) and
from the flags; a conflict between the two is refused in one line."""

from __future__ import annotations

import pytest

from kdcache.errors import KdcacheError
from kdcache.teacher.launcher import resolve_workers


def test_no_launcher_and_no_flags_is_one_worker():
    slot = resolve_workers(None, None, env={})
    assert (slot.num_workers, slot.worker_index) == (1, 0)
    assert (resolve_workers(3, None, env={}).num_workers, resolve_workers(3, 2, env={}).worker_index) == (3, 2)


def test_slurm_array_job_with_ids_from_an_offset():
    """`sbatch --array=1-8`: task ids 1..8 are workers 0..7."""
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "8", "SLURM_JOB_ID": "77"}
    slot = resolve_workers(None, None, env=env)
    assert (slot.num_workers, slot.worker_index) == (8, 2)
    assert "SLURM_ARRAY_TASK_ID=3" in slot.source and "SLURM_ARRAY_TASK_COUNT=8" in slot.source
    # with a step: --array=0-15:4 gives ids 0, 4, 8, 12
    stepped = {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_MAX": "12", "SLURM_ARRAY_TASK_STEP": "4"}
    assert (resolve_workers(None, None, env=stepped).num_workers, resolve_workers(None, None, env=stepped).worker_index) == (4, 2)


def test_slurm_array_with_uneven_ids_is_refused():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "7"}  # --array=1,2,7
    with pytest.raises(KdcacheError, match="not evenly spaced.*pass --num-workers 3 and --worker-index") as info:
        resolve_workers(None, None, env=env)
    assert "\n" not in str(info.value)


def test_srun_step():
    slot = resolve_workers(None, None, env={"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_JOB_ID": "9"})
    assert (slot.num_workers, slot.worker_index) == (6, 5) and slot.source == "SLURM_PROCID=5 of SLURM_STEP_NUM_TASKS=6"
    # an sbatch script (--ntasks 8) running kdcache itself is one process: no split
    assert resolve_workers(None, None, env={"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).num_workers == 1


def test_torchrun():
    slot = resolve_workers(None, None, env={"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (slot.num_workers, slot.worker_index) == (4, 1) and slot.source == "RANK=1 of WORLD_SIZE=4"
    # torchrun's ranks span the srun tasks it runs in (one per node): RANK wins
    nested = {"RANK": "5", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    assert resolve_workers(None, None, env=nested).worker_index == 5


def test_array_tasks_that_each_start_several_processes():
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    slot = resolve_workers(None, None, env=env)
    assert (slot.num_workers, slot.worker_index) == (6, 5)


def test_a_single_process_launch_is_not_a_split():
    """An sbatch job runs its script as task 0 of 1: explicit flags must still work there."""
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "RANK": "0", "WORLD_SIZE": "1"}
    slot = resolve_workers(4, 2, env=env)
    assert (slot.num_workers, slot.worker_index) == (4, 2)


def test_flags_that_agree_with_the_launcher_are_fine_and_conflicts_are_refused():
    env = {"RANK": "1", "WORLD_SIZE": "4"}
    assert resolve_workers(4, 1, env=env).worker_index == 1
    assert resolve_workers(4, None, env=env).worker_index == 1
    with pytest.raises(KdcacheError) as info:
        resolve_workers(2, 0, env=env)
    message = str(info.value)
    assert "\n" not in message and "--num-workers 2 --worker-index 0 conflicts with the launcher" in message
    assert "RANK=1 of WORLD_SIZE=4" in message
    with pytest.raises(KdcacheError, match="--worker-index 3 conflicts"):
        resolve_workers(None, 3, env={"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})


def test_unusable_launcher_variables_are_named():
    with pytest.raises(KdcacheError, match="SLURM_PROCID='x' is not an integer"):
        resolve_workers(None, None, env={"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "2"})
    with pytest.raises(KdcacheError, match=r"RANK=4 is outside \[0, WORLD_SIZE=4\)"):
        resolve_workers(None, None, env={"RANK": "4", "WORLD_SIZE": "4"})


def test_generate_teacher_cli_refuses_a_conflict_before_writing(tmp_path):
    """The CLI's flags default to "not given"; a conflict stops it before anything is written."""
    from tests.test_generate import _run_cli

    out = tmp_path / "c"
    result = _run_cli("generate-teacher", "--teacher", "unused", "--dataset", "unused.jsonl", "--output", str(out),
                      "--num-workers", "2", env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--num-workers 2 conflicts with the launcher" in lines[0]
    assert not out.exists()
