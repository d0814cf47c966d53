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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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
    assert json.loads((out / "scorer.json").read_text()) == {"backend_used": "hf", "dtype_loaded": "float32",
                                                             "scoring_path": "transformers"}
    monkeypatch.chdir(Path(tiny_llama).parent)
    relative = _cfg(Path(Path(tiny_llama).name), data, out, num_workers=2, worker_index=1)
    (out / "scorer.json").write_text(json.dumps({"backend_used": "vllm", "dtype_loaded": "bfloat16",
                                                 "scoring_path": "vllm-statistics-pooler"}))
    with pytest.raises(KdcacheError, match="scored with backend vllm in bfloat16.*--backend vllm --dtype bfloat16"):
        generate_teacher_cache(relative)
    assert not (out / "shards" / "part-00001.json").exists()
    (out / "scorer.json").write_text(json.dumps({"backend_used": "hf", "dtype_loaded": "float32",
                                                 "scoring_path": "transformers"}))
    assert generate_teacher_cache(relative)["totals"]["sequences"] == 8
    assert verify_cache(out) == []

    # Checks that need no model run before the directory is claimed: a bad --top-k leaves
    # nothing behind, so the corrected command just runs.
    fresh = tmp_path / "fresh"
    with pytest.raises(KdcacheError, match="--top-k 100000 exceeds the teacher's vocabulary"):
        generate_teacher_cache(_cfg(tiny_llama, data, fresh, top_k=100000))
    assert not fresh.exists() or not (fresh / "run.json").exists()
    # One context rule for every backend, checked before anything is claimed (the tiny model
    # has 2048 positions): L tokens need L positions.
    for backend in ("hf", "vllm", "auto"):
        with pytest.raises(KdcacheError, match="context is 2048 positions.*use --max-length 2048"):
            generate_teacher_cache(_cfg(tiny_llama, data, fresh, backend=backend, max_length=2049))
    assert not (fresh / "run.json").exists()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama)
    assert gen._fit_to_teacher(_cfg(tiny_llama, data, fresh, backend="vllm", max_length=2048), Path(tiny_llama), tok) == 0
    unset = _cfg(tiny_llama, data, fresh, backend="hf", max_length=None)
    gen._fit_to_teacher(unset, Path(tiny_llama), tok)
    assert unset.max_length == 2048  # the default, within the context
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
def test_smollm2_gguf_default_mode_through_vllm(tmp_path):
    """The real teacher (its Q4_1 GGUF given directly) on real text through the CLI in the
    default mode: --backend auto picks vLLM's in-engine statistics path; it agrees with the
    transformers backend; kill -9 mid-run and a rerun give byte-identical shards."""
    from kdcache.testing.models import smollm2_gguf_path

    texts = wiki_texts(24)[12:24]
    rows = [{"messages": [{"role": "user", "content": "Summarize this topic."},
                          {"role": "assistant", "content": t}]} for t in texts]
    data = _write_jsonl(tmp_path / "wiki.jsonl", rows)
    common = ["--teacher", str(smollm2_gguf_path()), "--dataset", str(data), "--max-length", "128",
              "--dtype", "float32", "--shard-size", "3", "--no-progress"]
    out = tmp_path / "vllm"
    args = ["generate-teacher", *common, "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list((out / "shards").glob("part-*.json")):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    engine = descendants(proc.pid)
    assert engine, "vLLM's engine runs in processes of its own"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(list((out / "shards").glob("part-*.json")))
    assert first < 4 and not (out / "manifest.json").exists(), "the kill should land mid-run"
    # the engine's processes go down with it (they would otherwise keep the model's memory)
    deadline = time.time() + 60
    while time.time() < deadline and any(alive(pid) for pid in engine):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in engine), [pid for pid in engine if alive(pid)]
    vllm_run = _run_cli(*args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=900)
    assert vllm_run.returncode == 0, vllm_run.stderr[-3000:]
    assert "bytes / token" in vllm_run.stdout
    assert json.loads((out / "scorer.json").read_text())["scoring_path"] == "vllm-statistics-pooler"
    # the default output is kdcache's own: no engine logs, library warnings or tracebacks
    noise = [line for line in vllm_run.stderr.splitlines() if line.strip()]
    assert not noise, noise[:5]
    assert verify_cache(out) == []
    # rescoring finished shards gives the same bytes
    shard_bytes = {p.name: p.read_bytes() for p in (out / "shards").glob("part-*.parquet")}
    for index in (0, 3):
        (out / "shards" / f"part-{index:05d}.parquet").unlink()
        (out / "shards" / f"part-{index:05d}.json").unlink()
    (out / "manifest.json").unlink()
    assert _run_cli(*args, timeout=900).returncode == 0
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("part-*.parquet")} == shard_bytes

    hf_run = _run_cli("generate-teacher", *common, "--output", str(tmp_path / "hf"), "--backend", "hf", timeout=900)
    assert hf_run.returncode == 0, hf_run.stderr[-3000:]
    v_man = json.loads((out / "manifest.json").read_text())
    lengths = [len(s.input_ids) for s in CacheReader(out).iter_sequences()]
    assert max(lengths) == 128, "some rows must be cut at --max-length (the context limit case)"
    assert v_man["teacher"]["backend"] == "vllm" and v_man["teacher"]["gguf_sha256"]
    assert v_man["top_k"] == 4 and v_man["sampling"]["mode"] == "tail"
    same_top = positions = same_draws = 0
    for v, h in zip(CacheReader(out).iter_sequences(), CacheReader(tmp_path / "hf").iter_sequences()):
        np.testing.assert_array_equal(v.input_ids, h.input_ids)
        np.testing.assert_array_equal(v.target_positions, h.target_positions)
        same_top += int((v.topk_ids == h.topk_ids).all(axis=1).sum())
        positions += v.num_targets
        # the cache's log-prob quantization (1/512 nat) on top of float32 kernel differences
        assert np.abs(v.topk_logprobs - h.topk_logprobs).max() < 0.01
        assert np.abs(v.target_logprobs - h.target_logprobs).max() < 0.02
        assert np.abs(v.tail_logmass - h.tail_logmass).max() < 1e-3
        for r in range(v.num_targets):
            a, b = slice(v.sample_offsets[r], v.sample_offsets[r + 1]), slice(h.sample_offsets[r], h.sample_offsets[r + 1])
            # a shard orders a position's draws by its own id codes: compare as id -> count
            same_draws += dict(zip(v.sample_ids[a], v.sample_counts[a])) == dict(zip(h.sample_ids[b], h.sample_counts[b]))
    # identical draws except where float32 differences move a point across a flat tail's narrow
    # CDF steps (tests/test_backends.py checks that every clear-margin draw matches)
    assert same_top / positions >= 0.99 and same_draws / positions >= 0.9, (same_top / positions, same_draws / positions)
    summary = json.loads(_run_cli("inspect", str(out), "--json").stdout)
    assert summary["supervised_tokens"] == v_man["totals"]["supervised_tokens"] > 500
    assert 0.3 < summary["mean_topk_mass"] < 1.0


def poisoned_teacher(tiny_llama: Path, out: Path) -> tuple[Path, int]:
    """The tiny Llama with one token's embedding at +inf: wherever that token appears, the
    float32 forward overflows (inf, then NaN through the norm and attention), as a float16
    forward of a real model can. The token is kept out of kdcache's load-time probe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.output_head import PROBE_SEED, PROBE_TOKENS

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    probe = set(torch.randint(0, len(tok), (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(PROBE_SEED))
                .flatten().tolist())
    bad = next(i for i in tok(" fox jumps over the lazy dog")["input_ids"] if i not in probe)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] = float("inf")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, bad


def test_non_finite_teacher_output_never_enters_a_shard(tiny_llama, tmp_path):
    """A teacher whose forward overflows on some rows: the run stops at the first such row with
    one line naming file:row, the position and the likely cause; the shards written before it
    hold only possible values, nothing half-written remains, and a fixed rerun completes."""
    teacher, bad = poisoned_teacher(tiny_llama, tmp_path / "poisoned")
    rows = [{"text": CORPUS[1]}, {"text": CORPUS[2]}, {"text": CORPUS[3]}, {"text": CORPUS[0]}, {"text": CORPUS[4]}]
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "c"
    for overlap in (True, False):
        with pytest.raises(KdcacheError) as err:
            generate_teacher_cache(_cfg(teacher, data, out, shard_size=2, top_k=4, overlap=overlap))
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{data}:4 position ")
        assert "non-finite" in message and "--dtype bfloat16 or --dtype float32" in message
        assert sorted(p.name for p in (out / "shards").glob("part-*.json")) == ["part-00000.json"]
        assert not list((out / "shards").glob(".*tmp*")) and not (out / "manifest.json").exists()
    from kdcache.cache.reader import read_shard_file
    from kdcache.cache.records import QUANTIZED_MASS_TOLERANCE, scores_problem

    for scores in read_shard_file(out / "shards" / "part-00000.parquet"):
        assert scores_problem(scores, QUANTIZED_MASS_TOLERANCE) is None
    # the same settings with the real teacher: a new directory completes
    assert generate_teacher_cache(_cfg(tiny_llama, data, tmp_path / "ok", shard_size=2, top_k=4))


def test_verify_rejects_a_shard_holding_impossible_values(tiny_llama, tmp_path):
    """A shard written by an older kdcache from a NaN forward (top-k log-probs 0, tail -inf:
    four certainties) passes every checksum; verify still names it."""
    from kdcache.cache.manifest import write_json_atomic
    from kdcache.cache.reader import read_shard_file
    from kdcache.cache.writer import write_shard

    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": CORPUS[i]} for i in range(4)])
    out = tmp_path / "c"
    generate_teacher_cache(_cfg(tiny_llama, data, out, shard_size=2, top_k=4))
    seqs = list(read_shard_file(out / "shards" / "part-00001.parquet"))
    seqs[1].topk_logprobs[3] = 0.0
    seqs[1].tail_logmass[3] = -np.inf
    record = write_shard(out, 1, seqs, 4)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1] = record.to_json()
    write_json_atomic(out / "manifest.json", manifest)
    problems = verify_cache(out)
    assert len(problems) == 1 and "part-00001.parquet" in problems[0]
    assert f"{seqs[1].source} position {int(seqs[1].target_positions[3])}" in problems[0]
    assert "masses sum to" in problems[0]
    result = _run_cli("verify", str(out))
    assert result.returncode == 1 and "DAMAGED" in result.stderr


def test_a_teacher_that_overflows_everywhere_is_refused_at_load(tiny_llama, tmp_path):
    """Every logit non-finite (the whole forward overflows in this dtype): one line at load,
    before any directory is claimed, with the dtype to use instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("inf"))
    model.save_pretrained(tmp_path / "inf")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "inf")
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": CORPUS[0]}])
    with pytest.raises(KdcacheError, match="non-finite logits.*--dtype bfloat16 or float32") as err:
        generate_teacher_cache(_cfg(tmp_path / "inf", data, tmp_path / "c"))
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "c").glob("shards/part-*"))


def _prompt_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}: {CORPUS[i % 6]}"}]} for i in range(n)]


def test_generate_mode_writes_then_scores_the_responses(tiny_llama, tmp_path):
    """--mode generate: phase 1 samples the teacher's responses with the rollout engine (one
    file per shard, freed before scoring), phase 2 scores prompt + response in any cache mode;
    the response tokens are the targets, --max-length bounds prompt + response, and rescoring
    a shard after deleting it gives the same bytes."""
    from transformers import AutoTokenizer

    from kdcache.data.example import TokenizedExample
    from kdcache.teacher.base import ScoringSettings
    from kdcache.teacher.hf_backend import HFBackend

    data = _write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows(6))
    out = tmp_path / "gen"
    cfg = dict(mode="generate", top_k=4, sampling="tail", samples=8, max_new_tokens=12, temperature=0.8, top_p=0.95,
               max_length=40, shard_size=3, seed=5)
    manifest = generate_teacher_cache(_cfg(tiny_llama, data, out, **cfg))
    assert manifest["mode"] == "generate" and manifest["totals"]["sequences"] == 6
    assert json.loads((out / "scorer.json").read_text())["generation_engine"] == "hf"
    assert not list((out / "generations").glob("*.json")), "phase 1 files are removed once the shards are recorded"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    seqs = list(CacheReader(out).iter_sequences())
    backend = HFBackend(tiny_llama, dtype="float32")
    settings = ScoringSettings(top_k=4, num_samples=8, sample_tail=True, seed=5)
    for s in seqs:
        prompt = tok.apply_chat_template(_prompt_rows(6)[s.seq_id]["messages"], add_generation_prompt=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        assert s.input_ids[: len(prompt)].tolist() == list(prompt)
        assert s.target_positions.tolist() == list(range(len(prompt), len(s.input_ids)))
        assert 1 <= s.num_targets <= 12 and len(s.input_ids) <= 40
        rescored = list(backend.score([TokenizedExample(s.seq_id, s.source, s.input_ids, s.target_positions)],
                                      settings))[0]
        np.testing.assert_array_equal(rescored.topk_ids, s.topk_ids)
        for r in range(s.num_targets):  # the cache orders a position's draws by id code
            a, b = slice(s.sample_offsets[r], s.sample_offsets[r + 1]), slice(rescored.sample_offsets[r],
                                                                           rescored.sample_offsets[r + 1])
            assert dict(zip(s.sample_ids[a], s.sample_counts[a])) == dict(zip(rescored.sample_ids[b],
                                                                             rescored.sample_counts[b]))
    shard = (out / "shards" / "part-00001.parquet").read_bytes()
    (out / "shards" / "part-00001.parquet").unlink()
    (out / "shards" / "part-00001.json").unlink()
    (out / "manifest.json").unlink()
    generate_teacher_cache(_cfg(tiny_llama, data, out, **cfg))
    assert (out / "shards" / "part-00001.parquet").read_bytes() == shard
    # other sampling settings are other content: refused in the same directory
    with pytest.raises(KdcacheError, match="different settings"):
        generate_teacher_cache(_cfg(tiny_llama, data, out, **{**cfg, "temperature": 0.5}))


@pytest.mark.slow
def test_generate_mode_through_vllm(tiny_llama, tmp_path):
    """--mode generate with vLLM installed: vLLM's generation engine writes the responses and is
    shut down, then the statistics engine scores them (default cache mode)."""
    data = _write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows(4))
    out = tmp_path / "gen"
    result = _run_cli("generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data), "--output", str(out),
                      "--mode", "generate", "--max-new-tokens", "10", "--max-length", "64", "--dtype", "float32",
                      "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    scorer = json.loads((out / "scorer.json").read_text())
    assert scorer["generation_engine"] == "vllm" and scorer["scoring_path"] == "vllm-statistics-pooler"
    assert verify_cache(out) == []
    seqs = list(CacheReader(out).iter_sequences())
    assert len(seqs) == 4 and all(1 <= s.num_targets <= 10 for s in seqs)
    assert all(s.topk_ids.shape[1] == 4 and s.sample_offsets[-1] > 0 for s in seqs)
