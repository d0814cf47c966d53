"""`torchrun ... -m kdcache train-student` on CPU: real torchrun processes, gloo, tiny models.

Two ranks must give what one process gives on the same global batch (FSDP2 full fine-tuning
with tied embeddings, LoRA under DDP); a run whose rank is killed resumes to the result of an
uninterrupted run, on the same or another number of ranks; what cannot resume exactly is
refused in one line.

Tolerance for "the same": losses per step within 2e-6 relative, weights within 5e-5
absolute (+1e-4 relative). Two ranks sum the same per-token terms in another order (each rank
packs its share into its own micro-batches, gradients are summed across ranks), so float32
rounding differs at about 1e-7 relative per gradient; AdamW (lr 3e-3 here) turns that into
weight differences of at most a few 1e-6 after a few steps (measured: 7.4e-6 after 5 steps),
so 5e-5 leaves room without hiding a real mismatch: one skipped or doubled sequence moves
the loss by more than 1e-3 and the weights by about the learning rate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.errors import KdcacheError
from tests.test_train import config, eval_cache, student_dir, train_cache  # noqa: F401 - shared fixtures

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 2e-6
WEIGHT_ATOL, WEIGHT_RTOL = 5e-5, 1e-4

#: The options of every run here (the in-process runs get them through tests.test_train.config).
COMMON = dict(global_batch_size=6, micro_batch_tokens=96, lr=3e-3, warmup_ratio=0.0, seed=3, shuffle_window=2)


def cli_args(student: Path, cache: Path, out: Path, **options) -> list[str]:
    args = ["--student", str(student), "--cache", str(cache), "--output", str(out), "--device", "cpu", "--no-progress"]
    for key, value in {**COMMON, **options}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        else:
            args += [flag, str(value)]
    return args


def torchrun(nproc: int, args: list[str], *, background: bool = False, timeout: float = 300):
    """``torchrun --standalone --nproc_per_node N -m kdcache train-student ARGS`` (one thread per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "kdcache", "train-student", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def train_records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def assert_same_run(got: Path, want: Path, weights_dir: str = "model") -> None:
    """Same losses per step (and eval metrics) and the same final weights, within the module's tolerance."""
    a, b = train_records(got), train_records(want)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("loss", "kd", "ce", "tokens", "sequences"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=LOSS_RTOL), key
    for x, y in zip(train_records(got, "eval"), train_records(want, "eval")):
        assert x["step"] == y["step"]
        for key in ("eval_loss", "eval_kl", "eval_ce", "eval_tokens", "eval_sequences"):
            assert x[key] == pytest.approx(y[key], rel=LOSS_RTOL), key
    wa, wb = weights(got / weights_dir), weights(want / weights_dir)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)


@pytest.fixture(scope="module")
def tied_student(student_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The student with tied input and output embeddings (one weight), as Qwen2.5-0.5B/1.5B have."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tied")
    cfg = AutoConfig.from_pretrained(student_dir)
    cfg.tie_word_embeddings = True
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(out)
    return out


# ------------------------------------------------------------------ in-process pieces


def test_rank_batches_split_the_global_batches(train_cache):  # noqa: F811
    """Every rank's share, interleaved, is the one-process global batch, for 1-4 ranks, also
    across windows, epochs and a resume; the recorded positions are the one-process ones."""
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import DataPosition, GlobalBatches, RankBatches

    reader = CacheReader(train_cache)
    for batch_size in (10, 16):
        single = GlobalBatches(reader, batch_size, seed=1, window_shards=2)
        want = []
        for _ in range(8):  # 48 sequences: crosses into the third epoch
            seqs, epoch = next(single)
            want.append(([s.seq_id for s in seqs], epoch, single.position))
        for world in (1, 2, 3, 4):
            ranks = [RankBatches(reader, batch_size, 1, window_shards=2, rank=r, world_size=world) for r in range(world)]
            for ids, epoch, position in want:
                parts = [next(rb) for rb in ranks]
                assert {p[1] for p in parts} == {epoch} and {p[2] for p in parts} == {len(ids)}
                got = [None] * len(ids)
                for r, (seqs, _, _) in enumerate(parts):
                    got[r::world] = [s.seq_id for s in seqs]
                assert got == ids
                assert {rb.position for rb in ranks} == {position}
    # Resuming from a recorded mid-window position continues the same order.
    start = DataPosition(0, 1, 4)
    single = GlobalBatches(reader, 6, seed=1, start=start, window_shards=2)
    ranks = [RankBatches(reader, 6, 1, start=start, window_shards=2, rank=r, world_size=2) for r in range(2)]
    seqs, _ = next(single)
    got = [s.seq_id for pair in zip(*(next(rb)[0] for rb in ranks)) for s in pair]
    assert got == [s.seq_id for s in seqs]


def test_sharded_eval_reads_each_sequence_once(eval_cache):  # noqa: F811
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import _eval_sequences

    reader = CacheReader(eval_cache)
    every = [s.seq_id for s in _eval_sequences(reader, None, 0, 1)]
    for world in (2, 3):
        parts = [[s.seq_id for s in _eval_sequences(reader, 7, r, world)] for r in range(world)]
        assert sorted(sum(parts, [])) == every[:7]
        assert all(p == sorted(p) for p in parts)


def test_launcher_environments():
    from kdcache.student.distributed import detect_launch, first_slurm_host

    assert detect_launch({}) is None
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
                "TORCHELASTIC_RUN_ID": "x"}
    launch = detect_launch(torchrun)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.source) == (3, 8, 1, "torchrun")
    accelerate = {k: v for k, v in torchrun.items() if k != "TORCHELASTIC_RUN_ID"}
    assert detect_launch(accelerate).source == "launcher (RANK/WORLD_SIZE)"
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
            "SLURM_STEP_NODELIST": "gpu[07-08,12]", "SLURM_NTASKS": "8"}
    launch = detect_launch(srun)
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 8, 1)
    assert (launch.master_addr, launch.master_port) == ("gpu07", 23456)
    # RANK from torchrun inside an srun step wins; a one-task srun step is a plain process; an
    # sbatch script (no step) with --ntasks 8 is not mistaken for rank 0 of 8.
    assert detect_launch({**srun, **torchrun}).rank == 3
    assert detect_launch({**srun, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert detect_launch({k: v for k, v in srun.items() if k != "SLURM_STEP_NUM_TASKS"}) is None
    assert first_slurm_host("a1,b[2-3]") == "a1" and first_slurm_host("n[001-004]-ib") == "n001-ib"
    for bad, pattern in ((dict(torchrun, RANK="x"), "RANK='x' is not an integer"),
                         (dict(torchrun, RANK="8"), "rank 8 of world size 8"),
                         ({k: v for k, v in torchrun.items() if k != "MASTER_PORT"}, "MASTER_ADDR/MASTER_PORT"),
                         ({k: v for k, v in torchrun.items() if k != "LOCAL_RANK"}, "LOCAL_RANK is not")):
        with pytest.raises(KdcacheError, match=pattern):
            detect_launch(bad)


# ------------------------------------------------------------------ torchrun runs


def test_fsdp2_full_finetuning_matches_one_process(tied_student, train_cache, eval_cache, tmp_path):  # noqa: F811
    """FSDP2 on 2 ranks (tied embeddings: one FSDP unit holds the embedding and lm_head) gives
    the losses, eval metrics and weights of one process; rank 0 writes the run's files."""
    from kdcache.student.train import train_student

    options = dict(max_steps=5, eval_every=2)
    single = tmp_path / "single"
    train_student(config(tied_student, train_cache, single, eval_cache=str(eval_cache), **options))
    two = tmp_path / "two"
    result = torchrun(2, cli_args(tied_student, train_cache, two, eval_cache=eval_cache, **options))
    _ok(result)
    assert result.stdout.count("trained 5 steps") == 1  # rank 0 reports
    assert_same_run(two, single)
    assert_same_run(two, single, "best/model")
    for name in ("COMPLETE", "summary.json", "loss_curves.png", "best/eval.json", "last/dcp/.metadata",
                 "last/world.json", "last/rng-rank00001.pt"):
        assert (two / name).exists(), name
    assert json.loads((two / "last" / "world.json").read_text()) == {"world_size": 2, "format": "dcp"}
    summary, want = (json.loads((d / "summary.json").read_text()) for d in (two, single))
    assert summary["steps"] == want["steps"] and summary["supervised_tokens"] == want["supervised_tokens"]
    assert summary["best_value"] == pytest.approx(want["best_value"], rel=LOSS_RTOL)
    assert not list(two.glob(".*"))  # no temporary directories or marker files left behind


def test_lora_ddp_matches_one_process(student_dir, train_cache, tmp_path):  # noqa: F811
    from kdcache.student.train import train_student

    options = dict(max_steps=4, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2)
    single = tmp_path / "single"
    train_student(config(student_dir, train_cache, single, **options))
    two = tmp_path / "two"
    _ok(torchrun(2, cli_args(student_dir, train_cache, two, **options)))
    assert_same_run(two, single, "adapter")
    assert_same_run(two, single, "model")


def _workers(agent: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes torchrun (pid ``agent``) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent:
            rank = [v for v in environ if v.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(entry.name)
    return found


@pytest.fixture(scope="module")
def killed_run(student_dir, train_cache, tmp_path_factory):  # noqa: F811
    """A 2-rank full fine-tuning run whose rank 1 is SIGKILLed after step 3; the uninterrupted
    one-process run of the same settings."""
    from kdcache.student.train import train_student

    root = tmp_path_factory.mktemp("killed")
    options = dict(max_steps=10, save_every=2)
    reference = root / "reference"
    train_student(config(student_dir, train_cache, reference, **options))
    killed = root / "killed"
    proc = torchrun(2, cli_args(student_dir, train_cache, killed, **options), background=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()
                                        if line.strip()):
                os.kill(_workers(proc.pid)[1], signal.SIGKILL)
                break
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "the run finished before rank 1 could be killed"
    return reference, killed, options, stderr  # tests resume copies of `killed`


def test_a_killed_rank_is_named_and_the_run_resumes_exactly(killed_run, student_dir, train_cache, tmp_path):  # noqa: F811
    reference, killed, options, stderr = killed_run
    lines = [line for line in stderr.splitlines() if line.startswith("kdcache: error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("kdcache: error: rank 0: stopped at step ")
    assert "rank 1 died without a message" in lines[0] and "--resume" in lines[0]
    assert not (killed / "COMPLETE").exists() and not (killed / "model").exists()
    saved = json.loads((killed / "last" / "trainer_state.json").read_text())["step"]
    assert 2 <= saved < 10 and f"checkpoint of step {saved}" in lines[0]
    same_world, other_world = tmp_path / "two-ranks", tmp_path / "one-rank"
    shutil.copytree(killed, same_world)
    shutil.copytree(killed, other_world)
    _ok(torchrun(2, cli_args(student_dir, train_cache, same_world, resume=True, **options)))
    assert_same_run(same_world, reference)
    # The data position, weights and AdamW state do not depend on the number of ranks, and this
    # run draws no random numbers: it resumes exactly on one rank too.
    _ok(torchrun(1, cli_args(student_dir, train_cache, other_world, resume=True, **options)))
    assert_same_run(other_world, reference)


def test_what_cannot_resume_exactly_is_refused(killed_run, student_dir, train_cache, tmp_path):  # noqa: F811
    """One process cannot resume a launcher's sharded checkpoint (nor the reverse); a run with
    dropout cannot change its number of ranks."""
    from kdcache.student import checkpoint as ckpt
    from kdcache.student.train import train_student

    _, killed, options, _ = killed_run
    sharded = tmp_path / "sharded"
    shutil.copytree(killed, sharded)
    with pytest.raises(KdcacheError, match="checkpointed under a launcher by 2 rank.*resume it under a launcher") as info:
        train_student(config(student_dir, train_cache, sharded, resume=True, **options))
    assert "\n" not in str(info.value) and not (sharded / "COMPLETE").exists()

    single = tmp_path / "single"
    with pytest.raises(KeyboardInterrupt):
        train_student(config(student_dir, train_cache, single, **options),
                      on_step=lambda step, _: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else None)
    result = torchrun(1, cli_args(student_dir, train_cache, single, resume=True, **options))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("kdcache: error:")]
    assert len(lines) == 1 and "checkpointed by one process without a launcher" in lines[0], result.stderr[-3000:]

    # Dropout: the per-rank random streams belong to the number of ranks that saved them.
    ckpt.write_json_atomic(single / "last" / ckpt.WORLD_FILE, {"world_size": 2, "format": "files"})
    with pytest.raises(KdcacheError, match=r"saved by 2 rank\(s\), resumed on 1: .*Dropout.*resume on 2 rank"):
        ckpt.check_resume_layout(single / "last", storage="files", world_size=1, random_ops=["Dropout(p=0.05)"])
    assert ckpt.check_resume_layout(single / "last", storage="files", world_size=1, random_ops=[]) is False
    assert ckpt.check_resume_layout(single / "last", storage="files", world_size=2, random_ops=["x"]) is True
    assert np.isfinite(json.loads((single / "last" / "trainer_state.json").read_text())["step"])
