"""The on-policy benchmark (benchmarks/quality/onpolicy.py) end to end at its CI scale: tiny
teacher and its pruned student, a few chat rows, every step real (rollouts, teacher caches,
train-student, eval --generate, full-vocabulary metrics), two seeds; a rerun reuses every step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import CORPUS


def _chat_rows(n: int, offset: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                          {"role": "assistant", "content": CORPUS[i % 6] + " " + CORPUS[(i * 5 + 1) % 6]}],
             "source": "wiki", "doc_id": f"item {i}"} for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from kdcache.testing.models import build_tiny_model

    root = tmp_path_factory.mktemp("onpolicy_bench")
    teacher = build_tiny_model(root / "teacher", CORPUS, arch="llama", num_layers=3, seed=2)
    data = root / "prepared"
    data.mkdir()
    for name, rows in (("train_chat", _chat_rows(40, 0)), ("heldout_chat", _chat_rows(6, 100)),
                       ("heldout_text", [{"text": " ".join(CORPUS[i:i + 3]), "source": "wiki", "doc_id": str(i)}
                                         for i in range(8)])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return teacher, data


@pytest.mark.slow
def test_onpolicy_benchmark_at_ci_scale(bench_inputs, tmp_path):
    from benchmarks.quality.onpolicy import main

    teacher, data = bench_inputs
    work, out = tmp_path / "work", tmp_path / "results"
    argv = ["--scale", "ci", "--teacher-dir", str(teacher), "--student-layers", "2", "--data-dir", str(data),
            "--work-dir", str(work), "--results-dir", str(out), "--results-name", "ci", "--device", "cpu"]
    results = main(argv)

    models = {(m["arm"], m["seed"]): m for m in results["models"]}
    assert set(models) == {("stage0", None), ("onpolicy", 0), ("onpolicy", 1), ("offpolicy", 0), ("offpolicy", 1)}
    for seed in (0, 1):
        on, off = models[("onpolicy", seed)], models[("offpolicy", seed)]
        # equal teacher-scored tokens: the off-policy arm takes fixed rows up to the rollouts' count
        assert [r["round"] for r in on["rounds"]] == [0, 1]
        assert on["scored_tokens"] == sum(r["response_tokens"] for r in on["rounds"]) > 0
        assert on["scored_tokens"] <= off["scored_tokens"] < on["scored_tokens"] + 40
        # round 1 sampled from round 0's trained student, with its own seed
        rollout1 = json.loads((work / "arms" / f"onpolicy-s{seed}" / "round-1" / "rollout" / "rollout.json").read_text())
        assert rollout1["student"]["spec"] == str(work / "arms" / f"onpolicy-s{seed}" / "round-0" / "train" / "model")
        assert rollout1["round"] == 1 and rollout1["sampling"]["seed"] == 1000 * seed + 1
        for m in (on, off):
            g, f = m["metrics"]["generation"], m["metrics"]["forced"]
            assert math.isfinite(g["rkl"]) and 0.0 <= g["rouge_l"] <= 1.0 and g["responses"] == 3
            assert f["chat"]["kl"] > 0 and f["text"]["kl"] > 0
    # the teacher scored by itself: no divergence (up to the cache's quantization)
    assert abs(results["teacher"]["generation"]["rkl"]) < 5e-3
    diff = results["summary"][-1]
    assert diff["seeds"] == [0, 1] and len(diff["rkl_per_seed"]) == 2
    assert diff["rkl"] == pytest.approx(sum(diff["rkl_per_seed"]) / 2)
    table = (out / "ci.md").read_text()
    assert "| onpolicy | 0,1 |" in table and "| offpolicy | 0,1 |" in table and "onpolicy - offpolicy" in table
    assert (out / "ci.png").stat().st_size > 0
    assert json.loads((out / "ci.json").read_text())["scale"] == "ci"

    # A rerun reads every finished step back: nothing is sampled, scored or trained again.
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.name in ("rollout.json", "manifest.json", "COMPLETE")}
    again = main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.dumps(again["summary"]) == json.dumps(results["summary"])  # (NaN standard errors of one-seed rows)
