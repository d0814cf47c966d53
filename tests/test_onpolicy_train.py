"""train-student on the student's own samples: the on-policy losses on a cache of a rollout
(``sampled_rkl`` and the divergences, GKD with lambda = 1), a run mixing that cache with fixed
data (``--mix-cache``/``--lmbda``, each source with its loss, the loss normalized over both),
exact resume of both streams, and the round/student provenance checks.

The rollout is real: the tiny student samples responses (transformers engine), the tiny
teacher scores them through generate-teacher into a v3 cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.reader import CacheReader
from kdcache.errors import KdcacheError
from tests.conftest import CORPUS
from tests.test_train import _train_losses, _weights, config, make_cache, student_dir, train_cache  # noqa: F401


def chat_prompts(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: {CORPUS[i % 6]}"},
                          {"role": "assistant", "content": CORPUS[(i + 1) % 6]}]} for i in range(offset, offset + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rollout_cache(root: Path, student: Path, teacher: Path, *, prompts: int, round_: int = 0, seed: int = 0,
                  samples: int = 2, max_new_tokens: int = 16) -> Path:
    """``kdcache rollout`` of ``student`` (transformers engine) scored by ``teacher`` (top-4)."""
    from kdcache.rollout.run import RolloutConfig, run_rollout
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache

    root.mkdir(parents=True, exist_ok=True)
    data = chat_prompts(root / "prompts.jsonl", prompts)
    run_rollout(RolloutConfig(student=str(student), dataset=str(data), output=str(root / "rollout"), backend="hf",
                              samples_per_prompt=samples, max_new_tokens=max_new_tokens, max_length=128, shard_size=4,
                              dtype="float32", seed=seed, round=round_, progress=False))
    generate_teacher_cache(GenerateConfig(teacher=str(teacher), dataset=str(root / "rollout"), output=str(root / "cache"),
                                          backend="hf", top_k=4, sampling="none", max_length=128, shard_size=8,
                                          dtype="float32", progress=False))
    return root / "cache"


@pytest.fixture(scope="session")
def on_cache(tmp_path_factory, student_dir, tiny_llama) -> Path:  # noqa: F811
    """24 responses of the student to 12 prompts, scored by the tiny teacher (round 0)."""
    return rollout_cache(tmp_path_factory.mktemp("onpolicy"), student_dir, tiny_llama, prompts=12)


@pytest.fixture(scope="session")
def round1_cache(tmp_path_factory, student_dir, tiny_llama) -> Path:  # noqa: F811
    """A small rollout labelled round 1 (another seed)."""
    return rollout_cache(tmp_path_factory.mktemp("round1"), student_dir, tiny_llama, prompts=3, round_=1, seed=1,
                         samples=1, max_new_tokens=8)


def on_config(student: Path, cache: Path, out: Path, **kw):
    return config(student, cache, out, **{"micro_batch_tokens": 256, "loss": "sampled_rkl", **kw})


# ------------------------------------------------------------------------ data layer


def test_micro_batches_carry_teacher_and_rollout_logprobs(on_cache, train_cache):  # noqa: F811
    from kdcache.student.data import micro_batches, padding_micro_batch

    seqs = list(CacheReader(on_cache).iter_sequences())[:5]
    mbs = micro_batches(seqs, 128, 4, with_rollout=True)
    want_lp = np.concatenate([s.target_logprobs for s in seqs])
    want_mu = np.concatenate([s.rollout_logprobs for s in seqs])
    got = sorted(zip(torch.cat([mb.targets.target_logprobs for mb in mbs]).tolist(),
                     torch.cat([mb.targets.rollout_logprobs for mb in mbs]).tolist()))
    assert got == sorted(zip(want_lp.astype(np.float32).tolist(), want_mu.astype(np.float32).tolist()))
    moved = mbs[0].to(torch.device("cpu"))
    assert torch.equal(moved.targets.rollout_logprobs, mbs[0].targets.rollout_logprobs)
    assert moved.targets.target_logprobs is moved.teacher_logprobs
    pad = padding_micro_batch(4, with_rollout=True)
    assert pad.targets.rollout_logprobs.shape == (0,) and pad.targets.target_logprobs.shape == (0,)
    assert pad.to(torch.device("cpu")).targets.rollout_logprobs.shape == (0,)
    fixed = list(CacheReader(train_cache).iter_sequences())[:2]
    assert micro_batches(fixed, 128, 8)[0].targets.rollout_logprobs is None  # fixed data: none, and not needed
    with pytest.raises(KdcacheError, match="no rollout log-probs"):
        micro_batches(fixed, 128, 8, with_rollout=True)


def _sequences(batch, source: int) -> list[tuple[int, ...]]:
    """The input ids of each sequence of ``source`` in a StepBatch (sorted: packing reorders)."""
    out = []
    for mb, index in zip(batch.micro, batch.source_of):
        if index == source:
            ids = mb.input_ids[0].tolist()
            bounds = np.cumsum([0] + mb.seq_lengths)
            out += [tuple(ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return sorted(out)


def test_source_batches_take_the_lmbda_share_of_each_global_batch(on_cache, train_cache):  # noqa: F811
    """Every global batch holds round(lmbda * B) sequences of --cache and the rest of --mix-cache,
    each in its own single-cache order, on one process or split over ranks; resumable."""
    from kdcache.student.data import DataPosition, GlobalBatches, input_length
    from kdcache.student.losses import KDLossConfig
    from kdcache.student.sources import Source, SourceBatches, batch_shares

    on, fixed = CacheReader(on_cache), CacheReader(train_cache)
    assert batch_shares(7, 0.6) == (4, 3) and batch_shares(8, 0.5) == (4, 4) and batch_shares(4, 0.3) == (1, 3)
    for b, lmbda in ((4, 0.1), (4, 0.9), (1, 0.5)):
        with pytest.raises(KdcacheError, match="both need at least one"):
            batch_shares(b, lmbda)
    sources = [Source("--cache", on, KDLossConfig("sampled_rkl"), 4), Source("--mix-cache", fixed, KDLossConfig(), 3)]
    kwargs = dict(seed=2, window_shards=1, shuffle=True, micro_batch_tokens=4096)
    fresh = [DataPosition(), DataPosition()]
    stream = SourceBatches(sources, fresh, **kwargs)
    alone = [GlobalBatches(on, 4, 2, window_shards=1), GlobalBatches(fixed, 3, 2, window_shards=1)]
    history, epochs = [], []
    for _ in range(8):  # 24 rollout sequences, 4 per step: crosses into the second epoch of --cache
        batch = next(stream)
        for index, single in enumerate(alone):
            seqs, epoch = next(single)
            assert _sequences(batch, index) == sorted(tuple(s.input_ids[: input_length(s)].tolist()) for s in seqs)
            assert batch.epochs[index] == epoch
        for mb, index, cfg in zip(batch.micro, batch.source_of, batch.loss_configs):
            assert cfg is sources[index].loss_config
            assert (mb.targets.rollout_logprobs is not None) == (index == 0)
        assert batch.sequences == [4, 3]
        assert stream.positions == [a.position for a in alone]
        history.append((stream.positions, [_sequences(batch, i) for i in (0, 1)]))
        epochs.append(batch.epochs)
    assert epochs == [[0, 0]] * 6 + [[1, 0]] * 2  # 48 fixed sequences, 3 per step: still the first epoch
    # Resume from a recorded pair of positions: the same batches follow.
    resumed = SourceBatches(sources, history[2][0], **kwargs)
    for positions, seqs in history[3:6]:
        batch = next(resumed)
        assert resumed.positions == positions and [_sequences(batch, i) for i in (0, 1)] == seqs
    # Two ranks: each source's share is split over them; together they hold the global batch.
    ranks = [SourceBatches(sources, fresh, rank=r, world_size=2, **kwargs) for r in range(2)]
    for positions, seqs in history[:4]:
        parts = [next(r) for r in ranks]
        assert all(p.sequences == [4, 3] for p in parts)
        assert [sorted(_sequences(parts[0], i) + _sequences(parts[1], i)) for i in (0, 1)] == seqs
        assert ranks[0].positions == ranks[1].positions == positions


def test_mixed_loss_is_normalized_over_both_sources(student_dir, on_cache, train_cache):  # noqa: F811
    """forward_backward over micro-batches of both sources, each with its loss, gives the value and
    gradients of a dense float64 reference: (sum of sampled_rkl terms + sum of tail terms) / all tokens."""
    from kdcache.student.losses import KDLossConfig, TeacherTargets, sparse_kd_loss
    from kdcache.student.modeling import load_student
    from kdcache.student.sources import Source
    from kdcache.student.train import Runtime, forward_backward

    on_cfg, fixed_cfg = KDLossConfig("sampled_rkl", clip_ratio=0.2), KDLossConfig("tail", ce_weight=0.2)
    on_seqs = list(CacheReader(on_cache).iter_sequences())[:3]
    fixed_seqs = list(CacheReader(train_cache).iter_sequences())[:3]
    sources = [Source("--cache", CacheReader(on_cache), on_cfg, 3), Source("--mix-cache", CacheReader(train_cache),
                                                                          fixed_cfg, 3)]
    micro = sources[0].micro_batches(on_seqs, 96) + sources[1].micro_batches(fixed_seqs, 96)
    configs = [on_cfg] * len(sources[0].micro_batches(on_seqs, 96)) + [fixed_cfg] * len(sources[1].micro_batches(fixed_seqs, 96))
    total = sum(mb.num_targets for mb in micro)

    model = load_student(student_dir, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():  # a nudge away from the sampler, so some importance weights leave the clip range
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    labels = ["cache" if c is on_cfg else "mix" for c in configs]
    metrics = forward_backward(model, micro, configs, Runtime(torch.device("cpu"), None, "sdpa"), total, sources=labels)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = model.to(torch.float64)
    ref.zero_grad(set_to_none=True)
    value = torch.zeros((), dtype=torch.float64)
    for seqs, cfg in ((on_seqs, on_cfg), (fixed_seqs, fixed_cfg)):
        for s in seqs:
            ids = torch.from_numpy(s.input_ids.astype(np.int64))[None]
            pos = torch.from_numpy(s.target_positions.astype(np.int64))
            logits = ref(ids).logits[0, pos - 1]
            targets = TeacherTargets(
                topk_ids=torch.from_numpy(s.topk_ids.astype(np.int64)),
                topk_logprobs=torch.from_numpy(s.topk_logprobs).double(),
                tail_logmass=torch.from_numpy(s.tail_logmass).double(),
                target_logprobs=torch.from_numpy(s.target_logprobs).double(),
                rollout_logprobs=None if s.rollout_logprobs is None else torch.from_numpy(s.rollout_logprobs).double())
            value = value + sparse_kd_loss(logits, targets, ids[0, pos], cfg, num_tokens=total)[0]
    value.backward()
    assert metrics["loss"] == pytest.approx(float(value.detach()), rel=1e-5)
    assert 0 < metrics["clip_frac"] * total  # some tokens are clipped, some not (clip_frac is over all tokens here)
    assert metrics["kd_cache"] + metrics["kd_mix"] == pytest.approx(metrics["kd"], rel=1e-6)
    for name, param in ref.named_parameters():
        torch.testing.assert_close(got[name].double(), param.grad, rtol=2e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------ training end to end


def test_sampled_rkl_needs_a_rollout_cache(student_dir, train_cache, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from kdcache.cli import cli
    from kdcache.student.train import train_student

    with pytest.raises(KdcacheError, match=r"--loss sampled_rkl trains on the student's own samples, but this cache "
                                           r"scored fixed data"):
        train_student(on_config(student_dir, train_cache, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(cli, ["eval", "--model", str(student_dir), "--cache", str(train_cache), "--loss",
                                      "sampled_rkl", "--device", "cpu"])
    assert result.exit_code != 0 and "scored fixed data" in str(result.exception or result.output)


def test_sampled_rkl_first_step_is_the_rollouts_reverse_kl(student_dir, on_cache, tmp_path):  # noqa: F811
    """Trained from the student that sampled the cache, the first step's importance weights are 1
    (up to the cache's quantization): nothing is clipped, and its rkl metric and loss are the
    teacher-scored reverse KL of the rollout, mean(log mu - log p); later steps move off-policy."""
    from kdcache.student.evaluate import evaluate_model
    from kdcache.student.losses import KDLossConfig
    from kdcache.student.train import train_student

    seqs = list(CacheReader(on_cache).iter_sequences())
    want = float(np.mean(np.concatenate([s.rollout_logprobs.astype(np.float64) - s.target_logprobs for s in seqs])))
    # `kdcache eval --loss sampled_rkl` of the sampler itself: the same value
    assert evaluate_model(str(student_dir), str(on_cache), device="cpu",
                          loss_config=KDLossConfig("sampled_rkl"))["loss"] == pytest.approx(want, abs=3e-3)
    out = tmp_path / "run"
    summary = train_student(on_config(student_dir, on_cache, out, global_batch_size=len(seqs), max_steps=3, lr=1e-2))
    first, *rest = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert first["rkl"] == pytest.approx(want, abs=3e-3) and first["loss"] == pytest.approx(want, abs=3e-3)
    assert first["clip_frac"] == 0.0 and first["tokens"] == sum(s.num_targets for s in seqs)
    assert rest[-1]["clip_frac"] > 0  # the policy moved beyond the clip range of the rollout's
    assert summary["loss"] == "sampled_rkl" and (out / "COMPLETE").exists()
    # No clipping: --clip-ratio none is plain importance sampling (never clipped).
    train_student(on_config(student_dir, on_cache, tmp_path / "noclip", global_batch_size=len(seqs), max_steps=2,
                            lr=1e-2, clip_ratio=None))
    assert all(json.loads(line)["clip_frac"] == 0.0 for line in (tmp_path / "noclip" / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_divergences_train_on_student_samples(student_dir, on_cache, tmp_path, loss):  # noqa: F811
    """GKD with lambda = 1: a divergence on the rollout's cached top-k, lowered by training."""
    from kdcache.student.evaluate import evaluate_model
    from kdcache.student.losses import KDLossConfig
    from kdcache.student.train import train_student

    objective = KDLossConfig(loss)
    before = evaluate_model(str(student_dir), str(on_cache), device="cpu", loss_config=objective)["loss"]
    train_student(on_config(student_dir, on_cache, tmp_path / loss, loss=loss, max_steps=8, lr=1e-2))
    after = evaluate_model(str(tmp_path / loss / "model"), str(on_cache), device="cpu", loss_config=objective)["loss"]
    assert after < 0.9 * before, (before, after)


def test_mixed_run_resumes_exactly_and_logs_each_source(student_dir, on_cache, train_cache, tmp_path):  # noqa: F811
    from kdcache.student.train import train_student

    common = dict(mix_cache=str(train_cache), lmbda=0.5, mix_loss="tail", global_batch_size=6, max_steps=9,
                  save_every=1, lr=3e-3)
    whole = tmp_path / "whole"
    summary = train_student(on_config(student_dir, on_cache, whole, **common))
    assert summary["mix_loss"] == "tail" and summary["lmbda"] == 0.5 and summary["steps"] == 9
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["sequences"] == 6 and r["sequences_mix"] == 3
        assert 0 < r["tokens_mix"] < r["tokens"]
        for key in ("rkl", "clip_frac", "kd_cache", "kd_mix", "ce_cache", "ce_mix"):
            assert np.isfinite(r[key]), key
        # the total is the token-weighted mean of the two sources' losses
        n_mix = r["tokens_mix"]
        mean = (r["kd_cache"] * (r["tokens"] - n_mix) + r["kd_mix"] * n_mix) / r["tokens"]
        assert r["kd"] == pytest.approx(mean, rel=1e-5)
    assert records[-1]["epoch"] == 1 and records[-1]["mix_epoch"] == 0  # 24 rollout sequences, 3 per step
    state = json.loads((whole / "last" / "trainer_state.json").read_text())
    assert state["mix_position"]["epoch"] == 0 and state["position"]["epoch"] == 1

    split = tmp_path / "split"

    def stop(step: int, _record: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(on_config(student_dir, on_cache, split, **common), on_step=stop)
    with pytest.raises(KdcacheError, match="lmbda differ"):
        train_student(on_config(student_dir, on_cache, split, resume=True, **{**common, "lmbda": 0.4}))
    train_student(on_config(student_dir, on_cache, split, resume=True, **common))
    assert _train_losses(split) == pytest.approx(_train_losses(whole), rel=1e-6, abs=1e-7)
    a, b = _weights(whole / "model"), _weights(split / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_mix_options_are_checked(student_dir, on_cache, train_cache, tmp_path):  # noqa: F811
    from kdcache.student.train import TrainConfig, train_student
    from kdcache.testing.models import build_tiny_model

    cases = [
        (dict(lmbda=0.5), "--lmbda is the share of each global batch drawn from --cache; it needs --mix-cache"),
        (dict(mix_cache=str(train_cache)), "--mix-cache needs --lmbda"),
        (dict(mix_cache=str(train_cache), lmbda=1.0), r"--lmbda must be in \(0, 1\)"),
        (dict(mix_cache=str(train_cache), lmbda=0.1, global_batch_size=4),
         r"gives 0 sequence\(s\) from --cache .*\(raise --global-batch-size, e.g. to 6\)"),
        (dict(mix_cache=str(train_cache), lmbda=0.5, mix_loss="sampled_rkl"),
         "--mix-loss sampled_rkl trains on the student's own samples, but this cache scored fixed data"),
        (dict(clip_ratio=0.0), "--clip-ratio must be > 0"),
    ]
    for options, message in cases:
        with pytest.raises(KdcacheError, match=message):
            train_student(on_config(student_dir, on_cache, tmp_path / "x", **options))
    words = [f"other words {i} for another vocabulary" for i in range(40)]
    other_teacher = build_tiny_model(tmp_path / "other_teacher", words, vocab_size=300, hidden_size=64, num_layers=1)
    other = make_cache(tmp_path / "other", other_teacher, words[:2], top_k=2)
    with pytest.raises(KdcacheError, match="--mix-cache was made with another tokenizer"):
        train_student(on_config(student_dir, on_cache, tmp_path / "x", mix_cache=str(other), lmbda=0.5))
    assert not (tmp_path / "x").exists()
    notes = TrainConfig(student="s", cache="c", output="o", mix_loss="tail").ignored_options()
    assert notes == ["--mix-loss has no effect without --mix-cache"]


def test_rounds_are_not_mixed_unless_allowed(student_dir, tiny_llama, on_cache, round1_cache, tmp_path, caplog):  # noqa: F811
    from kdcache.student.train import train_student

    with pytest.raises(KdcacheError, match=r"different policies \(round 0 vs round 1\).*--allow-mixed-rounds"):
        train_student(on_config(student_dir, on_cache, tmp_path / "a", eval_cache=str(round1_cache), max_steps=1))
    with pytest.raises(KdcacheError, match="round 0 vs round 1"):
        train_student(on_config(student_dir, on_cache, tmp_path / "a", mix_cache=str(round1_cache), lmbda=0.5,
                                mix_loss="sampled_rkl", max_steps=1))
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        train_student(on_config(student_dir, on_cache, tmp_path / "b", eval_cache=str(round1_cache), max_steps=1,
                                allow_mixed_rounds=True))
    assert not [r for r in caplog.records if "not of the student being trained" in r.getMessage()]
    caplog.clear()
    # Another student than the one that sampled: trained all the same, with a warning.
    with caplog.at_level(logging.WARNING, logger="kdcache"):
        train_student(on_config(tiny_llama, on_cache, tmp_path / "c", max_steps=1))
    assert [r for r in caplog.records if "not of the student being trained" in r.getMessage()]


# ------------------------------------------------------------------ under torchrun


@pytest.mark.slow
def test_mixed_run_under_torchrun_matches_one_process(student_dir, on_cache, train_cache, tmp_path):  # noqa: F811
    """FSDP2 on 2 ranks, sampled_rkl on the rollout and tail on fixed data in each global batch:
    the losses per step (total and per source), token counts and final weights of one process.
    Each source's share (3 sequences) is split unevenly over the 2 ranks. Without clipping: the
    clip is a step function of the importance weight, so the ranks' other summation order (about
    1e-7 relative) can flip a token at its edge and move a weight by more than the tolerance. lr 1e-3:
    at 3e-3 one weight of 8192 (one with a near-zero gradient, which AdamW's normalization
    amplifies) ended 5.6e-5 apart while every step's losses agreed to 2e-6."""
    from kdcache.student.train import train_student
    from tests.test_distributed import LOSS_RTOL, _ok, assert_same_run, cli_args, torchrun, train_records

    options = dict(max_steps=4, micro_batch_tokens=256, lr=1e-3, loss="sampled_rkl", clip_ratio=None, mix_cache=train_cache,
                   lmbda=0.5, mix_loss="tail")
    single = tmp_path / "single"
    train_student(config(student_dir, on_cache, single, **{**options, "mix_cache": str(train_cache)}))
    two = tmp_path / "two"
    _ok(torchrun(2, cli_args(student_dir, on_cache, two, **options)))
    assert_same_run(two, single)
    for a, b in zip(train_records(two), train_records(single)):
        assert (a["tokens_mix"], a["sequences_mix"]) == (b["tokens_mix"], b["sequences_mix"])
        for key in ("rkl", "clip_frac", "kd_cache", "kd_mix"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL, abs=1e-7), key
    state = json.loads((two / "last" / "trainer_state.json").read_text())
    assert state["mix_position"] == json.loads((single / "last" / "trainer_state.json").read_text())["mix_position"]
