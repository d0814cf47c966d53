"""On-policy rollouts: the sampling engines (vLLM and transformers), `kdcache rollout`
(determinism across layouts, resume after kill -9, adapters), rollout rows through
generate-teacher into a v3 cache, the round-mixing check, and `kdcache eval --generate`.

Everything runs on tiny random models with the trained test tokenizer. vLLM engines start
slowly (~30-70 s on 2 cores), so the vLLM tests share one engine per model.
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

from kdcache.cache.quantize import FINE_LIMIT, MAX_ABS_ERROR_COARSE, MAX_ABS_ERROR_FINE
from kdcache.cache.reader import CacheReader
from kdcache.cache.records import TeacherScores
from kdcache.data import SkippedRow, open_dataset, reference_text, tokenize_rows
from kdcache.data.example import TokenizedExample
from kdcache.errors import BadRowError, KdcacheError
from kdcache.rollout.engine import SamplingSettings, policy_logprobs, sample_seed
from kdcache.rollout.provenance import cache_rollout, check_rollout_rounds
from kdcache.rollout.run import RolloutConfig, run_rollout
from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache
from tests.conftest import CORPUS

# ------------------------------------------------------------------------- helpers


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat_prompts(path: Path, n: int) -> Path:
    """Chat rows ending with the assistant's reference answer (not shown to the model)."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: {CORPUS[i % 6]}"},
                          {"role": "assistant", "content": CORPUS[(i + 1) % 6]}]} for i in range(n)]
    return _write_jsonl(path, rows)


def _rows(rollout_dir: Path) -> list[tuple]:
    """Everything a rollout row says about a sample, in file order."""
    return [(r["prompt_seq_id"], r["sample_index"], list(r["prompt_ids"]), list(r["response_ids"]),
             [float(x) for x in r["response_logprobs"]], r["finish_reason"], r["response"], r["reference"])
            for _, _, r in open_dataset(rollout_dir).rows()]


def _cfg(student: Path, dataset: Path, out: Path, **kw) -> RolloutConfig:
    base = dict(student=str(student), dataset=str(dataset), output=str(out), backend="hf", samples_per_prompt=2,
                max_new_tokens=12, max_length=128, shard_size=3, dtype="float32", progress=False)
    return RolloutConfig(**{**base, **kw})


def _teacher_cfg(teacher: Path, dataset: Path, out: Path, **kw) -> GenerateConfig:
    base = dict(teacher=str(teacher), dataset=str(dataset), output=str(out), backend="hf", top_k=4, sampling="none",
                max_length=128, dtype="float32", progress=False)
    return GenerateConfig(**{**base, **kw})


def _recomputed_logmu(model, completion, settings: SamplingSettings, vocab: int) -> np.ndarray:
    """Teacher-forced ``log mu`` of a completion's tokens, from a full forward of prompt + response."""
    ids = torch.as_tensor(np.concatenate([completion.prompt_ids, completion.response_ids]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    p = len(completion.prompt_ids)
    z = logits[p - 1 : p - 1 + completion.num_tokens, :vocab]
    logmu = policy_logprobs(z, settings.temperature, settings.top_p)
    return logmu.gather(1, torch.as_tensor(completion.response_ids, dtype=torch.long)[:, None])[:, 0].numpy()


def _examples(tokenizer, n: int, start: int = 0) -> list[TokenizedExample]:
    return [TokenizedExample(i, f"mem:{i + 1}", np.asarray(tokenizer(CORPUS[i % 6])["input_ids"][:10], np.int32),
                             np.zeros(0, np.int32)) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def rollout_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama whose generation_config.json adds, as a second EOS id, the token it samples
    most often after the test prompts: responses then end at EOS as well as at the budget,
    and the EOS ids must be read from generation_config.json (the tokenizer names only <|im_end|>)."""
    from kdcache.rollout.engine import HFEngine

    out = tmp_path_factory.mktemp("rollout_model") / "model"
    shutil.copytree(tiny_llama, out)
    engine = HFEngine(out, dtype="float32")
    prompts = list(tokenize_rows(open_dataset(_chat_prompts(out.parent / "p.jsonl", 6)).rows(), engine.tokenizer, 128,
                                 prompt_only=True))
    sampled = np.concatenate([c.response_ids for c in engine.sample(prompts, SamplingSettings(2, 1.0, 1.0, 12, 99))])
    engine.close()
    sampled = sampled[~np.isin(sampled, engine.tokenizer.all_special_ids)]
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen["eos_token_id"] = [engine.tokenizer.eos_token_id, int(np.bincount(sampled).argmax())]
    gen_path.write_text(json.dumps(gen))
    return out


# ------------------------------------------------------------------ fast: settings, math


def test_sampling_settings_refuse_bad_flags():
    SamplingSettings().check()
    for bad, flag in [(dict(samples_per_prompt=0), "--samples-per-prompt"), (dict(temperature=-1), "--temperature"),
                      (dict(temperature=1e-7), "--temperature"), (dict(top_p=0), "--top-p"),
                      (dict(max_new_tokens=0), "--max-new-tokens"),
                      (dict(temperature=0, samples_per_prompt=2), "--samples-per-prompt 1")]:
        with pytest.raises(KdcacheError, match=flag):
            SamplingSettings(**bad).check()
    assert SamplingSettings(max_new_tokens=10, max_length=20).budget(15) == 5
    assert SamplingSettings(max_new_tokens=10).budget(15) == 10


def test_sample_seeds_depend_only_on_seed_prompt_and_index():
    seeds = {sample_seed(s, i, j) for s in range(3) for i in range(50) for j in range(4)}
    assert len(seeds) == 600 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


def test_policy_logprobs_is_temperature_then_nucleus():
    p = torch.tensor([[0.5, 0.3, 0.12, 0.08]], dtype=torch.float64)
    # top-p 0.75: the two most likely ids hold 0.8 >= 0.75, the rest are dropped and never drawn
    mu = policy_logprobs(p.log(), 1.0, 0.75).exp()
    assert torch.allclose(mu, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    # temperature 2: softmax(log p / 2); top-p 1 keeps everything
    tempered = p.sqrt() / p.sqrt().sum()
    assert torch.allclose(policy_logprobs(p.log(), 2.0, 1.0).exp(), tempered)
    # the most likely id is always kept, even for a tiny top-p
    assert torch.allclose(policy_logprobs(p.log(), 1.0, 0.01).exp(), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(policy_logprobs(p.log(), 1.0, 0.85).exp()[0, 3], torch.zeros((), dtype=torch.float64))


# ----------------------------------------------------------------- fast: rollout rows


def _rollout_row(tok, **kw) -> dict:
    from kdcache.teacher.loading import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tok)
    row = {"prompt_seq_id": 0, "sample_index": 0, "prompt_source": "p.jsonl:1", "prompt_ids": [5, 6, 7],
           "response_ids": [8, 9, tok.eos_token_id], "response_logprobs": [-1.5, -0.25, 0.0], "finish_reason": "stop",
           "prompt": "x", "response": "y", "reference": "the reference", "tokenizer": f"{fp['vocab_size']}:{fp['vocab_sha256']}"}
    return {**row, **kw}


def test_rollout_rows_are_used_as_they_are(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    row = _rollout_row(tok)
    [ex] = tokenize_rows([(0, "r:1", row)], tok, max_length=64)
    assert ex.input_ids.tolist() == [5, 6, 7, 8, 9, tok.eos_token_id]  # no re-tokenization of the text
    assert ex.target_positions.tolist() == [3, 4, 5]
    assert ex.rollout_logprobs.dtype == np.float32 and ex.rollout_logprobs.tolist() == [-1.5, -0.25, 0.0]
    # truncation cuts the targets and their log-probs together
    [cut] = tokenize_rows([(0, "r:1", row)], tok, max_length=5)
    assert cut.target_positions.tolist() == [3, 4] and cut.rollout_logprobs.tolist() == [-1.5, -0.25]
    # generate mode: the prompt ids alone
    [prompt] = tokenize_rows([(0, "r:1", row)], tok, max_length=64, prompt_only=True)
    assert prompt.input_ids.tolist() == [5, 6, 7] and prompt.rollout_logprobs is None
    assert reference_text(row, "rollout") == "the reference"


@pytest.mark.parametrize("change, message", [
    ({"response_logprobs": [-1.0]}, "one log-prob per response token"),
    ({"response_logprobs": [-1.0, 0.5, 0.0]}, "finite log-probs"),
    ({"response_ids": []}, "'response_ids' is empty"),
    ({"prompt_ids": [5, -1]}, "non-negative integer"),
    ({"response_logprobs": None}, "'response_logprobs' is null"),
])
def test_bad_rollout_rows_name_the_row(tiny_llama, change, message):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(BadRowError, match=message) as err:
        list(tokenize_rows([(0, "roll.parquet:7", _rollout_row(tok, **change))], tok, max_length=64))
    assert str(err.value).startswith("roll.parquet:7: ")
    skipped = list(tokenize_rows([(0, "roll.parquet:7", _rollout_row(tok, **change))], tok, 64, skip_bad_rows=True))
    assert isinstance(skipped[0], SkippedRow)


def test_rows_of_another_tokenizer_are_refused(tiny_llama):
    from transformers import AutoTokenizer

    from kdcache.testing.models import train_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    other = train_tokenizer(["Zebras quantum jazz vexed wizards."] * 10, 300)
    row = _rollout_row(other)  # ids 5..9 exist in both, but the vocabularies differ
    with pytest.raises(KdcacheError, match="another tokenizer"):
        list(tokenize_rows([(0, "r:1", row)], tok, max_length=64, skip_bad_rows=True))
    # a tokenizer whose vocabulary is a prefix of this one's (same merges, fewer of them) is fine
    prefix = train_tokenizer(CORPUS[:12], 300)
    assert len(list(tokenize_rows([(0, "r:1", _rollout_row(prefix))], tok, max_length=64))) == 1


def test_reference_text_per_format():
    assert reference_text({"prompt": "q", "response": "a"}, "prompt_response") == "a"
    assert reference_text({"prompt": "q", "completion": "c"}, "prompt_response") == "c"
    assert reference_text({"instruction": "i", "output": "o"}, "alpaca") == "o"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert reference_text({"messages": chat}, "messages") == "a"
    assert reference_text({"messages": chat[:1]}, "messages") is None
    assert reference_text({"text": "t"}, "text") is None


# ------------------------------------------------------------------- fast: cache v3


def _scores(seq_id: int, rollout: bool) -> TeacherScores:
    rng = np.random.default_rng(seq_id)
    s = 5
    lps = np.sort(np.log(rng.dirichlet(np.ones(8), size=s)), axis=1)[:, ::-1][:, :4].astype(np.float32)
    ids = np.stack([rng.permutation(50)[:4] for _ in range(s)]).astype(np.int32)
    from kdcache.cache.records import tail_logmass_from_topk

    return TeacherScores(seq_id, f"m:{seq_id}", rng.integers(0, 50, 9).astype(np.int32), np.arange(4, 9, dtype=np.int32),
                         (-rng.random(s) * 3).astype(np.float32), ids, lps, tail_logmass_from_topk(lps),
                         rollout_logprobs=(-rng.random(s) * 12).astype(np.float32) if rollout else None)


def test_cache_v3_keeps_rollout_logprobs_and_still_reads_v2(tmp_path):
    import pyarrow.parquet as pq

    from kdcache.cache import format as fmt
    from kdcache.cache.reader import read_shard_file
    from kdcache.cache.stats import verify_shard
    from kdcache.cache.writer import build_shard_table, encode_parquet, file_sha256, write_shard

    results = [_scores(i, rollout=True) for i in range(4)]
    record = write_shard(tmp_path, 0, results, top_k=4)
    back = list(read_shard_file(tmp_path / record.file))
    for want, got in zip(results, back):
        bound = np.where(want.rollout_logprobs >= -FINE_LIMIT, MAX_ABS_ERROR_FINE, MAX_ABS_ERROR_COARSE) + 1e-6
        assert np.all(np.abs(got.rollout_logprobs - want.rollout_logprobs) <= bound)
        assert np.array_equal(got.topk_ids, want.topk_ids)
    assert pq.ParquetFile(tmp_path / record.file).schema_arrow.remove_metadata() == fmt.shard_schema(3)
    # fixed data: the column holds empty lists and reads back as None
    plain = write_shard(tmp_path / "plain", 0, [_scores(i, rollout=False) for i in range(2)], top_k=4)
    assert all(s.rollout_logprobs is None for s in read_shard_file(tmp_path / "plain" / plain.file))
    with pytest.raises(KdcacheError, match="rollout log-probs missing"):
        build_shard_table([_scores(0, True), _scores(1, False)], 4)
    # a v2 shard (no rollout column) is still read and verified
    table, meta, stats = build_shard_table([_scores(i, rollout=False) for i in range(2)], 4)
    table = table.drop_columns(["rollout_logprob_q"]).cast(fmt.shard_schema(2))
    meta[fmt.META_VERSION], meta[fmt.META_SHARD_INDEX] = b"2", b"0"
    v2 = tmp_path / "v2" / "shards" / "part-00000.parquet"
    v2.parent.mkdir(parents=True)
    v2.write_bytes(encode_parquet(table, meta).to_pybytes())
    old = list(read_shard_file(v2))
    assert len(old) == 2 and old[0].rollout_logprobs is None and np.array_equal(old[1].input_ids, _scores(1, False).input_ids)
    entry = {"file": "shards/part-00000.parquet", "bytes": v2.stat().st_size, "sha256": file_sha256(v2), "rows": 2,
             "supervised_tokens": stats["supervised_tokens"], "first_seq_id": 0, "last_seq_id": 1}
    assert verify_shard(tmp_path / "v2", entry, 4) is None


def _manifest(rollout_round: int | None, student: str = "a" * 64) -> dict:
    if rollout_round is None:
        return {"dataset": {"source": "fixed.jsonl"}}
    return {"dataset": {"rollout": {"round": rollout_round, "student": {"spec": "s", "weights_sha256": student}}}}


def test_check_rollout_rounds():
    assert check_rollout_rounds([("fixed", _manifest(None))]) is None
    same = check_rollout_rounds([("c0", _manifest(1)), ("fixed", _manifest(None)), ("c1", _manifest(1))])
    assert same["round"] == 1
    with pytest.raises(KdcacheError, match=r"c0 and c2 hold samples of different policies \(round 1 vs round 2\).*"
                                           r"--allow-mixed-rounds"):
        check_rollout_rounds([("c0", _manifest(1)), ("c2", _manifest(2))])
    with pytest.raises(KdcacheError, match="students"):
        check_rollout_rounds([("c0", _manifest(1)), ("c1", _manifest(1, "b" * 64))])
    assert check_rollout_rounds([("c0", _manifest(1)), ("c2", _manifest(2))], allow_mixed_rounds=True) is None


def test_rouge_l_values():
    from kdcache.rollout.evaluate import rouge_l

    scores = rouge_l(["The cats sat on the mat.", "a b c d", "alpha beta"], ["the cat sat on the mat", "a x c y", "gamma"])
    assert scores[0] == pytest.approx(1.0)  # case, punctuation and the plural stem away
    assert scores[1] == pytest.approx(0.5)  # LCS "a c": P = R = 2/4
    assert scores[2] == 0.0


def test_rollout_cli_errors_are_one_line(tiny_llama, tmp_path, capsys):
    from kdcache.cli import main

    prompts = _chat_prompts(tmp_path / "p.jsonl", 2)
    for args, message in [
        (["--student", str(tmp_path / "missing")], "must be a local model directory"),
        (["--student", str(tiny_llama), "--temperature", "-1"], "--temperature must be 0"),
        (["--student", str(tiny_llama), "--num-workers", "2", "--worker-index", "2"], "--worker-index"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["rollout", "--dataset", str(prompts), "--output", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("kdcache: error: ") and message in err
        assert len(err.splitlines()) == 1


def test_unfinished_or_damaged_rollout_is_refused(tiny_llama, tmp_path):
    prompts = _chat_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "ro"
    assert run_rollout(_cfg(tiny_llama, prompts, out, num_workers=2, worker_index=0, shard_size=2,
                            max_new_tokens=3)) is None
    with pytest.raises(KdcacheError, match="unfinished rollout"):
        open_dataset(out)
    manifest = run_rollout(_cfg(tiny_llama, prompts, out, num_workers=2, worker_index=1, shard_size=2, max_new_tokens=3))
    assert manifest["totals"]["rows"] == 8 and len(manifest["shards"]) == 2
    shard = out / manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(KdcacheError, match="checksum differs"):
        open_dataset(out).fingerprint()
    # other settings in the same directory are refused once a shard is finished
    with pytest.raises(KdcacheError, match="different settings"):
        run_rollout(_cfg(tiny_llama, prompts, out, shard_size=2, max_new_tokens=3, seed=5))


# --------------------------------------------------------- slow: transformers engine


@pytest.mark.slow
def test_hf_engine_records_the_sampling_distribution(rollout_model, tiny_qwen_padded):
    from kdcache.rollout.engine import HFEngine

    for model_dir in (rollout_model, tiny_qwen_padded):
        engine = HFEngine(model_dir, dtype="float32")
        examples = _examples(engine.tokenizer, 3)
        for settings in (SamplingSettings(2, 1.0, 1.0, 16, seed=1), SamplingSettings(2, 0.7, 0.9, 16, seed=2),
                         SamplingSettings(1, 0.0, 1.0, 8)):
            completions = list(engine.sample(examples, settings))
            assert [(c.seq_id, c.sample_index) for c in completions] == [
                (ex.seq_id, j) for ex in examples for j in range(settings.samples_per_prompt)]
            for c in completions:
                assert (c.response_ids < engine.vocab_size).all()  # padded rows never sampled
                assert c.logprobs.dtype == np.float32 and c.logprobs.shape == c.response_ids.shape
                if settings.greedy:
                    assert (c.logprobs == 0).all()
                    continue
                want = _recomputed_logmu(engine.net, c, settings, engine.vocab_size)
                assert np.allclose(c.logprobs, want, atol=1e-4), (settings, c.logprobs, want)
                stops = np.isin(c.response_ids, engine.eos_ids)
                assert c.finish_reason == ("stop" if stops[-1] else "length") and not stops[:-1].any()
            # the same sample whatever else is in the call
            alone = list(engine.sample(examples[1:2], settings))
            assert [a.response_ids.tolist() for a in alone] == [
                c.response_ids.tolist() for c in completions if c.seq_id == 1]
        engine.close()
    assert len(engine.eos_ids) >= 1


@pytest.mark.slow
def test_rollout_rows_do_not_depend_on_layout_or_file_format(rollout_model, tmp_path):
    prompts = _chat_prompts(tmp_path / "p.jsonl", 7)
    one = run_rollout(_cfg(rollout_model, prompts, tmp_path / "one"))
    assert one["totals"]["rows"] == 14 and one["totals"]["stopped"] > 0  # the second EOS id is used
    reference = _rows(tmp_path / "one")
    assert all(r[7] == CORPUS[(r[0] + 1) % 6] for r in reference)  # the final assistant turn is the reference
    for kw in (dict(shard_size=2, num_workers=2, worker_index=1), dict(shard_size=2, num_workers=2, worker_index=0)):
        run_rollout(_cfg(rollout_model, prompts, tmp_path / "two", **kw))
    assert _rows(tmp_path / "two") == reference
    run_rollout(_cfg(rollout_model, prompts, tmp_path / "jsonl", shard_size=5, output_format="jsonl"))
    assert sorted(p.name for p in (tmp_path / "jsonl" / "shards").glob("*.jsonl")) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert _rows(tmp_path / "jsonl") == reference


@pytest.mark.slow
def test_rollout_resumes_after_kill_with_identical_rows(rollout_model, tmp_path):
    prompts = _chat_prompts(tmp_path / "p.jsonl", 12)
    run_rollout(_cfg(rollout_model, prompts, tmp_path / "reference", shard_size=1, max_new_tokens=24))
    out = tmp_path / "killed"
    args = ["rollout", "--student", str(rollout_model), "--dataset", str(prompts), "--output", str(out), "--backend", "hf",
            "--samples-per-prompt", "2", "--max-new-tokens", "24", "--max-length", "128", "--shard-size", "1",
            "--dtype", "float32", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "shards").glob("part-*.json"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "shards").glob("part-*.json")))
    assert 2 <= finished < 12, "the kill should land mid-run"
    assert not (out / "rollout.json").exists()
    result = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "24 responses to 12 prompts" in result.stdout
    assert "Loading weights" not in result.stderr  # transformers' bars stay out of the CLI
    assert _rows(out) == _rows(tmp_path / "reference")
    assert not list((out / "shards").glob(".*tmp*"))


@pytest.mark.slow
def test_rollout_to_teacher_cache_records_policy_and_logprobs(rollout_model, tiny_llama, tmp_path):
    prompts = _chat_prompts(tmp_path / "p.jsonl", 5)
    for r in (0, 1):
        run_rollout(_cfg(rollout_model, prompts, tmp_path / f"ro{r}", round=r, seed=r))
        generate_teacher_cache(_teacher_cfg(tiny_llama, tmp_path / f"ro{r}", tmp_path / f"cache{r}"))
    rows = [r for _, _, r in open_dataset(tmp_path / "ro0").rows()]
    reader = CacheReader(tmp_path / "cache0")
    assert reader.manifest["format_version"] == 3 and reader.manifest["dataset"]["format"] == "rollout"
    rollout = cache_rollout(reader.manifest)
    ro_manifest = json.loads((tmp_path / "ro0" / "rollout.json").read_text())
    assert rollout["round"] == 0 and rollout["student"]["weights_sha256"] == ro_manifest["student"]["weights_sha256"]
    assert rollout["sampling"]["samples_per_prompt"] == 2 and rollout["engine"]["backend"] == "hf"
    seqs = list(reader.iter_sequences())
    assert len(seqs) == len(rows) == 10
    for seq, row in zip(seqs, rows):
        assert seq.input_ids.tolist() == list(row["prompt_ids"]) + list(row["response_ids"])
        start = len(row["prompt_ids"])
        assert seq.target_positions.tolist() == list(range(start, start + len(row["response_ids"])))
        want = np.asarray(row["response_logprobs"], np.float32)
        bound = np.where(want >= -FINE_LIMIT, MAX_ABS_ERROR_FINE, MAX_ABS_ERROR_COARSE) + 1e-6
        assert np.all(np.abs(seq.rollout_logprobs - want) <= bound)
    # the teacher is the student's own base here: the teacher's log-prob of each sampled token
    # is the student's, up to quantization (temperature 1, top-p 1)
    assert all(np.abs(s.target_logprobs - s.rollout_logprobs).max() < 5e-3 for s in seqs)
    manifests = [(tmp_path / f"cache{r}", CacheReader(tmp_path / f"cache{r}").manifest) for r in (0, 1)]
    with pytest.raises(KdcacheError, match="round 0 vs round 1"):
        check_rollout_rounds(manifests)


@pytest.mark.slow
def test_adapter_student_is_merged_before_sampling(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "lm_head"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(merged)
    prompts = _chat_prompts(tmp_path / "p.jsonl", 3)
    manifest = run_rollout(_cfg(tmp_path / "adapter", prompts, tmp_path / "ro_adapter"))
    run_rollout(_cfg(merged, prompts, tmp_path / "ro_merged"))
    run_rollout(_cfg(tiny_llama, prompts, tmp_path / "ro_base"))
    assert _rows(tmp_path / "ro_adapter") == _rows(tmp_path / "ro_merged") != _rows(tmp_path / "ro_base")
    assert manifest["student"]["adapter"]["path"] == str((tmp_path / "adapter").resolve())
    assert manifest["student"]["path"] == str(Path(tiny_llama).resolve())


@pytest.mark.slow
def test_eval_generate_cli(rollout_model, tiny_qwen_padded, tmp_path):
    from click.testing import CliRunner

    from kdcache.cli import cli
    from kdcache.rollout.evaluate import rouge_l

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    prompts = _chat_prompts(tmp_path / "p.jsonl", 6)
    common = ["eval", "--generate", "--model", str(rollout_model), "--prompts", str(prompts), "--backend", "hf",
              "--teacher-backend", "hf", "--samples-per-prompt", "2", "--max-new-tokens", "12", "--max-length", "128",
              "--dtype", "float32", "--teacher-dtype", "float32"]
    self_kd = json.loads(run(*common, "--teacher", str(rollout_model), "--work-dir", str(tmp_path / "self"), "--json"))
    # the model scored by itself: no divergence, and rkl = teacher_ce - model_ce
    assert abs(self_kd["rkl"]) < 2e-3 and abs(self_kd["rkl_seq"]) < 2e-2
    assert self_kd["rkl"] == pytest.approx(self_kd["teacher_ce"] - self_kd["model_ce"], abs=1e-9)
    rows = [r for _, _, r in open_dataset(tmp_path / "self" / "rollout").rows()]
    assert self_kd["responses"] == len(rows) == 12 and self_kd["prompts"] == 6 and self_kd["rouge_rows"] == 12
    assert self_kd["rouge_l"] == pytest.approx(np.mean(rouge_l([r["reference"] for r in rows], [r["response"] for r in rows])))
    lengths = [len(r["response_ids"]) for r in rows]
    assert self_kd["len_mean"] == pytest.approx(np.mean(lengths)) and self_kd["len_max"] == max(lengths)
    assert self_kd["stop_frac"] == pytest.approx(np.mean([r["finish_reason"] == "stop" for r in rows]))
    assert 0 < self_kd["stop_frac"] < 1 and self_kd["tokens"] == sum(lengths)
    # the plain table, from the kept work directory (nothing is sampled or scored again)
    table = run(*common, "--teacher", str(rollout_model), "--work-dir", str(tmp_path / "self"))
    assert table.split()[0] == "rkl" and "rouge_l" in table and "stop_frac" in table
    # another teacher (same tokenizer, other weights, padded logit rows): a real divergence
    other = json.loads(run(*common, "--teacher", str(tiny_qwen_padded), "--json"))
    assert other["rkl"] > 0.5 and other["model_ce"] == pytest.approx(self_kd["model_ce"], abs=1e-9)


# ------------------------------------------------------------------- slow: vLLM


@pytest.fixture(scope="module")
def vllm_engine(rollout_model):
    from kdcache.rollout.engine import VLLMEngine

    engine = VLLMEngine(rollout_model, dtype="float32", max_model_len=256)
    yield engine
    engine.close()


@pytest.mark.slow
def test_vllm_engine_records_the_sampling_distribution(vllm_engine, rollout_model):
    from transformers import AutoModelForCausalLM

    assert len(vllm_engine.eos_ids) == 2  # the tokenizer's and generation_config.json's
    model = AutoModelForCausalLM.from_pretrained(rollout_model, dtype=torch.float32).eval()
    examples = _examples(vllm_engine.tokenizer, 4)
    stopped = 0
    for settings in (SamplingSettings(3, 1.0, 1.0, 20, seed=1), SamplingSettings(2, 0.7, 0.9, 20, seed=2)):
        completions = list(vllm_engine.sample(examples, settings))
        assert [(c.seq_id, c.sample_index) for c in completions] == [(e.seq_id, j) for e in examples
                                                                     for j in range(settings.samples_per_prompt)]
        for c in completions:
            want = _recomputed_logmu(model, c, settings, vllm_engine.vocab_size)
            assert np.allclose(c.logprobs, want, atol=1e-3), (settings, c.logprobs, want)
            stops = np.isin(c.response_ids, vllm_engine.eos_ids)
            assert c.finish_reason == ("stop" if stops[-1] else "length") and not stops[:-1].any()
            stopped += c.finish_reason == "stop"
        # batching: each prompt alone, and the prompts in reverse order, give the same samples
        by_key = {(c.seq_id, c.sample_index): c.response_ids.tolist() for c in completions}
        alone = [c for ex in examples for c in vllm_engine.sample([ex], settings)]
        reverse = list(vllm_engine.sample(examples[::-1], settings))
        for c in alone + reverse:
            assert c.response_ids.tolist() == by_key[(c.seq_id, c.sample_index)]
    assert stopped > 0
    greedy = list(vllm_engine.sample(examples[:2], SamplingSettings(1, 0.0, 1.0, 6)))
    assert all((c.logprobs == 0).all() for c in greedy)
    with pytest.raises(KdcacheError, match="no room to generate"):
        list(vllm_engine.sample(examples[:1], SamplingSettings(max_new_tokens=4, max_length=5)))


@pytest.mark.slow
def test_vllm_rollout_layouts_and_teacher_cache(vllm_engine, rollout_model, tiny_llama, tmp_path):
    prompts = _chat_prompts(tmp_path / "p.jsonl", 6)
    cfg = dict(backend="vllm", max_length=256)
    manifest = run_rollout(_cfg(rollout_model, prompts, tmp_path / "a", shard_size=6, **cfg), engine=vllm_engine)
    assert manifest["engine"]["backend"] == "vllm"
    for index in (1, 0):
        run_rollout(_cfg(rollout_model, prompts, tmp_path / "b", shard_size=2, num_workers=2, worker_index=index, **cfg),
                    engine=vllm_engine)
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    generate_teacher_cache(_teacher_cfg(tiny_llama, tmp_path / "a", tmp_path / "cache", max_length=256))
    seqs = list(CacheReader(tmp_path / "cache").iter_sequences())
    assert len(seqs) == 12 and all(s.rollout_logprobs is not None for s in seqs)
    # vLLM's log mu against transformers' teacher log p of the same (base) model: within
    # kernel differences and quantization
    assert max(np.abs(s.target_logprobs - s.rollout_logprobs).max() for s in seqs) < 5e-3


@pytest.mark.slow
def test_vllm_never_samples_padded_rows(tiny_qwen_padded):
    from transformers import AutoModelForCausalLM

    from kdcache.rollout.engine import VLLMEngine

    with VLLMEngine(tiny_qwen_padded, dtype="float32", max_model_len=128) as engine:
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen_padded, dtype=torch.float32).eval()
        assert int(model.config.vocab_size) > engine.vocab_size
        settings = SamplingSettings(4, 1.0, 1.0, 24, seed=3)
        completions = list(engine.sample(_examples(engine.tokenizer, 4), settings))
        assert sum(c.num_tokens for c in completions) > 100
        for c in completions:
            assert (c.response_ids < engine.vocab_size).all()
            # normalized over the real vocabulary only (the padded rows hold real mass in this model)
            assert np.allclose(c.logprobs, _recomputed_logmu(model, c, settings, engine.vocab_size), atol=1e-3)
