"""Stage two on CPU with tiny models: training lowers the KL to the teacher, packing and
resume are exact, LoRA exports load, `kdcache eval` works, bad inputs fail cleanly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.errors import KdcacheError
from tests.conftest import CORPUS

SENTENCES = sorted(set(CORPUS))


def texts(n: int, offset: int = 0) -> list[str]:
    """``n`` short texts of 1-4 sentences (deterministic)."""
    rng = np.random.default_rng(offset)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        out.append(" ".join(SENTENCES[int(i)] for i in rng.integers(0, len(SENTENCES), size=k)))
    return out


def make_cache(out: Path, teacher: Path, rows: list[str], *, top_k: int = 8, samples: int = 0,
               shard_size: int = 8, max_length: int = 48, seed: int = 0, sampling: str = "random") -> Path:
    """A finished cache of ``rows`` (text format) scored by ``teacher`` through the real
    stage-one pipeline (transformers backend, float32)."""
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache

    out.parent.mkdir(parents=True, exist_ok=True)
    dataset = out.parent / f"{out.name}.jsonl"
    dataset.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    manifest = generate_teacher_cache(GenerateConfig(
        teacher=str(teacher), dataset=str(dataset), output=str(out), backend="hf", top_k=top_k,
        sampling=sampling if samples else "none", samples=samples or 50, seed=seed, max_length=max_length,
        shard_size=shard_size, dtype="float32", progress=False,
    ))
    assert manifest is not None and manifest["totals"]["sequences"] == len(rows)
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    """A smaller, differently initialized student with the teacher's tokenizer."""
    from kdcache.testing.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("student"), CORPUS, arch="llama", hidden_size=64, seed=7)


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, tiny_llama) -> Path:
    return make_cache(tmp_path_factory.mktemp("c") / "train", tiny_llama, texts(48, 0))


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory, tiny_llama) -> Path:
    return make_cache(tmp_path_factory.mktemp("c") / "eval", tiny_llama, texts(12, 1))


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory, tiny_llama) -> Path:
    return make_cache(tmp_path_factory.mktemp("c") / "rs", tiny_llama, texts(16, 2), top_k=4, samples=20)


@pytest.fixture(scope="session")
def tail_cache(tmp_path_factory, tiny_llama) -> Path:
    """Top-4 plus 8 draws per token from outside the top-4 (``--sampling tail``)."""
    return make_cache(tmp_path_factory.mktemp("c") / "tailrs", tiny_llama, texts(16, 2), top_k=4, samples=8,
                      sampling="tail")


def cfg_needs_tau_one(loss: str) -> bool:
    return loss in ("rs_kd", "tail_rs")


def config(student: Path, cache: Path, out: Path, **kw):
    from kdcache.student.train import TrainConfig

    base = dict(student=str(student), cache=str(cache), output=str(out), device="cpu", global_batch_size=6,
                micro_batch_tokens=96, lr=3e-3, warmup_ratio=0.0, progress=False, seed=3, shuffle_window=2)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------ data layer


def test_epoch_order_is_a_deterministic_permutation(train_cache):
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import DataPosition, GlobalBatches, iter_epoch

    reader = CacheReader(train_cache)
    first = [s.seq_id for s, _ in iter_epoch(reader, seed=1, epoch=0, window_shards=2)]
    assert sorted(first) == list(range(48)) and first != list(range(48))
    assert first == [s.seq_id for s, _ in iter_epoch(reader, seed=1, epoch=0, window_shards=2)]
    assert first != [s.seq_id for s, _ in iter_epoch(reader, seed=1, epoch=1, window_shards=2)]
    # Restarting from any recorded position continues the same order.
    positions = [p for _, p in iter_epoch(reader, seed=1, epoch=0, window_shards=2)]
    for cut in (0, 5, 16, 47):
        rest = [s.seq_id for s, _ in iter_epoch(reader, 1, 0, positions[cut], window_shards=2)]
        assert rest == first[cut + 1 :]
    # Batches never straddle epochs; a batch size dividing the epoch rolls over cleanly.
    stream = GlobalBatches(reader, 10, seed=1, window_shards=2)
    sizes = [(len(b), e) for b, e in (next(stream) for _ in range(6))]
    assert sizes == [(10, 0), (10, 0), (10, 0), (10, 0), (8, 0), (10, 1)]
    stream = GlobalBatches(reader, 16, seed=1, start=DataPosition(0, 2, 16), window_shards=2)
    assert next(stream)[1] == 1


def test_micro_batches_respect_the_token_budget(train_cache):
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import input_length, micro_batches

    reader = CacheReader(train_cache)
    seqs = list(reader.iter_sequences())[:12]
    mbs = micro_batches(seqs, 64, reader.top_k)
    assert sum(len(mb.seq_lengths) for mb in mbs) == 12
    assert all(mb.num_tokens <= 64 for mb in mbs)
    assert sum(mb.num_targets for mb in mbs) == sum(s.num_targets for s in seqs)
    mb = micro_batches(seqs[:3], 1000, reader.top_k)[0]
    # Gold ids sit right after the hidden rows that predict them (a sequence's last target
    # is not fed as input: nothing predicts from it), and position ids restart per sequence.
    flat = mb.input_ids[0]
    ends = torch.tensor(np.cumsum(mb.seq_lengths) - 1)
    inner = ~torch.isin(mb.hidden_index, ends)
    assert int((~inner).sum()) == 3
    assert torch.equal(flat[mb.hidden_index[inner] + 1], mb.gold_ids[inner])
    assert (mb.position_ids[0] == 0).sum() == 3 and mb.num_tokens == sum(mb.seq_lengths)
    with pytest.raises(KdcacheError, match="--micro-batch-tokens"):
        micro_batches(seqs, max(input_length(s) for s in seqs) - 1, reader.top_k)


# --------------------------------------------------------------------- packing exact


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(student_dir, train_cache, attn):
    """One packed micro-batch gives the loss and gradients of one micro-batch per sequence."""
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import build_micro_batch
    from kdcache.student.losses import KDLossConfig
    from kdcache.student.modeling import load_student
    from kdcache.student.train import Runtime, forward_backward

    reader = CacheReader(train_cache)
    seqs = list(reader.iter_sequences())[:5]
    model = load_student(student_dir, device=torch.device("cpu"), dtype=torch.float32, attn_implementation=attn)
    runtime = Runtime(torch.device("cpu"), None, attn)
    cfg = KDLossConfig(loss="tail", ce_weight=0.3)

    def run(batches):
        model.zero_grad(set_to_none=True)
        metrics = forward_backward(model, batches, cfg, runtime)
        return metrics, {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = build_micro_batch(seqs, reader.top_k)
    assert len(packed.seq_lengths) == 5
    m_packed, g_packed = run([packed])
    m_single, g_single = run([build_micro_batch([s], reader.top_k) for s in seqs])
    assert m_packed["loss"] == pytest.approx(m_single["loss"], rel=1e-5)
    assert m_packed["kd"] == pytest.approx(m_single["kd"], rel=1e-5)
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_single[name], rtol=1e-4, atol=1e-6)
    # transformers' own packed-sequence detection from restarting position_ids agrees too,
    # and a row without restarts and without a mask does not (attention leaks across).
    from dataclasses import replace

    from kdcache.student import modeling

    original = modeling.attention_inputs
    modeling.attention_inputs = lambda *a, **k: None
    try:
        m_native, _ = run([packed])
        leaky = replace(packed, position_ids=torch.arange(packed.num_tokens)[None])
        m_leaky, _ = run([leaky])
    finally:
        modeling.attention_inputs = original
    assert m_native["loss"] == pytest.approx(m_single["loss"], rel=1e-5)
    assert abs(m_leaky["loss"] - m_packed["loss"]) > 1e-3


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(student_dir, train_cache, lora):
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import micro_batches
    from kdcache.student.losses import KDLossConfig
    from kdcache.student.modeling import LoraSettings, load_student
    from kdcache.student.train import Runtime, forward_backward

    reader = CacheReader(train_cache)
    batches = micro_batches(list(reader.iter_sequences())[:6], 64, reader.top_k)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_student(student_dir, device=torch.device("cpu"), dtype=torch.float32, gradient_checkpointing=checkpointing,
                             lora=LoraSettings(4, 8, 0.0) if lora else None)
        model.train()
        forward_backward(model, batches, KDLossConfig(), Runtime(torch.device("cpu"), None, "sdpa"))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["tail", "reverse_kl", "jsd", "skew_forward", "skew_reverse", "tv", "akl", "topk_renorm",
                                  "rs_kd", "tail_rs"])
def test_every_loss_gives_finite_gradients(student_dir, sample_cache, tail_cache, loss):
    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import micro_batches
    from kdcache.student.losses import KDLossConfig
    from kdcache.student.modeling import load_student
    from kdcache.student.train import Runtime, forward_backward

    reader = CacheReader(tail_cache if loss == "tail_rs" else sample_cache)
    seqs = list(reader.iter_sequences())[:4]
    model = load_student(student_dir, device=torch.device("cpu"), dtype=torch.float32)
    cfg = KDLossConfig(loss=loss, ce_weight=0.1, tau=1.0 if cfg_needs_tau_one(loss) else 2.0)
    metrics = forward_backward(model, micro_batches(seqs, 64, reader.top_k, reader.num_samples, cfg.needs_samples),
                               cfg, Runtime(torch.device("cpu"), None, "sdpa"))
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ training end to end


def test_training_lowers_kl_to_the_teacher(student_dir, train_cache, eval_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdcache.student.evaluate import evaluate_model
    from kdcache.student.train import train_student

    before = evaluate_model(str(student_dir), str(eval_cache), device="cpu")
    out = tmp_path / "run"
    summary = train_student(config(student_dir, train_cache, out, epochs=2, eval_cache=str(eval_cache), eval_every=4,
                                   ce_weight=0.1))
    after = evaluate_model(str(out / "model"), str(eval_cache), device="cpu")
    assert after["kl"] < 0.8 * before["kl"], (before, after)
    assert summary["steps"] == 16 and summary["best_step"] is not None
    # The final model is the best checkpoint, and its eval matches best/eval.json.
    best = json.loads((out / "best" / "eval.json").read_text())
    assert best["step"] == summary["best_step"]
    assert after["kl"] == pytest.approx(best["kl"], rel=1e-4)
    for name in ("COMPLETE", "summary.json", "loss_curves.png", "metrics.jsonl", "run.json", "last/optimizer.pt"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    assert {"loss", "kd", "ce", "lr", "grad_norm", "tokens", "epoch"} <= set(train[0])
    assert {"eval_kl", "eval_ce", "eval_ppl", "eval_loss"} <= set(evals[0])
    assert train[-1]["epoch"] == 1
    AutoModelForCausalLM.from_pretrained(out / "model")  # loads standalone
    assert (out / "model" / "tokenizer_config.json").exists()


def _stop_at(step: int):
    def hook(current: int, _record: dict) -> None:
        if current == step:
            raise KeyboardInterrupt

    return hook


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def _train_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "train"]


@pytest.fixture(scope="module")
def lora_runs(student_dir, train_cache, tmp_path_factory):
    """An uninterrupted LoRA run and one interrupted mid-epoch at step 3, then resumed."""
    from kdcache.student.train import train_student

    root = tmp_path_factory.mktemp("lora")
    common = dict(max_steps=10, lora_r=4, lora_alpha=8, lora_dropout=0.1, save_every=1, lr=1e-2, warmup_ratio=0.2)
    whole = root / "whole"
    train_student(config(student_dir, train_cache, whole, **common))
    split = root / "split"
    with pytest.raises(KeyboardInterrupt):
        train_student(config(student_dir, train_cache, split, **common), on_step=_stop_at(3))
    assert not (split / "COMPLETE").exists() and not (split / "model").exists()
    with pytest.raises(KdcacheError, match="--resume"):
        train_student(config(student_dir, train_cache, split, **common))
    with pytest.raises(KdcacheError, match="lr differ"):
        train_student(config(student_dir, train_cache, split, resume=True, **{**common, "lr": 1e-3}))
    train_student(config(student_dir, train_cache, split, resume=True, **common))
    return whole, split


def test_resume_matches_uninterrupted_run(lora_runs):
    whole, split = lora_runs
    # 48 sequences / 6 per step = 8 steps per epoch: step 3 is mid-epoch and mid-window,
    # and steps 9-10 come from the second epoch.
    assert _train_losses(split) == pytest.approx(_train_losses(whole), rel=1e-6, abs=1e-7)
    a, b = _weights(whole / "adapter"), _weights(split / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_lora_adapter_and_merged_model_agree(lora_runs, student_dir, train_cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    whole, _ = lora_runs
    assert (whole / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(whole / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    adapted = PeftModel.from_pretrained(base, whole / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(whole / "model")("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
        untouched = AutoModelForCausalLM.from_pretrained(student_dir).eval()  # peft wrapped `base` in place
        assert not torch.allclose(merged(ids).logits, untouched(ids).logits, atol=1e-3)


def test_eval_command_json_and_table(lora_runs, eval_cache):
    from click.testing import CliRunner

    from kdcache.cli import cli

    whole, _ = lora_runs
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", "--model", str(whole / "model"), "--cache", str(eval_cache), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"kl", "ce", "ppl", "top1_agree", "teacher_ce", "teacher_ppl", "loss", "tokens", "sequences"} <= set(metrics)
    assert metrics["sequences"] == 12 and metrics["ppl"] == pytest.approx(np.exp(metrics["ce"]))
    # An adapter directory evaluates the same as the merged model.
    result = runner.invoke(cli, ["eval", "--model", str(whole / "adapter"), "--cache", str(eval_cache), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = dict(line.split() for line in result.stdout.strip().splitlines())
    assert float(table["kl"]) == pytest.approx(metrics["kl"], rel=1e-3)


def test_rs_kd_trains_from_sampled_cache(student_dir, sample_cache, eval_cache, tmp_path):
    from kdcache.student.train import train_student

    summary = train_student(config(student_dir, sample_cache, tmp_path / "rs", loss="rs_kd", max_steps=2,
                                   eval_cache=str(sample_cache), final_model="last"))
    assert summary["final_eval"]["rs_kl"] >= 0 and np.isfinite(summary["final_eval"]["loss"])
    assert summary["best_metric"] == "loss"
    # An eval cache without samples cannot give the rs_kd loss: best/ is chosen by KL instead.
    summary = train_student(config(student_dir, sample_cache, tmp_path / "rs2", loss="rs_kd", max_steps=1,
                                   eval_cache=str(eval_cache)))
    assert summary["best_metric"] == "kl" and "loss" not in summary["final_eval"]


def test_tail_rs_trains_from_tail_sampled_cache(student_dir, tail_cache, sample_cache, tmp_path):
    """--loss auto on a --sampling tail cache is tail_rs; it lowers the KL to the teacher,
    evaluates its own loss on a tail cache, and refuses a full-distribution sample cache."""
    from kdcache.cache.reader import CacheReader
    from kdcache.student.evaluate import evaluate_model
    from kdcache.student.train import train_student

    reader = CacheReader(tail_cache)
    for seq in reader.iter_sequences():
        for r in range(seq.num_targets):  # no draw inside the position's top-k
            sl = slice(seq.sample_offsets[r], seq.sample_offsets[r + 1])
            assert not np.isin(seq.sample_ids[sl], seq.topk_ids[r]).any()
            assert seq.sample_counts[sl].sum() == 8
    before = evaluate_model(str(student_dir), str(tail_cache), device="cpu")
    out = tmp_path / "tailrs"
    summary = train_student(config(student_dir, tail_cache, out, epochs=2, eval_cache=str(tail_cache), eval_every=4,
                                   final_model="last"))
    assert json.loads((out / "run.json").read_text())["settings"]["loss"] == "tail_rs"
    assert summary["best_metric"] == "loss" and np.isfinite(summary["final_eval"]["loss"])
    assert summary["final_eval"]["loss"] >= summary["final_eval"]["kl"] - 1e-6  # the tail term is >= 0
    assert summary["final_eval"]["kl"] < 0.8 * before["kl"], (before, summary["final_eval"])
    with pytest.raises(KdcacheError, match="tail_rs needs tokens drawn from outside the top-k"):
        train_student(config(student_dir, sample_cache, tmp_path / "wrong", loss="tail_rs", max_steps=1))
    with pytest.raises(KdcacheError, match="rs_kd needs tokens drawn from the teacher's full distribution"):
        train_student(config(student_dir, tail_cache, tmp_path / "wrong2", loss="rs_kd", max_steps=1))


def test_loss_auto_follows_the_cache(student_dir, train_cache, tiny_llama, tmp_path):
    """--loss auto (the default): rs_kd for a cache of samples only, the tail loss otherwise."""
    from kdcache.student.compat import resolve_loss
    from kdcache.student.train import train_student

    samples_only = make_cache(tmp_path / "rs-only", tiny_llama, texts(8, 5), top_k=0, samples=20)
    assert resolve_loss("auto", json.loads((samples_only / "manifest.json").read_text())) == "rs_kd"
    assert resolve_loss("auto", json.loads((train_cache / "manifest.json").read_text())) == "tail"
    assert resolve_loss("jsd", json.loads((samples_only / "manifest.json").read_text())) == "jsd"
    train_student(config(student_dir, samples_only, tmp_path / "run", max_steps=1))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["loss"] == "rs_kd"


# ----------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_success(out: Path) -> None:
    assert not (out / "COMPLETE").exists() and not (out / "model").exists()


def test_bad_caches_fail_with_one_line(student_dir, train_cache, tmp_path):
    from kdcache.student.train import train_student

    def fails(cache: Path, pattern: str, one_line: bool = True) -> None:
        out = tmp_path / f"out-{cache.name}"
        with pytest.raises(KdcacheError, match=pattern) as info:
            train_student(config(student_dir, cache, out, max_steps=3, shuffle=False))
        assert "\n" not in str(info.value) or not one_line
        _no_success(out)

    version = _copy(train_cache, tmp_path / "version")
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    fails(version, "format v99 is not supported")

    missing = _copy(train_cache, tmp_path / "missing")
    (missing / "shards" / "part-00003.parquet").unlink()
    fails(missing, "part-00003.parquet: shard listed in the manifest is missing")

    truncated = _copy(train_cache, tmp_path / "truncated")
    shard = truncated / "shards" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(truncated, "part-00001.parquet: size")

    garbled = _copy(train_cache, tmp_path / "garbled")
    shard = garbled / "shards" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[200:600] = bytes(400)
    shard.write_bytes(bytes(data))
    fails(garbled, "part-00000.parquet: checksum differs from the manifest")

    # One flipped bit in a value page still decodes (to different numbers): only the
    # checksum catches it, and training must stop before using the shard.
    flipped = _copy(train_cache, tmp_path / "flipped")
    shard = flipped / "shards" / "part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    fails(flipped, "part-00002.parquet: checksum differs from the manifest")

    empty = _copy(train_cache, tmp_path / "empty")
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["totals"]["sequences"] = 0
    (empty / "manifest.json").write_text(json.dumps(manifest))
    fails(empty, "empty")

    fails(tmp_path / "nowhere", "no such cache directory")


def test_output_directory_rules(student_dir, train_cache, tmp_path):
    from kdcache.student.train import train_student

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(KdcacheError, match="holds no train-student run"):
            train_student(config(student_dir, train_cache, other, max_steps=1, **flags))
    assert (other / "notes.txt").read_text() == "mine"

    out = tmp_path / "run"
    train_student(config(student_dir, train_cache, out, max_steps=1))
    with pytest.raises(KdcacheError, match="finished train-student run; use a new --output, or --overwrite"):
        train_student(config(student_dir, train_cache, out, max_steps=1))
    with pytest.raises(KdcacheError, match="already finished"):
        train_student(config(student_dir, train_cache, out, max_steps=1, resume=True))
    train_student(config(student_dir, train_cache, out, max_steps=2, overwrite=True))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2

    # A run that failed before its first checkpoint (here: the student has no weights) holds
    # nothing to resume: the corrected command just runs, without --resume or --overwrite.
    broken = _copy(student_dir, tmp_path / "broken-student")
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    failed = tmp_path / "failed"
    with pytest.raises(KdcacheError, match="cannot load the student"):
        train_student(config(broken, train_cache, failed, max_steps=1))
    train_student(config(student_dir, train_cache, failed, max_steps=1))
    assert (failed / "COMPLETE").exists()


def test_out_of_memory_is_one_line_with_a_hint(student_dir, train_cache, tmp_path, monkeypatch):
    from kdcache.student import train

    def boom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train, "forward_backward", boom)
    out = tmp_path / "oom"
    with pytest.raises(KdcacheError, match=r"out of GPU memory at step 1; lower --micro-batch-tokens \(now 96\), pass --gradient-checkpointing"):
        train.train_student(config(student_dir, train_cache, out, max_steps=2))
    _no_success(out)


def test_option_errors(student_dir, train_cache, sample_cache, tmp_path):
    from kdcache.student.train import train_student

    with pytest.raises(KdcacheError, match="QLoRA.*needs a CUDA GPU|bitsandbytes"):
        train_student(config(student_dir, train_cache, tmp_path / "q", lora_r=4, load_in_4bit=True, max_steps=1))
    with pytest.raises(KdcacheError, match="also pass --lora-r"):
        train_student(config(student_dir, train_cache, tmp_path / "q2", load_in_4bit=True))
    with pytest.raises(KdcacheError, match="rs_kd needs tokens drawn from the teacher's full distribution"):
        train_student(config(student_dir, train_cache, tmp_path / "rs", loss="rs_kd"))
    with pytest.raises(KdcacheError, match=r"beta \(--jsd-beta\) must be"):
        train_student(config(student_dir, train_cache, tmp_path / "b", loss="jsd", jsd_beta=2.0))
    with pytest.raises(KdcacheError, match="holds a sequence of .* tokens, more than --micro-batch-tokens 8"):
        train_student(config(student_dir, train_cache, tmp_path / "mb", micro_batch_tokens=8, max_steps=1))
    assert not (tmp_path / "q").exists() and not (tmp_path / "rs").exists() and not (tmp_path / "mb").exists()


def test_cli_train_student_with_config(student_dir, train_cache, tmp_path):
    from click.testing import CliRunner

    from kdcache.cli import cli

    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(
        "student:\n"
        f"  student: {student_dir}\n  cache: {train_cache}\n  global-batch-size: 48\n"
        "  micro_batch_tokens: 200\n  max_steps: 5\n  device: cpu\n  lr: 1.0e-3\n"
    )
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["train-student", "--config", str(cfg), "--output", str(out), "--max-steps", "1",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["max_steps"] == 1 and settings["global_batch_size"] == 48 and settings["lr"] == 1e-3
    assert "trained 1 steps" in result.output


def test_options_this_run_cannot_use_are_named():
    from kdcache.student.train import TrainConfig

    quiet = TrainConfig(student="s", cache="c", output="o")
    assert quiet.ignored_options() == []
    noisy = TrainConfig(student="s", cache="c", output="o", eval_every=5, best_metric="kl", lora_alpha=64.0)
    notes = noisy.ignored_options()
    assert notes[0].startswith("--eval-every, --best-metric have no effect without --eval-cache")
    assert notes[1].startswith("--lora-alpha has no effect without --lora-r")
    assert TrainConfig(student="s", cache="c", output="o", eval_every=5, eval_cache="e", lora_r=8,
                       lora_alpha=64.0).ignored_options() == []


def test_a_non_finite_step_stops_training_before_it_is_applied(student_dir, train_cache, tmp_path):
    """An exploding run (--lr far too high): the first non-finite loss or gradient stops training
    with one line naming the step and what helps; no model is written, the run is not complete."""
    from kdcache.student.train import train_student

    out = tmp_path / "diverged"
    with pytest.raises(KdcacheError) as err:
        train_student(config(student_dir, train_cache, out, lr=1e30, max_steps=4, save_every=1))
    message = str(err.value)
    assert "\n" not in message and message.startswith("step ") and "non-finite" in message
    assert "lower --lr" in message and "--resume" in message
    step = int(message.split()[1].rstrip(":"))
    assert 2 <= step <= 4
    _no_success(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if r["type"] == "train")
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == step - 1


def test_a_student_without_chat_template_gets_the_teachers(student_dir, tiny_llama, tmp_path, caplog):
    """A chat cache rendered with the teacher's template, a student tokenizer without one: the
    exported model carries the teacher's template (and says so), so apply_chat_template works."""
    import shutil

    from transformers import AutoTokenizer

    from kdcache.student.train import train_student
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache

    rows = [{"messages": [{"role": "user", "content": f"Tell me {i}."}, {"role": "assistant", "content": t}]}
            for i, t in enumerate(texts(12, 5))]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "chat-cache"
    generate_teacher_cache(GenerateConfig(teacher=str(tiny_llama), dataset=str(data), output=str(cache), backend="hf",
                                          top_k=8, sampling="none", max_length=64, dtype="float32", progress=False))
    bare = tmp_path / "student-no-template"
    shutil.copytree(student_dir, bare)
    tok = AutoTokenizer.from_pretrained(bare)
    tok.chat_template = None
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config_path = bare / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tok_config))
    assert AutoTokenizer.from_pretrained(bare).chat_template is None
    with caplog.at_level("WARNING", logger="kdcache"):
        train_student(config(bare, cache, tmp_path / "run", max_steps=1))
    exported = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert exported.chat_template == AutoTokenizer.from_pretrained(tiny_llama).chat_template
    assert exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert any("has no chat template; model/ gets the teacher's" in r.getMessage() for r in caplog.records)
