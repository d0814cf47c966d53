"""Caches on object storage, against a real S3 protocol server on 127.0.0.1 (moto's standalone
server, started here): the store's primitives, shards that count only once written and
recorded, read-ahead, one-line errors for bad URLs and credentials, and stage one with two
workers (one killed with SIGKILL, then rerun) followed by verify, inspect, eval and training
from the bucket, with shards byte-identical to a local-disk run."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

from kdcache.cache.reader import CacheReader
from kdcache.cache.stats import summarize, verify_cache
from kdcache.cache.storage import ObjectStore, open_store
from kdcache.cache.writer import load_shard_record, write_shard
from kdcache.errors import KdcacheError
from kdcache.teacher.generate import claim_directory, finalize, record_worker
from tests.conftest import CORPUS
from tests.test_cache_format import _random_scores
from tests.test_generate import _run_cli, _write_jsonl


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket; the AWS variables point this process (and ``env`` subprocesses) at it."""
    from pyarrow import fs as pafs

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": s3_endpoint,
           "AWS_DEFAULT_REGION": "us-east-1"}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"kdcache-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_endpoint, region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
    return SimpleNamespace(url=f"s3://{bucket}", bucket=bucket, env=env, endpoint=s3_endpoint)


def _set_auth(endpoint: str, unauthenticated_requests: str) -> None:
    """moto's switch for checking credentials ("0": from now on; "inf": never)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=unauthenticated_requests.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()


def _main(capsys, *argv: str) -> str:
    """Run the CLI in-process; its stdout."""
    from kdcache.cli import main

    main(list(argv))
    return capsys.readouterr().out


def _main_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; the one stderr line of a refusal (exit status 2)."""
    from kdcache.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------ the store


@pytest.mark.parametrize("scheme", ["s3", "memory"])  # memory:// goes through fsspec + FSSpecHandler
def test_store_primitives(scheme, request):
    url = request.getfixturevalue("s3").url + "/c" if scheme == "s3" else f"memory://kdcache-{uuid.uuid4().hex[:8]}/c"
    store = open_store(url)
    assert isinstance(store, ObjectStore) and not store.exists() and store.list() == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("run.json")
    store.prepare()
    store.write_json("shards/part-00000.json", {"a": 1}, indent=1)
    assert store.read_json("shards/part-00000.json") == {"a": 1}
    assert bytes(store.read_bytes("shards/part-00000.json")) == b'{\n "a": 1\n}\n'  # the local directory's bytes
    assert store.size("shards/part-00000.json") == 12 and store.size("shards/part-00001.json") is None
    store.create_json_once("run.json", {"first": True})
    store.create_json_once("run.json", {"first": False})
    assert store.read_json("run.json") == {"first": True}
    assert store.list() == ["run.json", "shards"] and store.list("shards") == ["part-00000.json"]
    store.delete("shards")
    assert not store.exists("shards") and store.list() == ["run.json"]
    assert store.where("run.json") == f"{url}/run.json"


def test_shards_on_s3_count_only_when_written_and_recorded(s3):
    rng = np.random.default_rng(1)
    results = [_random_scores(rng, i, 100, 4) for i in range(3)]
    store = open_store(s3.url + "/cache")
    record = write_shard(s3.url + "/cache", 0, results, top_k=4)
    assert load_shard_record(store, 0) == record and store.size(record.file) == record.bytes
    store.delete("shards/part-00000.json")  # killed between the shard's upload and its record's
    assert load_shard_record(store, 0) is None
    write_shard(store, 0, results, top_k=4)
    data = bytes(store.read_bytes(record.file))
    store.write_bytes(record.file, data[:100])  # a shard object of another size
    assert load_shard_record(store, 0) is None
    store.delete(record.file)  # a record without its shard object
    assert load_shard_record(store, 0) is None
    assert write_shard(store, 0, results, top_k=4) == record  # the rerun writes the same bytes
    assert bytes(store.read_bytes(record.file)) == data


def _settings(shard_size: int) -> dict:
    from kdcache.cache import format as fmt

    return {
        "format_version": fmt.FORMAT_VERSION, "teacher": {}, "tokenizer": {"vocab_size": 200, "vocab_sha256": "x",
        "special_tokens": {}, "chat_template_sha256": None}, "top_k": 8,
        "sampling": {"mode": "none", "num_samples": 0, "seed": 0}, "mode": "score", "generation": None,
        "dataset": {"fingerprint": "f", "format": "text"}, "max_length": 64, "shard_size": shard_size,
    }


def _write_cache(location, n_shards: int = 3, rows: int = 4) -> None:
    """A finished cache of random scores through the stage-one writer functions."""
    rng = np.random.default_rng(3)
    claim_directory(location, _settings(rows))
    for shard in range(n_shards):
        write_shard(location, shard, [_random_scores(rng, shard * rows + i, 200, 8) for i in range(rows)], top_k=8)
    record_worker(location, 1, 0, {
        "dataset_rows": n_shards * rows,
        "teacher": {"model": "m", "dtype": "float32", "quantization": None, "backend": "hf"},
        "dataset": {"source": "data.jsonl", "format": "text", "fingerprint": "f"},
    })
    assert finalize(location) is not None


def _content(reader: CacheReader, indices=None) -> list[tuple]:
    return [(s.seq_id, s.input_ids.tolist(), s.topk_ids.tolist(), s.topk_logprobs.tolist())
            for s in reader.iter_sequences(indices)]


def test_cache_on_s3_reads_and_verifies_like_a_local_one(s3, tmp_path):
    url = s3.url + "/cache"
    _write_cache(url)
    _write_cache(tmp_path / "local")
    store = open_store(url)
    for name in ("part-00000.parquet", "part-00002.json"):
        assert bytes(store.read_bytes(f"shards/{name}")) == (tmp_path / "local" / "shards" / name).read_bytes()
    assert _content(CacheReader(url)) == _content(CacheReader(tmp_path / "local"))
    summary = summarize(url)
    assert summary["path"] == url and summary["sequences"] == 12 and summary["shards"] == 3
    assert verify_cache(url) == []
    shard = bytearray(store.read_bytes("shards/part-00001.parquet"))
    shard[len(shard) // 2] ^= 0xFF
    store.write_bytes("shards/part-00001.parquet", bytes(shard))
    problems = verify_cache(url)
    assert problems == [f"{url}/shards/part-00001.parquet: checksum mismatch (damaged copy)"]
    with pytest.raises(KdcacheError, match="part-00001.parquet: checksum differs from the manifest"):
        _content(CacheReader(url))


def test_read_ahead_fetches_the_next_shard_while_one_is_read(s3, tmp_path):
    url = s3.url + "/cache"
    _write_cache(url)
    _write_cache(tmp_path / "local")
    local = CacheReader(tmp_path / "local")
    reader = CacheReader(url)
    reader.read_ahead([2, 0, 1])
    stream = reader.iter_sequences([2])
    first = next(stream)  # shard 2 is open, shard 0 is being fetched in the background
    assert first.seq_id == 8
    reader._ahead._inflight["shards/part-00000.parquet"].result(timeout=30)  # let the fetch finish
    store = open_store(url)
    for index in range(3):
        store.delete(f"shards/part-{index:05d}.parquet")
    rest = list(stream)
    # shard 0 comes from the bytes fetched ahead; shard 1, fetched while shard 0 is read, is gone
    assert _content(reader, [0]) == _content(local, [0]) and len(rest) == 3
    with pytest.raises(KdcacheError, match="part-00001.parquet: shard listed in the manifest is missing"):
        _content(reader, [1])


# ------------------------------------------------------------------------ bad input


def test_bad_urls_and_credentials_give_one_line(s3, capsys, tiny_llama, tmp_path, monkeypatch):
    line = _main_error(capsys, "inspect", "foo://bucket/cache")
    assert "foo://bucket/cache: unknown storage scheme foo://" in line
    line = _main_error(capsys, "verify", "s3://kdcache-no-such-bucket/cache")
    assert "bucket 'kdcache-no-such-bucket' does not exist" in line
    line = _main_error(capsys, "inspect", s3.url + "/nothing")
    assert f"{s3.url}/nothing: no such cache directory" in line
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in CORPUS[:4]])
    line = _main_error(capsys, "generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data), "--output",
                       "s3://kdcache-no-such-bucket/cache", "--backend", "hf", "--no-progress")
    assert "bucket 'kdcache-no-such-bucket' does not exist" in line
    _write_cache(s3.url + "/cache")
    _set_auth(s3.endpoint, "0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAKDCACHEBOGUS0000")
        line = _main_error(capsys, "inspect", s3.url + "/cache")
        assert f"{s3.url}/cache/manifest.json:" in line and "access denied; check the credentials" in line
    finally:
        _set_auth(s3.endpoint, "inf")


# ------------------------------------------------------------------------ stage one and two on S3


def _records(store) -> dict[int, dict]:
    names = fnmatch.filter(store.list("shards"), "part-*.json")
    return {int(name[5:10]): store.read_json(f"shards/{name}") for name in names}


@pytest.mark.slow
def test_two_workers_on_s3_survive_a_kill_and_train_with_local_bytes(s3, tiny_llama, tmp_path, capsys):
    rows = [{"text": " ".join(CORPUS[i % 6 : i % 6 + 3]) * 2} for i in range(80)]
    data = _write_jsonl(tmp_path / "text.jsonl", rows)
    args = ["generate-teacher", "--teacher", str(tiny_llama), "--dataset", str(data), "--backend", "hf",
            "--shard-size", "4", "--max-length", "64", "--dtype", "float32", "--no-progress"]
    url = s3.url + "/cache"
    env = {**os.environ, **s3.env}
    array_task_1 = {**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}  # worker 1 from the launcher
    worker0 = subprocess.Popen([sys.executable, "-m", "kdcache", *args, "--output", url, "--num-workers", "2",
                                "--worker-index", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker1 = subprocess.Popen([sys.executable, "-m", "kdcache", *args, "--output", url], env=array_task_1,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = open_store(url)
    deadline = time.time() + 300
    while time.time() < deadline and len([i for i in _records(store) if i % 2 == 1]) < 2:
        time.sleep(0.05)
    os.kill(worker1.pid, signal.SIGKILL)
    worker1.wait()
    out, err = worker0.communicate(timeout=600)
    assert worker0.returncode == 0, err[-2000:]
    assert b"the cache completes when the other workers finish" in out
    recorded = _records(store)
    assert 2 <= len([i for i in recorded if i % 2 == 1]) < 10, "the kill should land mid-run"
    assert not store.exists("manifest.json")
    for index, record in recorded.items():  # nothing that looks finished is incomplete
        assert store.size(record["file"]) == record["bytes"] and load_shard_record(store, index) is not None
    with pytest.raises(KdcacheError, match="unfinished"):
        CacheReader(url)

    rerun = subprocess.run([sys.executable, "-m", "kdcache", *args, "--output", url], env=array_task_1,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "worker 1 of 2 (from SLURM_ARRAY_TASK_ID=1 of SLURM_ARRAY_TASK_COUNT=2)" in rerun.stderr
    assert "sequences        80" in rerun.stdout
    assert _main(capsys, "verify", url).strip() == f"OK {url}: all shards match the manifest"

    local = tmp_path / "local"
    reference = _run_cli(*args, "--output", str(local))
    assert reference.returncode == 0, reference.stderr[-2000:]
    local_manifest = json.loads((local / "manifest.json").read_text())
    s3_manifest = store.read_json("manifest.json")
    assert [s["sha256"] for s in s3_manifest["shards"]] == [s["sha256"] for s in local_manifest["shards"]]
    for shard in local_manifest["shards"]:
        assert bytes(store.read_bytes(shard["file"])) == (local / shard["file"]).read_bytes()

    run = tmp_path / "run"
    _main(capsys, "train-student", "--student", str(tiny_llama), "--cache", url, "--eval-cache", url,
          "--eval-sequences", "8", "--output", str(run), "--max-steps", "3", "--global-batch-size", "8",
          "--device", "cpu", "--no-progress")
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    metrics = json.loads(_main(capsys, "eval", "--model", str(run / "model"), "--cache", url, "--max-sequences", "8",
                               "--json", "--device", "cpu"))
    assert metrics["cache"] == url and metrics["sequences"] == 8
    assert json.loads(_main(capsys, "inspect", url, "--json"))["sequences"] == 80


def test_tokenizer_saved_on_s3_names_the_first_difference(s3, tiny_llama, tmp_path):
    """Stage two reads <cache>/tokenizer from the bucket to name the first differing token."""
    from kdcache.cache.manifest import load_manifest
    from kdcache.student.compat import check_tokenizer
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache
    from tests.test_compat import _other_tokenizer

    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in CORPUS[:6]])
    url = s3.url + "/cache"
    generate_teacher_cache(GenerateConfig(teacher=str(tiny_llama), dataset=str(data), output=url, backend="hf",
                                          top_k=4, sampling="none", shard_size=4, max_length=48, dtype="float32",
                                          progress=False))
    store = open_store(url)
    assert "tokenizer.json" in store.list("tokenizer") and store.exists("tokenizer/tokenizer_config.json")
    manifest = load_manifest(url)
    manifest["teacher"] = {**manifest["teacher"], **{k: "/nowhere/teacher" for k in ("model", "path", "spec")}}
    with pytest.raises(KdcacheError, match=rf"tokenizer of cache {url}: first difference at id \d+: teacher '.*'"):
        check_tokenizer(_other_tokenizer(), manifest, url)
