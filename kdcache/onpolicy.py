"""``kdcache onpolicy``: rounds of on-policy distillation on one machine, teacher never beside the student.

Round ``r`` (0-based) of ``--rounds R``, in ``WORK/round-<r>/``:

1. **rollout**: student_r samples responses to the prompts
   (``kdcache rollout --config FILE --student S_r --output WORK/round-r/rollout --round r --seed SEED+r``);
2. **score**: the teacher scores the samples
   (``kdcache generate-teacher --config FILE --dataset WORK/round-r/rollout --output WORK/round-r/cache``);
3. **train**: student_r learns from them, optionally mixed with a fixed cache (the ``student:``
   section's ``mix-cache``/``lmbda``), giving student_{r+1} = ``WORK/round-r/train/model``
   (``kdcache train-student --config FILE --student S_r --cache WORK/round-r/cache --output WORK/round-r/train --resume``).

student_0 is the ``student:`` section's ``student``. Every step is exactly the command above,
run in its own process (``--dry-run`` prints them all): the process exits when the step is done,
so each model's memory (vLLM's included) is freed before the next loads, and separate inference
and training machines reach the same result by running the same commands. The ``rollout:``,
``teacher:`` and ``student:`` sections of FILE hold every other option; kdcache onpolicy sets only
the paths, the round, and the rollout seed (``SEED + r``, so each round draws fresh samples;
``SEED`` is the ``rollout:`` section's ``seed``, default 0). A ``{round}`` in the ``rollout:``
section's ``dataset`` takes the round number (prompts per round).

Resume. A step is finished when its output says so (``rollout.json``, ``manifest.json``,
``COMPLETE``: each written last by its command); finished steps are never run again, and an
unfinished one is rerun with the same command, which continues it (finished rollout and
cache shards are kept, train-student resumes from its last checkpoint). So after a ``kill -9``
the same ``kdcache onpolicy`` command continues where it stopped. ``WORK/round-<r>/state.json``
records each step's command, start and end; ``WORK/onpolicy.json`` the pipeline's settings
(another pipeline in the same work directory is refused). Children are killed with the
``kdcache onpolicy`` process (Linux: ``PR_SET_PDEATHSIG``).

The ``onpolicy:`` section holds ``work-dir`` (or ``--work-dir``) and ``train-launcher``, a command
prefix for the train step, e.g. ``torchrun --nproc_per_node 8`` (the step then runs
``<launcher> -m kdcache train-student ...``).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdcache.cache.manifest import write_json_atomic
from kdcache.config import changed_keys, command_section, load_section
from kdcache.errors import KdcacheError

#: Keys of the ``onpolicy:`` section.
ONPOLICY_KEYS = ("work_dir", "train_launcher")
#: Options kdcache onpolicy sets for every round; the sections must leave them out.
PER_ROUND = {"rollout": ("student", "output", "round"), "teacher": ("dataset", "output"),
             "student": ("cache", "output", "resume", "overwrite")}
#: What each section must give.
REQUIRED = {"rollout": ("dataset",), "teacher": ("teacher",), "student": ("student",)}
STEPS = ("rollout", "score", "train")
STATE_FILE = "state.json"
RUN_FILE = "onpolicy.json"


@dataclass(frozen=True)
class Step:
    """One step of one round: the command that runs it and the file that says it finished."""

    round: int
    name: str  # rollout, score or train
    argv: list[str]
    done_marker: Path

    @property
    def done(self) -> bool:
        return self.done_marker.exists()

    def command_line(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Pipeline:
    """A checked on-policy pipeline file."""

    path: Path
    sections: dict[str, dict]  # rollout / teacher / student, keyed by the commands' parameter names
    work_dir: Path
    train_launcher: list[str]

    @property
    def student_0(self) -> str:
        return str(self.sections["student"]["student"])

    def round_dir(self, r: int) -> Path:
        return self.work_dir / f"round-{r}"

    def student(self, r: int) -> str:
        """student_r: the pipeline's student for r = 0, else round r-1's trained model."""
        return self.student_0 if r == 0 else str(self.round_dir(r - 1) / "train" / "model")

    def steps(self, r: int) -> list[Step]:
        """The three steps of round ``r``."""
        base = [sys.executable, "-m", "kdcache"]
        config = ["--config", str(self.path)]
        d = self.round_dir(r)
        rollout = self.sections["rollout"]
        seed = int(rollout.get("seed") or 0) + r
        dataset = str(rollout["dataset"]).replace("{round}", str(r))
        launcher = [*self.train_launcher, "-m", "kdcache"] if self.train_launcher else base
        return [
            Step(r, "rollout", [*base, "rollout", *config, "--student", self.student(r), "--dataset", dataset,
                                "--output", str(d / "rollout"), "--round", str(r), "--seed", str(seed)],
                 d / "rollout" / "rollout.json"),
            Step(r, "score", [*base, "generate-teacher", *config, "--dataset", str(d / "rollout"),
                              "--output", str(d / "cache")], d / "cache" / "manifest.json"),
            Step(r, "train", [*launcher, "train-student", *config, "--student", self.student(r),
                              "--cache", str(d / "cache"), "--output", str(d / "train"), "--resume"],
                 d / "train" / "COMPLETE"),
        ]


def load_pipeline(path: str | Path, work_dir: str | Path | None = None) -> Pipeline:
    """Read and check an on-policy pipeline file (see the module docstring).

    Raises:
        KdcacheError: an unknown key in any section, a missing required one, one that
            kdcache onpolicy sets per round, or no work directory (one line each).
    """
    from kdcache.cli.generate_cmd import generate_teacher
    from kdcache.cli.rollout_cmd import rollout
    from kdcache.cli.train_cmds import train_student

    path = Path(path).resolve()
    sections = {name: command_section(path, command)
                for name, command in (("rollout", rollout), ("teacher", generate_teacher), ("student", train_student))}
    own = load_section(path, "onpolicy")
    unknown = sorted(set(own) - set(ONPOLICY_KEYS))
    if unknown:
        raise KdcacheError(f"{path}: section 'onpolicy' has keys kdcache onpolicy does not take: {', '.join(unknown)} "
                           f"(it takes {', '.join(k.replace('_', '-') for k in ONPOLICY_KEYS)})")
    for name, keys in REQUIRED.items():
        missing = [k for k in keys if sections[name].get(k) is None]
        if missing:
            raise KdcacheError(f"{path}: section '{name}' needs {', '.join(missing)}")
    for name, keys in PER_ROUND.items():
        given = [k for k in keys if k in sections[name]]
        if given:
            raise KdcacheError(f"{path}: section '{name}' sets {', '.join(given)}, which kdcache onpolicy sets for "
                               "every round; remove it (run the steps alone to choose them yourself)")
    chosen = work_dir or own.get("work_dir")
    if not chosen:
        raise KdcacheError(f"{path}: no work directory; pass --work-dir or set work-dir in the 'onpolicy' section")
    launcher = own.get("train_launcher") or ""
    launcher = shlex.split(launcher) if isinstance(launcher, str) else [str(x) for x in launcher]
    return Pipeline(path, sections, Path(chosen).expanduser().resolve(), launcher)


def claim_work_dir(pipeline: Pipeline) -> None:
    """Record the pipeline's settings in ``onpolicy.json``, or refuse a work directory that holds
    rounds of another pipeline (their students would be mixed into this one's)."""
    settings = {"sections": pipeline.sections, "train_launcher": pipeline.train_launcher}
    run_path = pipeline.work_dir / RUN_FILE
    if run_path.exists():
        existing = json.loads(run_path.read_text())
        if existing.get("settings") != json.loads(json.dumps(settings)):
            old, new = existing.get("settings", {}).get("sections", {}), settings["sections"]
            diffs = [f"{name}.{key}" for name in sorted(set(old) | set(new))
                     for key in changed_keys(old.get(name, {}), new.get(name, {}))]
            if existing.get("settings", {}).get("train_launcher") != pipeline.train_launcher:
                diffs.append("onpolicy.train-launcher")
            raise KdcacheError(f"{pipeline.work_dir}: holds rounds of a pipeline with other settings "
                               f"({', '.join(diffs)} differ); use another --work-dir or the original settings")
        return
    pipeline.work_dir.mkdir(parents=True, exist_ok=True)
    if any(p for p in pipeline.work_dir.iterdir() if not p.name.startswith(".")):
        raise KdcacheError(f"{pipeline.work_dir}: directory is not empty and holds no kdcache onpolicy run; "
                           "choose an empty --work-dir")
    write_json_atomic(run_path, {"kind": "kdcache-onpolicy", "config": str(pipeline.path), "settings": settings})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _record(step: Step, pipeline: Pipeline, **fields) -> None:
    """Update the step's entry in its round's ``state.json``."""
    path = pipeline.round_dir(step.round) / STATE_FILE
    state = json.loads(path.read_text()) if path.exists() else {"round": step.round, "student": pipeline.student(step.round),
                                                                "steps": {}}
    entry = state["steps"].setdefault(step.name, {})
    entry.update(command=step.command_line(), **fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, state)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when kdcache onpolicy dies (also by kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def run_step(step: Step, pipeline: Pipeline, echo: Callable[[str], None]) -> None:
    """Run one step's command in its own process (output passed through) and record it.

    Raises:
        KdcacheError: the command failed, or ended without finishing its output.
    """
    echo(f"[round {step.round}] {step.name}: {step.command_line()}")
    began = time.perf_counter()
    _record(step, pipeline, started_at=_now(), finished_at=None)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    process = subprocess.Popen(step.argv, preexec_fn=preexec)
    try:
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    if code != 0:
        raise KdcacheError(f"round {step.round} {step.name} failed (exit status {code}; its own message is above); "
                           "fix the cause and rerun the same kdcache onpolicy command to continue from there")
    if not step.done:
        raise KdcacheError(f"round {step.round} {step.name}: the command ended without {step.done_marker} (another "
                           "worker may still be running on that output); rerun the same command when it is done")
    seconds = time.perf_counter() - began
    _record(step, pipeline, finished_at=_now(), seconds=round(seconds, 1))
    echo(f"[round {step.round}] {step.name}: done in {seconds:.0f}s")


def run_onpolicy(config: str | Path, rounds: int, *, work_dir: str | Path | None = None, dry_run: bool = False,
                 echo: Callable[[str], None] = print) -> dict:
    """Run (or with ``dry_run`` only print) rounds ``0 .. rounds-1`` of the pipeline in ``config``.

    Returns ``{"work_dir", "rounds", "student", "ran", "skipped"}``: the final student's
    directory and the steps run and skipped (already finished) by this call.

    Raises:
        KdcacheError: a bad pipeline file or work directory, or a step that failed.
    """
    if rounds < 1:
        raise KdcacheError(f"--rounds must be >= 1, got {rounds}")
    pipeline = load_pipeline(config, work_dir)
    steps = [step for r in range(rounds) for step in pipeline.steps(r)]
    if dry_run:
        for step in steps:
            echo(step.command_line())
        return {"work_dir": str(pipeline.work_dir), "rounds": rounds, "student": pipeline.student(rounds), "ran": [],
                "skipped": []}
    claim_work_dir(pipeline)
    ran, skipped = [], []
    for step in steps:
        if step.done:
            skipped.append(f"{step.round}:{step.name}")
            continue
        run_step(step, pipeline, echo)
        ran.append(f"{step.round}:{step.name}")
    return {"work_dir": str(pipeline.work_dir), "rounds": rounds, "student": pipeline.student(rounds), "ran": ran,
            "skipped": skipped}
