"""Cache format: quantization bound, lossless round trip, atomic writes, schema files, verify."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdcache.cache import format as fmt
from kdcache.cache.quantize import dequantize_logprobs, quantize_logprobs
from kdcache.cache.reader import CacheReader, read_shard_file
from kdcache.cache.records import TeacherScores, tail_logmass_from_topk
from kdcache.cache.stats import summarize, verify_cache
from kdcache.cache.writer import load_shard_record, write_shard
from kdcache.errors import KdcacheError
from kdcache.teacher.generate import claim_directory, finalize, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _random_scores(rng: np.random.Generator, seq_id: int, vocab: int, k: int, n_samples: int = 0) -> TeacherScores:
    length = int(rng.integers(8, 40))
    positions = np.sort(rng.choice(np.arange(1, length), size=int(rng.integers(1, length - 1)), replace=False)).astype(np.int32)
    s = positions.shape[0]
    logits = rng.normal(0, 3, size=(s, vocab))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-lp, axis=1)[:, :k]
    result = TeacherScores(
        seq_id=seq_id,
        source=f"data.jsonl:{seq_id + 1}",
        input_ids=rng.integers(0, vocab, length).astype(np.int32),
        target_positions=positions,
        target_logprobs=lp[np.arange(s), rng.integers(0, vocab, s)].astype(np.float32),
        topk_ids=order.astype(np.int32),
        topk_logprobs=np.take_along_axis(lp, order, 1).astype(np.float32),
    )
    result.tail_logmass = tail_logmass_from_topk(result.topk_logprobs)
    if n_samples:
        offsets, ids, counts = [0], [], []
        for row in np.exp(lp):
            c = rng.multinomial(n_samples, row / row.sum())
            nz = np.flatnonzero(c)
            ids.append(nz)
            counts.append(c[nz])
            offsets.append(offsets[-1] + nz.shape[0])
        result.sample_offsets = np.asarray(offsets, np.int32)
        result.sample_ids = np.concatenate(ids).astype(np.int32)
        result.sample_counts = np.concatenate(counts).astype(np.int32)
    return result


def test_quantization_error_bound_and_monotonicity():
    lp = -np.concatenate([np.linspace(0, 14, 200_001), [9.2103, 9.25, 9.2501, np.inf]]).astype(np.float32)
    codes = quantize_logprobs(lp)
    back = dequantize_logprobs(codes)
    p_ge_1e4 = lp >= np.log(1e-4)
    assert np.abs(back - lp)[p_ge_1e4].max() <= 2e-3
    finite_low = ~p_ge_1e4 & np.isfinite(lp)
    assert np.abs(back - lp)[finite_low].max() <= 1 / 32 + 1e-6
    assert (np.diff(codes[:200_001].astype(np.int64)) >= 0).all()
    assert codes[-1] == 65535


@pytest.mark.parametrize("vocab,k", [(300, 16), (70_000, 8)])  # 70k ids exercises the third code byte
def test_shard_round_trip(tmp_path, vocab, k):
    rng = np.random.default_rng(0)
    results = [_random_scores(rng, i, vocab, k, n_samples=20) for i in range(12)]
    if vocab > 65536:  # make sure ids above 65535 and many distinct ids occur
        for r in results:
            r.topk_ids = (r.topk_ids + 65_000) % vocab
    record = write_shard(tmp_path, 3, results, top_k=k)
    assert record.rows == 12 and record.supervised_tokens == sum(r.num_targets for r in results)
    back = list(read_shard_file(tmp_path / record.file, batch_rows=5))
    assert [b.seq_id for b in back] == list(range(12))
    for a, b in zip(results, back):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.target_positions, b.target_positions)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        keep = a.topk_logprobs >= np.log(1e-4)
        assert np.abs(a.topk_logprobs - b.topk_logprobs)[keep].max(initial=0) <= 2e-3
        assert np.abs(a.target_logprobs - b.target_logprobs)[a.target_logprobs >= np.log(1e-4)].max(initial=0) <= 2e-3
        np.testing.assert_array_equal(a.tail_logmass, b.tail_logmass)  # stored exactly (float32)
        np.testing.assert_array_equal(a.sample_offsets, b.sample_offsets)
        assert _sample_dicts(a) == _sample_dicts(b)  # order within a position carries no meaning
        assert (b.sample_counts.sum() == 20 * b.num_targets)


def test_wide_id_table_across_encoder_chunks(tmp_path):
    """Over 65536 distinct ids (third code byte) in a shard that spans several encoder chunks."""
    from kdcache.cache.writer import _CHUNK_ENTRIES

    rng = np.random.default_rng(7)
    k, vocab, rows, per_row = 8, 150_000, 6, 12_000
    assert rows * per_row * k > 2 * _CHUNK_ENTRIES
    results = []
    for i in range(rows):
        ids = rng.permutation(vocab)[: per_row * k].reshape(per_row, k).astype(np.int32)
        lp = -np.sort(rng.exponential(2.0, size=(per_row, k)), axis=1).astype(np.float32)
        lp[:7, -1] = -np.inf  # zero-probability entries at the end of a list
        results.append(TeacherScores(
            seq_id=i, source=f"wide.jsonl:{i + 1}", input_ids=rng.integers(0, vocab, per_row + 1).astype(np.int32),
            target_positions=np.arange(1, per_row + 1, dtype=np.int32), target_logprobs=lp[:, 0].copy(),
            topk_ids=ids, topk_logprobs=lp, tail_logmass=tail_logmass_from_topk(lp),
        ))
    record = write_shard(tmp_path, 0, results, top_k=k)
    assert pq.read_table(tmp_path / record.file, columns=["topk_code_b2"]).column(0).combine_chunks().buffers()[2].size > 0
    for a, b in zip(results, read_shard_file(tmp_path / record.file)):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        finite = np.isfinite(a.topk_logprobs)
        assert np.abs(a.topk_logprobs - b.topk_logprobs)[finite & (a.topk_logprobs >= np.log(1e-4))].max() <= 2e-3
        assert np.abs(a.topk_logprobs - b.topk_logprobs)[finite].max() <= 1 / 32 + 1e-6
        assert (b.topk_logprobs[~finite] < -3900).all()  # p = 0 decodes to the last code's bin


def test_unsorted_topk_is_refused(tmp_path):
    rng = np.random.default_rng(8)
    result = _random_scores(rng, 0, 300, 16)
    result.topk_logprobs = result.topk_logprobs[:, ::-1].copy()
    with pytest.raises(KdcacheError, match="descending"):
        write_shard(tmp_path, 0, [result], top_k=16)
    assert not list((tmp_path / fmt.SHARD_DIR).glob("*.parquet"))


def _sample_dicts(scores: TeacherScores) -> list[dict[int, int]]:
    off = scores.sample_offsets
    return [
        dict(zip(scores.sample_ids[off[i] : off[i + 1]].tolist(), scores.sample_counts[off[i] : off[i + 1]].tolist()))
        for i in range(off.shape[0] - 1)
    ]


def test_sample_counts_above_255_and_shared_id_table(tmp_path):
    """N > 255 needs the counts' second byte plane; top-k and samples share one id table."""
    rng = np.random.default_rng(5)
    results = [_random_scores(rng, i, 50, 4, n_samples=1000) for i in range(3)]
    assert max(int(r.sample_counts.max()) for r in results) > 255
    record = write_shard(tmp_path, 0, results, top_k=4)
    back = list(read_shard_file(tmp_path / record.file))
    for a, b in zip(results, back):
        assert _sample_dicts(a) == _sample_dicts(b)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    table = pq.read_table(tmp_path / record.file)
    assert table.column("sample_count_b1").combine_chunks().buffers()[2] is not None
    small = write_shard(tmp_path, 1, [_random_scores(rng, 9, 50, 4, n_samples=20)], top_k=4)
    assert pq.read_table(tmp_path / small.file).column("sample_count_b1").to_pylist() == [b""]


def test_tail_logmass_is_exact_complement():
    lp = np.log(np.array([[0.5, 0.25, 0.125], [0.999999, 1e-7, 1e-8], [0.6, 0.4, 0.0]]))
    tail = tail_logmass_from_topk(lp)
    assert tail[0] == pytest.approx(np.log(0.125), abs=1e-6)
    assert tail[1] == pytest.approx(np.log(1 - 0.999999 - 1e-7 - 1e-8), rel=1e-4)
    assert tail[2] == -np.inf


def test_shard_write_is_atomic_and_unfinished_shards_are_invisible(tmp_path):
    rng = np.random.default_rng(1)
    results = [_random_scores(rng, i, 100, 4) for i in range(3)]
    record = write_shard(tmp_path, 0, results, top_k=4)
    assert load_shard_record(tmp_path, 0) == record
    # a shard file without its record (killed between rename and record) is not finished
    os.remove(tmp_path / fmt.SHARD_DIR / "part-00000.json")
    assert load_shard_record(tmp_path, 0) is None
    # a record whose shard was truncated is not finished either
    write_shard(tmp_path, 0, results, top_k=4)
    with open(tmp_path / record.file, "r+b") as handle:
        handle.truncate(100)
    assert load_shard_record(tmp_path, 0) is None
    assert not list((tmp_path / fmt.SHARD_DIR).glob(".*tmp*"))
    # temp files left by a writer killed mid-shard are removed when the shard is written again
    (tmp_path / fmt.SHARD_DIR / ".part-00000.parquet.tmp-999").write_bytes(b"partial")
    (tmp_path / fmt.SHARD_DIR / ".part-00000.json.tmp-999").write_bytes(b"{")
    write_shard(tmp_path, 0, results, top_k=4)
    assert not list((tmp_path / fmt.SHARD_DIR).glob(".*tmp*"))


def test_full_disk_gives_one_line_error(tmp_path, monkeypatch):
    import errno

    from kdcache.cache import storage

    def half_then_no_space(path, data):  # the disk fills up in the middle of the shard
        Path(path).write_bytes(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_fsync_write", half_then_no_space)
    rng = np.random.default_rng(2)
    with pytest.raises(KdcacheError, match="disk full.*rerun the same command"):
        write_shard(tmp_path, 0, [_random_scores(rng, 0, 50, 4)], top_k=4)
    assert load_shard_record(tmp_path, 0) is None
    assert list((tmp_path / fmt.SHARD_DIR).iterdir()) == []  # the partial temp file is gone


def test_schema_files_are_up_to_date(tmp_path):
    written = fmt.write_schema_files(tmp_path)
    for path in written:
        committed = REPO / "schemas" / path.parent.name / path.name
        assert committed.exists(), f"{committed} missing: run python -m kdcache.cache.format schemas"
        assert json.loads(committed.read_text()) == json.loads(path.read_text()), (
            f"{committed} is stale: run python -m kdcache.cache.format schemas"
        )


def _finished_cache(tmp_path: Path, n_shards: int = 2, rows_per_shard: int = 4) -> Path:
    rng = np.random.default_rng(3)
    settings = {
        "format_version": fmt.FORMAT_VERSION, "teacher": {}, "tokenizer": {"vocab_size": 200, "vocab_sha256": "x",
        "special_tokens": {}, "chat_template_sha256": None}, "top_k": 8,
        "sampling": {"mode": "none", "num_samples": 0, "seed": 0}, "mode": "score", "generation": None,
        "dataset": {"fingerprint": "f", "format": "text"}, "max_length": 64, "shard_size": rows_per_shard,
    }
    claim_directory(tmp_path, settings)
    for shard in range(n_shards):
        results = [_random_scores(rng, shard * rows_per_shard + i, 200, 8) for i in range(rows_per_shard)]
        write_shard(tmp_path, shard, results, top_k=8)
    (tmp_path / "workers").mkdir()
    write_json_atomic(tmp_path / "workers" / "worker-0-of-1.json", {
        "dataset_rows": n_shards * rows_per_shard,
        "teacher": {"model": "m", "dtype": "float32", "quantization": None, "backend": "hf"},
        "dataset": {"source": "data.jsonl", "format": "text", "fingerprint": "f"},
    })
    assert finalize(tmp_path) is not None
    return tmp_path


def test_manifest_reader_inspect_and_verify(tmp_path):
    cache = _finished_cache(tmp_path)
    reader = CacheReader(cache)
    seqs = list(reader.iter_sequences())
    assert [s.seq_id for s in seqs] == list(range(8))
    summary = summarize(cache)
    assert summary["sequences"] == 8 and summary["shards"] == 2
    assert summary["bytes_per_supervised_token"] == pytest.approx(summary["bytes"] / summary["supervised_tokens"])
    assert 0 < summary["mean_topk_mass"] <= 1
    assert verify_cache(cache) == []
    # flip one byte in the middle of shard 1: verify names exactly that shard
    shard = cache / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_cache(cache)
    assert len(problems) == 1 and "part-00001.parquet" in problems[0] and "checksum" in problems[0]


def test_unsupported_version_and_missing_manifest(tmp_path):
    cache = _finished_cache(tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["format_version"] = 99
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="v99 is not supported.*upgrade kdcache"):
        CacheReader(cache)
    manifest["format_version"] = 1  # a kdcache 0.1 cache: regenerate, not upgrade
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="v1 is not supported.*regenerate the cache"):
        CacheReader(cache)
    (cache / "manifest.json").unlink()
    with pytest.raises(KdcacheError, match="unfinished"):
        CacheReader(cache)


def test_other_settings_refused(tmp_path):
    cache = _finished_cache(tmp_path)
    settings = json.loads((cache / "run.json").read_text())["settings"]
    settings["top_k"] = 16
    with pytest.raises(KdcacheError, match="different settings \\(top_k differ"):
        claim_directory(cache, settings)
