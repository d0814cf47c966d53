"""Every shipped pipeline YAML parses and uses only real options of both commands."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import torch

from kdcache.cli.generate_cmd import generate_teacher
from kdcache.cli.train_cmds import eval_cmd, train_student
from kdcache.config import load_section
from kdcache.student.compat import check_loss_needs, ignored_draws_warning, resolve_loss
from kdcache.student.losses import KDLossConfig, combine
from kdcache.student.train import TrainConfig

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))
EXPECTED = {
    "qwen2.5-7b-to-1.5b-lora.yaml",
    "qwen1.5-32b-awq-to-14b-qlora.yaml",
    "qwen1.5-32b-awq-to-14b-qlora-ce.yaml",
    "llama3.1-8b-to-3.2-1b-lora.yaml",
    "gpt2-xl-to-gpt2.yaml",
    "smollm2-demo.yaml",
}


def _options(command: click.Command) -> set[str]:
    return {p.name for p in command.params if isinstance(p, click.Option)} - {"config"}


def _context(command: click.Command, path: Path, section: dict, required: tuple[str, ...]) -> click.Context:
    """Parse the command line `--config path` (plus placeholders for required options the
    file leaves to the command line) exactly as the CLI would, without running it."""
    args = ["--config", str(path)]
    for name in required:
        if name not in section:
            args += [f"--{name}", f"CLI-{name}"]
    return command.make_context(command.name, args)


def test_all_pipelines_are_shipped():
    assert {p.name for p in PIPELINES} == EXPECTED


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_uses_real_options(path: Path):
    teacher = load_section(path, "teacher")
    student = load_section(path, "student")
    assert teacher and student
    assert set(teacher) <= _options(generate_teacher), set(teacher) - _options(generate_teacher)
    assert set(student) <= _options(train_student), set(student) - _options(train_student)

    gen_ctx = _context(generate_teacher, path, teacher, ("teacher", "dataset", "output"))
    train_ctx = _context(train_student, path, student, ("student", "cache", "output"))
    for key, value in student.items():
        assert train_ctx.params[key] is not None or value is None, key
    # The student's loss fits the cache its teacher section makes (`auto` resolved as train-student does).
    mode = gen_ctx.params["sampling"]
    cache = {"top_k": gen_ctx.params["top_k"],
             "sampling": {"mode": mode, "num_samples": gen_ctx.params["samples"] if mode != "none" else 0}}
    loss = resolve_loss(train_ctx.params["loss"], cache)
    check_loss_needs(loss, cache, path)
    assert ignored_draws_warning(loss, cache, path) is None, path
    TrainConfig(**{**train_ctx.params, "loss": loss}).check()
    TrainConfig(**{**train_ctx.params, "loss": loss}).loss_config()
    # The student reads the cache the teacher section writes.
    if "output" in teacher and "cache" in student:
        assert gen_ctx.params["output"] == train_ctx.params["cache"]
    # `kdcache eval --config` takes the loss/runtime keys and ignores training-only ones.
    eval_ctx = eval_cmd.make_context("eval", ["--config", str(path), "--model", "m", "--cache", "c"])
    assert eval_ctx.params["loss"] == train_ctx.params["loss"]
    assert eval_ctx.params["model"] == "m"


def _student(name: str) -> dict:
    return load_section(Path(PIPELINES[0]).parent / name, "student")


def test_pipeline_specifics():
    qlora, qlora_ce = _student("qwen1.5-32b-awq-to-14b-qlora.yaml"), _student("qwen1.5-32b-awq-to-14b-qlora-ce.yaml")
    assert qlora["load_in_4bit"] and qlora_ce["load_in_4bit"] and qlora["lora_r"] > 0
    assert qlora["ce_weight"] == 0.0 and qlora_ce["ce_weight"] > 0
    for name in ("qwen1.5-32b-awq-to-14b-qlora.yaml", "qwen1.5-32b-awq-to-14b-qlora-ce.yaml"):
        assert load_section(Path(PIPELINES[0]).parent / name, "teacher")["max_length"] == 1024

    llama = _student("llama3.1-8b-to-3.2-1b-lora.yaml")
    # "KD weight 0.1" under losses.combine's convention: total = (1 - ce_weight) KD + ce_weight CE.
    cfg = KDLossConfig(loss=llama["loss"], ce_weight=llama["ce_weight"])
    assert float(combine(torch.tensor(1.0), torch.tensor(0.0), cfg, 1.0)) == pytest.approx(0.1)
    assert llama["lora_r"] > 0

    gpt2 = _student("gpt2-xl-to-gpt2.yaml")
    assert gpt2["global_batch_size"] == 256 and gpt2["final_model"] == "best" and gpt2["eval_cache"]
    assert gpt2.get("lora_r", 0) == 0
