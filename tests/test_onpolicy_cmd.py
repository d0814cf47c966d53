"""`kdcache onpolicy`: the pipeline file is checked in one line, each round's steps are the
commands --dry-run prints, and a run killed with SIGKILL continues where it stopped (finished
steps untouched, its children gone) to the result of the same steps run alone.

The end-to-end test runs real processes on tiny models: the student samples with the
transformers engine, the tiny teacher scores, train-student trains sampled_rkl on the rollout
mixed with a fixed cache.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdcache.errors import KdcacheError
from tests.test_onpolicy_train import chat_prompts
from tests.test_train import _weights, student_dir, train_cache  # noqa: F401 - shared fixtures

REPO = Path(__file__).resolve().parents[1]


def write_pipeline(path: Path, *, student: Path, teacher: Path, prompts: Path, work: Path | None = None,
                   mix_cache: Path | None = None, extra: dict | None = None) -> Path:
    """A pipeline YAML for the tiny models (transformers engines, float32, CPU)."""
    import yaml

    data = {
        "name": "tiny-onpolicy",
        "rollout": {"dataset": str(prompts), "backend": "hf", "samples-per-prompt": 2, "max-new-tokens": 10,
                    "max-length": 128, "shard-size": 3, "dtype": "float32", "seed": 5, "progress": False},
        "teacher": {"teacher": str(teacher), "backend": "hf", "top-k": 4, "sampling": "none", "max-length": 128,
                    "dtype": "float32", "progress": False},
        "student": {"student": str(student), "loss": "sampled_rkl", "global-batch-size": 4, "micro-batch-tokens": 256,
                    "lr": 3.0e-3, "warmup-ratio": 0.0, "device": "cpu", "save-every": 1, "seed": 3,
                    "progress": False},
    }
    if mix_cache is not None:
        data["student"].update({"mix-cache": str(mix_cache), "lmbda": 0.5, "mix-loss": "tail"})
    if work is not None:
        data["onpolicy"] = {"work-dir": str(work)}
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def kdcache(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True, env=_env(), **kw)


# ------------------------------------------------------------------------ fast: the file


def test_dry_run_prints_the_commands_of_every_round(tmp_path):
    cfg = write_pipeline(tmp_path / "op.yaml", student=tmp_path / "s0", teacher=tmp_path / "t",
                         prompts=tmp_path / "prompts-{round}.jsonl", work=tmp_path / "w",
                         extra={"onpolicy": {"train-launcher": "torchrun --standalone --nproc_per_node 2"}})
    result = kdcache("onpolicy", "--config", str(cfg), "--rounds", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert [line[3] if line[0] == sys.executable else line[6] for line in lines] == [
        "rollout", "generate-teacher", "train-student"] * 2
    w = tmp_path / "w"
    for r, (rollout, score, train) in enumerate(zip(lines[0::3], lines[1::3], lines[2::3])):
        student = str(tmp_path / "s0") if r == 0 else str(w / f"round-{r - 1}" / "train" / "model")

        def opt(argv: list[str], flag: str) -> str:
            return argv[argv.index(flag) + 1]

        assert opt(rollout, "--config") == opt(score, "--config") == opt(train, "--config") == str(cfg)
        assert opt(rollout, "--student") == opt(train, "--student") == student
        assert opt(rollout, "--dataset") == str(tmp_path / f"prompts-{r}.jsonl")
        assert opt(rollout, "--round") == str(r) and opt(rollout, "--seed") == str(5 + r)
        assert opt(rollout, "--output") == opt(score, "--dataset") == str(w / f"round-{r}" / "rollout")
        assert opt(score, "--output") == opt(train, "--cache") == str(w / f"round-{r}" / "cache")
        assert opt(train, "--output") == str(w / f"round-{r}" / "train") and "--resume" in train
        assert train[:6] == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "kdcache"]
    assert not w.exists()  # a dry run writes nothing


@pytest.mark.parametrize("change, message", [
    ({"rollout": {"temprature": 0.7}}, "section 'rollout' has options that `kdcache rollout` does not take: temprature"),
    ({"student": {"lmbda_": 0.5}}, "section 'student' has options that `kdcache train-student` does not take: lmbda_"),
    ({"onpolicy": {"rounds": 3}}, "section 'onpolicy' has keys kdcache onpolicy does not take: rounds"),
    ({"teacher": {"dataset": "x.jsonl"}}, "section 'teacher' sets dataset, which kdcache onpolicy sets for every round"),
    ({"student": {"cache": "c"}}, "section 'student' sets cache, which kdcache onpolicy sets"),
    ({"rollout": {"student": "s"}}, "section 'rollout' sets student, which kdcache onpolicy sets"),
    ({"teacher": {"teacher": None}}, "section 'teacher' needs teacher"),
    ({"onpolicy": {"work-dir": None}}, "no work directory; pass --work-dir or set work-dir"),
])
def test_a_bad_pipeline_file_is_one_line(tmp_path, capsys, change, message):
    from kdcache.cli import main

    cfg = write_pipeline(tmp_path / "op.yaml", student=tmp_path / "s0", teacher=tmp_path / "t",
                         prompts=tmp_path / "p.jsonl", work=tmp_path / "w", extra=change)
    with pytest.raises(SystemExit) as exit_info:
        main(["onpolicy", "--config", str(cfg), "--rounds", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("kdcache: error: ") and message in err, err
    assert not (tmp_path / "w").exists()


def test_a_work_dir_of_another_pipeline_is_refused(tmp_path):
    from kdcache.onpolicy import claim_work_dir, load_pipeline, run_onpolicy

    args = dict(student=tmp_path / "s0", teacher=tmp_path / "t", prompts=tmp_path / "p.jsonl", work=tmp_path / "w")
    claim_work_dir(load_pipeline(write_pipeline(tmp_path / "a.yaml", **args)))
    claim_work_dir(load_pipeline(write_pipeline(tmp_path / "same.yaml", **args)))  # same settings, another file: fine
    other = write_pipeline(tmp_path / "b.yaml", **args, extra={"student": {"lr": 1.0e-4}, "rollout": {"top-p": 0.9}})
    with pytest.raises(KdcacheError, match=r"holds rounds of a pipeline with other settings \(rollout.top_p, "
                                           r"student.lr differ\)"):
        run_onpolicy(other, 1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(KdcacheError, match="not empty and holds no kdcache onpolicy run"):
        run_onpolicy(other, 1, work_dir=tmp_path / "busy")
    with pytest.raises(KdcacheError, match="--rounds must be >= 1"):
        run_onpolicy(other, 0)


# ------------------------------------------------------------------- slow: end to end


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the killed run's children")
def test_rounds_resume_after_kill_and_equal_the_steps_run_alone(student_dir, tiny_llama, train_cache, tmp_path):  # noqa: F811
    prompts = chat_prompts(tmp_path / "prompts.jsonl", 6)
    cfg = write_pipeline(tmp_path / "op.yaml", student=student_dir, teacher=tiny_llama, prompts=prompts,
                         mix_cache=train_cache)

    # Reference: round 0's three commands, as printed, run one by one (separate "machines").
    ref = tmp_path / "ref"
    plan = kdcache("onpolicy", "--config", str(cfg), "--rounds", "1", "--work-dir", str(ref), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    for line in plan.stdout.splitlines():
        step = subprocess.run(shlex.split(line), capture_output=True, text=True, env=_env())
        assert step.returncode == 0, step.stderr[-3000:]

    # The pipeline, killed with SIGKILL once round 0's training has written a checkpoint.
    work = tmp_path / "work"
    args = ["onpolicy", "--config", str(cfg), "--rounds", "2", "--work-dir", str(work)]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    checkpoint = work / "round-0" / "train" / "last" / "trainer_state.json"
    deadline = time.time() + 600
    while time.time() < deadline and not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.05)
    children = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and children, proc.stderr.read().decode()[-3000:]
    gone = time.time() + 30
    while time.time() < gone and any(_alive(c) for c in children):
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "the step's process outlived kdcache onpolicy"
    assert not (work / "round-0" / "train" / "COMPLETE").exists(), "the kill should land mid-training"
    finished = {p: p.stat().st_mtime_ns for p in (work / "round-0" / "rollout" / "rollout.json",
                                                 work / "round-0" / "cache" / "manifest.json")}
    state = json.loads((work / "round-0" / "state.json").read_text())
    assert state["steps"]["score"]["finished_at"] and state["steps"]["train"]["finished_at"] is None

    # The same command continues: round 0's finished steps are left alone, its training resumes.
    result = kdcache(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[round 0] rollout" not in result.stdout and "[round 0] score" not in result.stdout
    assert "[round 0] train" in result.stdout and "[round 1] rollout" in result.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    steps = [json.loads(line)["step"] for line in (work / "round-0" / "train" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2

    # Round 0 equals the steps run alone: the same samples, scores and trained weights.
    from kdcache.data import open_dataset

    def rows(d: Path) -> list:
        return [(r["prompt_ids"], r["response_ids"], r["response_logprobs"]) for _, _, r in open_dataset(d).rows()]

    assert rows(work / "round-0" / "rollout") == rows(ref / "round-0" / "rollout")
    a, b = _weights(work / "round-0" / "train" / "model"), _weights(ref / "round-0" / "train" / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    # Round 1 sampled from round 0's student and trained it.
    rollout1 = json.loads((work / "round-1" / "rollout" / "rollout.json").read_text())
    assert rollout1["round"] == 1 and rollout1["student"]["spec"] == str(work / "round-0" / "train" / "model")
    assert rollout1["sampling"]["seed"] == 6
    assert (work / "round-1" / "train" / "COMPLETE").exists()
    for r in (0, 1):
        state = json.loads((work / f"round-{r}" / "state.json").read_text())
        assert all(state["steps"][name]["finished_at"] for name in ("rollout", "score", "train"))

    # Everything finished: a rerun runs nothing.
    again = kdcache(*args)
    assert again.returncode == 0 and "(6 finished step(s) skipped)" in again.stdout and "[round" not in again.stdout


def test_the_shipped_onpolicy_pipeline_is_valid():
    from kdcache.onpolicy import load_pipeline

    path = REPO / "pipelines" / "onpolicy" / "qwen2.5-7b-to-1.5b-onpolicy.yaml"
    pipeline = load_pipeline(path)
    assert pipeline.sections["student"]["loss"] == "sampled_rkl" and pipeline.sections["student"]["lmbda"] == 0.5
    assert pipeline.sections["teacher"]["top_k"] == 1 and pipeline.sections["rollout"]["samples_per_prompt"] == 4
    rollout, score, train = pipeline.steps(1)
    assert rollout.argv[rollout.argv.index("--student") + 1] == str(pipeline.work_dir / "round-0" / "train" / "model")
