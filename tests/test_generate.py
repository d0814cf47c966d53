"""Stage one end to end: CLI, resume after kill -9, workers, refusal of other settings, bad
rows, and the real SmolLM2 teacher through real vLLM checked against the transformers backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache.reader import CacheReader
from kdcache.cache.stats import verify_cache
from kdcache.errors import KdcacheError
from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache
from tests.conftest import CORPUS, wiki_texts

def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat_rows(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Question {i}: {CORPUS[i % 6]}"},
                      {"role": "assistant", "content": CORPUS[(i + 1) % 6] + f" Answer {i}."}]}
        for i in range(n)
    ]


def _cfg(teacher: Path, dataset: Path, out: Path, **kw) -> GenerateConfig:
    base = dict(teacher=str(teacher), dataset=str(dataset), output=str(out), backend="hf", top_k=8,
                sampling="none", shard_size=4, max_length=64, dtype="float32", progress=False)
    return GenerateConfig(**{**base, **kw})


def _content(cache: Path) -> list[tuple]:
    """Everything a student reads, in seq_id order (file bytes may differ run to run)."""
    out = []
    for s in CacheReader(cache).iter_sequences():
        out.append((s.seq_id, s.input_ids.tolist(), s.target_positions.tolist(), s.topk_ids.tolist(),
                    np.round(s.topk_logprobs, 3).tolist()))
    return out


def _run_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def test_chat_cache_stores_only_assistant_targets(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(10))
    manifest = generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "cache"))
    assert manifest["totals"]["sequences"] == 10 and manifest["totals"]["shards"] == 3
    assert manifest["dataset"]["format"] == "messages"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for seq in CacheReader(tmp_path / "cache").iter_sequences():
        targets = tok.decode(seq.input_ids[seq.target_positions])
        assert targets.startswith(CORPUS[(seq.seq_id + 1) % 6][:10]) and "Question" not in targets
        assert (seq.topk_ids < len(tok)).all()
        # the stored target log-prob is the teacher's log-prob of the actual token: when that
        # token is in the top-k, both agree within the quantization bound
        hit = seq.topk_ids == seq.input_ids[seq.target_positions][:, None]
        rows, cols = np.nonzero(hit)
        assert np.allclose(seq.topk_logprobs[rows, cols], seq.target_logprobs[rows], atol=4e-3)
    assert verify_cache(tmp_path / "cache") == []


def test_resume_after_kill_gives_the_same_content(tiny_llama, tmp_path):
    rows = [{"text": " ".join(CORPUS[i % 6 : i % 6 + 3]) * 2} for i in range(200)]
    data = _write_jsonl(tmp_path / "text.jsonl", rows)
    reference = tmp_path / "reference"
    generate_teacher_cache(_cfg(tiny_llama, data, reference))

    out = tmp_path / "killed"
    args = ["generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data), "--output", str(out),
            "--backend", "hf", "--top-k", "8", "--sampling", "none", "--shard-size", "4", "--max-length", "64", "--dtype", "float32",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "shards").glob("part-*.json"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "shards").glob("part-*.json")))
    assert 2 <= finished < 50, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    with pytest.raises(KdcacheError, match="unfinished"):
        CacheReader(out)

    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "sequences" in result.stdout
    assert _content(out) == _content(reference)
    assert verify_cache(out) == []
    assert not list((out / "shards").glob(".*tmp*"))


def test_workers_fill_disjoint_shards_and_the_last_completes(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": CORPUS[i % 6] * 2} for i in range(18)])
    out = tmp_path / "shared"
    assert generate_teacher_cache(_cfg(tiny_llama, data, out, num_workers=3, worker_index=2)) is None
    assert sorted(p.name for p in (out / "shards").glob("part-*.json")) == ["part-00002.json"]
    assert generate_teacher_cache(_cfg(tiny_llama, data, out, num_workers=3, worker_index=0)) is None
    manifest = generate_teacher_cache(_cfg(tiny_llama, data, out, num_workers=3, worker_index=1))
    assert manifest is not None and manifest["totals"]["sequences"] == 18 and manifest["totals"]["shards"] == 5
    single = tmp_path / "single"
    generate_teacher_cache(_cfg(tiny_llama, data, single))
    assert _content(out) == _content(single)


def test_default_mode_is_the_quality_benchmark_winner(tiny_llama, tmp_path):
    """No mode flags: top-4 + tail bucket + 8 systematic draws from outside the top-4, which
    train-student's --loss auto trains with tail_rs (benchmarks/results/quality_gpu.md)."""
    from kdcache.student.compat import ignored_draws_warning, resolve_loss

    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in CORPUS[:6]])
    result = _run_cli("generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data), "--output",
                      str(tmp_path / "c"), "--backend", "hf", "--max-length", "64", "--dtype", "float32", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["top_k"] == 4
    assert manifest["sampling"] == {"mode": "tail", "num_samples": 8, "seed": 0, "draws": "systematic"}
    assert resolve_loss("auto", manifest) == "tail_rs"
    assert ignored_draws_warning("tail_rs", manifest, "c") is None
    warning = ignored_draws_warning("reverse_kl", manifest, "c")
    assert warning is not None and "ignores the draws" in warning and "--top-k 64 --sampling none" in warning
    # top-k plus full-distribution draws: auto keeps the top-k loss, and says the draws go unused
    mixed = {**manifest, "sampling": {"mode": "random", "num_samples": 8, "seed": 0, "draws": "systematic"}}
    assert resolve_loss("auto", mixed) == "tail" and ignored_draws_warning("rs_kd", mixed, "c") is None
    assert "--loss rs_kd trains on them" in ignored_draws_warning("tail", mixed, "c")
    seqs = list(CacheReader(tmp_path / "c").iter_sequences())
    assert seqs and all(s.topk_ids.shape[1] == 4 for s in seqs)
    for seq in seqs:  # every position holds 8 draws, over one or more ids outside its top-4
        cumulative = np.concatenate([[0], np.cumsum(seq.sample_counts)])
        assert (np.diff(cumulative[seq.sample_offsets]) == 8).all()
        for i, (a, b) in enumerate(zip(seq.sample_offsets[:-1], seq.sample_offsets[1:])):
            assert not np.isin(seq.sample_ids[a:b], seq.topk_ids[i]).any()


def test_other_settings_and_foreign_directories_are_refused(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in CORPUS[:6]])
    generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "c"))
    result = _run_cli("generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data),
                      "--output", str(tmp_path / "c"), "--backend", "hf", "--top-k", "16", "--sampling", "none", "--shard-size", "4",
                      "--max-length", "64", "--dtype", "float32")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "different settings (top_k differ" in errors[0]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(KdcacheError, match="not empty and holds no kdcache run"):
        generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "other"))


def test_a_run_that_finished_no_shard_can_start_over_with_fixed_settings(tiny_llama, tmp_path):
    """The usual fix after a bad first attempt (a flag, a row) is accepted on the same --output,
    and a worker still running with the old settings stops before recording a shard."""
    from kdcache.teacher.generate import check_claim

    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(6))
    out = tmp_path / "c"
    with pytest.raises(KdcacheError, match="no supervised tokens within max_length=5"):
        generate_teacher_cache(_cfg(tiny_llama, data, out, max_length=5))
    old_hash = json.loads((out / "run.json").read_text())["settings_hash"]
    manifest = generate_teacher_cache(_cfg(tiny_llama, data, out, max_length=64))
    assert manifest["totals"]["sequences"] == 6
    assert json.loads((out / "run.json").read_text())["settings"]["max_length"] == 64
    with pytest.raises(KdcacheError, match="took over this directory"):
        check_claim(out, old_hash)
    assert verify_cache(out) == []


def test_a_damaged_shard_is_rescored_after_deleting_it_as_the_message_says(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": CORPUS[i % 6] + f" Row {i}."} for i in range(10)])
    out = tmp_path / "c"
    generate_teacher_cache(_cfg(tiny_llama, data, out))
    reference = _content(out)
    shard = out / "shards" / "part-00001.parquet"
    blob = bytearray(shard.read_bytes())
    blob[2000:2040] = bytes(b ^ 0xFF for b in blob[2000:2040])  # same size, different bytes
    shard.write_bytes(bytes(blob))
    problems = verify_cache(out)
    assert len(problems) == 1 and "part-00001.parquet: checksum mismatch" in problems[0]
    with pytest.raises(KdcacheError, match="delete it and rerun the same generate-teacher command"):
        _content(out)
    shard.unlink()
    generate_teacher_cache(_cfg(tiny_llama, data, out))
    assert verify_cache(out) == [] and _content(out) == reference


def test_sampling_cache_records_its_draw_scheme(tiny_llama, tmp_path):
    """--draws is part of what a cache holds: recorded in the manifest (systematic by default),
    shown by inspect, and a rerun with the other scheme is refused; a manifest from before the
    field existed reads as iid."""
    from kdcache.cache.manifest import sampling_draws

    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in CORPUS[:4]])
    manifest = generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "c", sampling="random", samples=16))
    assert manifest["sampling"] == {"mode": "random", "num_samples": 16, "seed": 0, "draws": "systematic"}
    assert sampling_draws(manifest) == "systematic"
    shown = _run_cli("inspect", str(tmp_path / "c"))
    assert shown.returncode == 0 and "N=16 (systematic draws)" in shown.stdout
    result = _run_cli("generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data),
                      "--output", str(tmp_path / "c"), "--backend", "hf", "--top-k", "8", "--sampling", "none", "--shard-size", "4",
                      "--max-length", "64", "--dtype", "float32", "--sampling", "random", "--samples", "16",
                      "--draws", "iid")
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1 and "different settings (sampling differ" in errors[0]
    legacy = {**manifest, "sampling": {"mode": "random", "num_samples": 16, "seed": 0}}
    assert sampling_draws(legacy) == "iid"
    iid = generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "iid", sampling="random", samples=16, draws="iid"))
    assert sampling_draws(iid) == "iid"
    assert _content(tmp_path / "iid") == _content(tmp_path / "c")  # the draws change, top-k does not
    counts = {name: np.concatenate([q.sample_counts for q in CacheReader(tmp_path / name).iter_sequences()])
              for name in ("c", "iid")}
    # systematic: 16 draws spread evenly, so far fewer repeats of one id than independent draws
    assert counts["c"].max() < counts["iid"].max() or counts["c"].var() < counts["iid"].var()
    with pytest.raises(KdcacheError, match="--draws must be"):
        _cfg(tiny_llama, data, tmp_path / "x", sampling="random", draws="sobol").check()


def test_same_run_is_recognized_and_a_mixed_scorer_is_refused(tiny_llama, tmp_path, monkeypatch):
    """The teacher path given relative or absolute, and --backend auto or its resolution, are the
    same run; a worker whose teacher loaded with another backend or dtype stops before writing."""
    from kdcache.teacher import generate as gen

    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": CORPUS[i % 6]} for i in range(8)])
    out = tmp_path / "c"
    assert generate_teacher_cache(_cfg(tiny_llama, data, out, num_workers=2, worker_index=0)) is None
    assert json.loads((out / "scorer.json").read_text()) == {"backend_used": "hf", "dtype_loaded": "float32"}
    monkeypatch.chdir(Path(tiny_llama).parent)
    relative = _cfg(Path(Path(tiny_llama).name), data, out, num_workers=2, worker_index=1)
    (out / "scorer.json").write_text(json.dumps({"backend_used": "vllm", "dtype_loaded": "bfloat16"}))
    with pytest.raises(KdcacheError, match="scored with backend vllm in bfloat16.*--backend vllm --dtype bfloat16"):
        generate_teacher_cache(relative)
    assert not (out / "shards" / "part-00001.json").exists()
    (out / "scorer.json").write_text(json.dumps({"backend_used": "hf", "dtype_loaded": "float32"}))
    assert generate_teacher_cache(relative)["totals"]["sequences"] == 8
    assert verify_cache(out) == []

    # Checks that need no model run before the directory is claimed: a bad --top-k leaves
    # nothing behind, so the corrected command just runs.
    fresh = tmp_path / "fresh"
    with pytest.raises(KdcacheError, match="--top-k 100000 exceeds the teacher's vocabulary"):
        generate_teacher_cache(_cfg(tiny_llama, data, fresh, top_k=100000))
    assert not fresh.exists() or not (fresh / "run.json").exists()
    # vLLM scores L tokens as a request of L + 1: a --max-length the context cannot hold is
    # refused up front (the tiny model has 2048 positions), the transformers backend is fine.
    with pytest.raises(KdcacheError, match="context is 2048 positions.*use --max-length 2047"):
        generate_teacher_cache(_cfg(tiny_llama, data, fresh, backend="vllm", max_length=2048))
    assert gen._context_error(_cfg(tiny_llama, data, fresh, backend="hf", max_length=2048), Path(tiny_llama)) is None
    for bad in (dict(dtype="float33"), dict(mode="generate", temperature=-1.0), dict(mode="generate", top_p=0.0),
                dict(temperature=3.0), dict(draws="iid"), dict(num_workers=0)):
        with pytest.raises(KdcacheError):
            _cfg(tiny_llama, data, fresh, **bad).check()
    assert generate_teacher_cache(_cfg(tiny_llama, data, fresh))["totals"]["sequences"] == 8


def test_bad_rows_stop_with_one_line_or_are_counted(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": CORPUS[0]}) + "\n{not json\n" + json.dumps({"text": "  "}) + "\n"
                    + json.dumps({"text": CORPUS[1]}) + "\n")
    base = ["generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data), "--backend", "hf",
            "--top-k", "4", "--sampling", "none", "--dtype", "float32", "--no-progress"]
    result = _run_cli(*base, "--output", str(tmp_path / "strict"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("kdcache: error:") and f"{data}:2" in errors[0]
    assert not (tmp_path / "strict" / "manifest.json").exists()
    assert not list((tmp_path / "strict").glob("shards/part-*.parquet"))

    result = _run_cli(*base, "--output", str(tmp_path / "lenient"), "--skip-bad-rows")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["totals"]["sequences"] == 2 and manifest["totals"]["skipped_rows"] == 2
    skipped = manifest["shards"][0]["skipped"]
    assert [s["source"] for s in skipped] == [f"{data}:2", f"{data}:3"]


def test_overlapped_writes_match_serial_and_stop_on_a_failed_write(tiny_llama, tmp_path, monkeypatch):
    """Tokenize-ahead and write-behind threads change no byte; a failing write or a bad row in a
    later shard stops the run with its one-line error, keeping the shards finished before it."""
    import errno

    from kdcache.cache import storage

    rows = [{"text": CORPUS[i % 6] + f" Row {i}."} for i in range(14)]
    data = _write_jsonl(tmp_path / "text.jsonl", rows)

    def shard_hashes(cache: Path) -> list[str]:
        return [s["sha256"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]

    serial = generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "serial", overlap=False))
    assert serial["totals"]["shards"] == 4
    generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "overlapped"))
    assert shard_hashes(tmp_path / "overlapped") == shard_hashes(tmp_path / "serial")

    real_write = storage._fsync_write

    def no_space_for_shard_2(path, payload):
        if "part-00002.parquet" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(storage, "_fsync_write", no_space_for_shard_2)
    out = tmp_path / "full"
    with pytest.raises(KdcacheError, match="part-00002.parquet: disk full"):
        generate_teacher_cache(_cfg(tiny_llama, data, out))
    assert sorted(p.name for p in (out / "shards").glob("part-*.json")) == ["part-00000.json", "part-00001.json"]
    assert not (out / "manifest.json").exists() and not list((out / "shards").glob(".*tmp*"))
    monkeypatch.setattr(storage, "_fsync_write", real_write)
    generate_teacher_cache(_cfg(tiny_llama, data, out))  # rerun after freeing space: completes
    assert shard_hashes(out) == shard_hashes(tmp_path / "serial")

    lines = data.read_text().splitlines()
    lines[6] = "{not json"  # row 7 lies in shard 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(KdcacheError, match=f"{bad}:7"):
        generate_teacher_cache(_cfg(tiny_llama, bad, tmp_path / "bad"))
    assert [p.name for p in (tmp_path / "bad" / "shards").glob("part-*.json")] == ["part-00000.json"]
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_missing_teacher_is_one_line(tmp_path):
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    result = _run_cli("generate-teacher", "--teacher", str(tmp_path / "no-such-model"), "--dataset", str(data),
                      "--output", str(tmp_path / "c"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("kdcache: error:") and "no-such-model" in errors[0]


@pytest.mark.slow
def test_smollm2_gguf_through_vllm_matches_transformers(tmp_path):
    """The real teacher (its Q4_1 GGUF given directly) through real vLLM on CPU, end to end
    via the CLI, against the transformers backend on the same real text (fp32 both)."""
    from kdcache.testing.models import smollm2_gguf_path

    texts = wiki_texts(24)[12:24]
    rows = [{"messages": [{"role": "user", "content": "Summarize this topic."},
                          {"role": "assistant", "content": t}]} for t in texts]
    data = _write_jsonl(tmp_path / "wiki.jsonl", rows)
    common = ["--teacher", str(smollm2_gguf_path()), "--dataset", str(data), "--top-k", "32", "--sampling", "none",
              "--max-length", "128", "--dtype", "float32", "--shard-size", "6", "--no-progress"]
    vllm_run = _run_cli("generate-teacher", *common, "--output", str(tmp_path / "vllm"), "--backend", "vllm",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=900)
    assert vllm_run.returncode == 0, vllm_run.stderr[-3000:]
    assert "bytes / token" in vllm_run.stdout
    hf_run = _run_cli("generate-teacher", *common, "--output", str(tmp_path / "hf"), "--backend", "hf", timeout=900)
    assert hf_run.returncode == 0, hf_run.stderr[-3000:]

    v_man = json.loads((tmp_path / "vllm" / "manifest.json").read_text())
    lengths = [len(s.input_ids) for s in CacheReader(tmp_path / "vllm").iter_sequences()]
    assert max(lengths) == 128, "some rows must be cut at --max-length (the engine's context limit case)"
    assert v_man["teacher"]["backend"] == "vllm" and v_man["teacher"]["gguf_sha256"]
    overlaps, diffs = [], []
    for v, h in zip(CacheReader(tmp_path / "vllm").iter_sequences(), CacheReader(tmp_path / "hf").iter_sequences()):
        np.testing.assert_array_equal(v.input_ids, h.input_ids)
        np.testing.assert_array_equal(v.target_positions, h.target_positions)
        for vi, vl, hi, hl in zip(v.topk_ids, v.topk_logprobs, h.topk_ids, h.topk_logprobs):
            common_ids, vpos, hpos = np.intersect1d(vi, hi, return_indices=True)
            overlaps.append(len(common_ids) / len(vi))
            diffs.append(np.abs(vl[vpos] - hl[hpos]).max())
        assert np.abs(v.target_logprobs - h.target_logprobs).max() < 0.02
    assert np.mean(overlaps) >= 0.97, np.mean(overlaps)
    assert np.median(diffs) < 0.01 and np.percentile(diffs, 99) < 0.05
    inspect = _run_cli("inspect", str(tmp_path / "vllm"), "--json")
    summary = json.loads(inspect.stdout)
    assert summary["supervised_tokens"] == v_man["totals"]["supervised_tokens"] > 500
    assert 0.5 < summary["mean_topk_mass"] < 1.0
