"""The one statistics function both engines call (kdcache.teacher.statistics), against float64
references: exact top-k, target and tail log-mass, the counter-based uniforms, and the draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.teacher.statistics import (
    StatsSpec,
    counter_uniforms,
    draw_points,
    draws_to_counts,
    position_statistics,
    scores_from_statistics,
    statistics_in_chunks,
    target_spans,
)
from tests.test_backends import chi_square_z


def spec(**kw) -> StatsSpec:
    base = dict(top_k=4, num_samples=8, sample_tail=True, draws="systematic", seed=5, vocab_size=300)
    base.update(kw)
    return StatsSpec(**base)


def run(logits: torch.Tensor, s: StatsSpec, seq: int = 3, targets: torch.Tensor | None = None) -> dict:
    rows = logits.shape[0]
    targets = torch.zeros(rows, dtype=torch.long) if targets is None else targets
    positions = torch.arange(1, rows + 1)
    block = position_statistics(logits, targets, torch.full((rows,), seq), positions, s).numpy()
    return s.layout.split(block)


def dense_counts(draws: np.ndarray, vocab: int) -> np.ndarray:
    offsets, ids, counts = draws_to_counts(draws)
    full = np.zeros((draws.shape[0], vocab), dtype=np.int64)
    full[np.repeat(np.arange(draws.shape[0]), np.diff(offsets)), ids] = counts
    return full


# ------------------------------------------------------------------------------ uniforms


def _splitmix_ref(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def _uniform_ref(seed: int, seq: int, pos: int, j: int) -> float:
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15
    h = _splitmix_ref((seed * golden + 0x632BE59BD9B4E019) & mask)
    for key in (seq, pos, j):
        h = _splitmix_ref(h ^ ((key + golden) & mask))
    return (h >> 11) * 2.0 ** -53


def test_counter_uniforms_equal_the_uint64_reference_and_look_uniform():
    seq = torch.tensor([0, 7, 123456789, 2**40])
    pos = torch.tensor([1, 2, 4095, 3])
    got = counter_uniforms(11, seq, pos, 3)
    for r in range(4):
        for j in range(3):
            assert got[r, j].item() == _uniform_ref(11, int(seq[r]), int(pos[r]), j)
    many = counter_uniforms(0, torch.zeros(200_000, dtype=torch.long), torch.arange(200_000), 1)[:, 0].numpy()
    assert (many >= 0).all() and (many < 1).all()
    hist = np.histogram(many, bins=50, range=(0, 1))[0]
    expected = len(many) / 50
    assert ((hist - expected) ** 2 / expected).sum() < 100  # chi-square, 49 dof: ~49 +- 10
    assert abs(np.corrcoef(many[:-1], many[1:])[0, 1]) < 0.01
    # keys matter: another seed, sequence or position gives other uniforms
    base = counter_uniforms(1, seq, pos, 1)
    assert not torch.equal(base, counter_uniforms(2, seq, pos, 1))
    assert not torch.equal(base, counter_uniforms(1, seq + 1, pos, 1))
    assert not torch.equal(base, counter_uniforms(1, seq, pos + 1, 1))


# ----------------------------------------------------------------------- exact statistics


def test_topk_target_and_tail_match_a_float64_reference_and_drop_padded_rows():
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(40, vocab + 20) * 4
    logits[:, vocab:] += 30  # padded rows with huge logits must not count at all
    targets = torch.randint(0, vocab, (40,))
    got = run(logits, spec(vocab_size=vocab), targets=targets)
    lp = torch.log_softmax(logits[:, :vocab].double(), dim=-1)
    values, ids = torch.topk(lp, 4)
    np.testing.assert_array_equal(got["topk_ids"], ids.numpy())
    np.testing.assert_allclose(got["topk_logprobs"], values.numpy(), atol=2e-6)
    np.testing.assert_allclose(got["target"], lp.gather(1, targets[:, None])[:, 0].numpy(), atol=2e-6)
    tail = lp.scatter(1, ids, float("-inf")).logsumexp(-1)
    np.testing.assert_allclose(got["tail"], tail.numpy(), atol=2e-6)
    assert (got["draws"] < vocab).all() and (got["draws"] >= 0).all()


def test_tail_log_mass_stays_exact_when_the_tail_is_tiny():
    """``1 - sum(top-k)`` in float32 loses ~1e-3 nats at a tail of 2e-5; the log-sum-exp does not."""
    vocab = 1000
    logits = torch.full((1, vocab), -5.2, dtype=torch.float64)
    logits[0, :4] = torch.tensor([12.0, 11.0, 10.5, 10.0])
    exact = torch.log_softmax(logits, -1)
    want = exact[0, 4:].logsumexp(0).item()
    assert 1e-5 < np.exp(want) < 1e-4
    got = run(logits.float(), spec(vocab_size=vocab, num_samples=0, sample_tail=False))["tail"][0]
    assert abs(got - want) < 1e-5
    naive = np.log1p(-np.exp(torch.topk(exact.float(), 4).values.numpy()).sum(dtype=np.float32))
    assert abs(naive - want) > 10 * abs(got - want)


def test_no_topk_and_whole_vocabulary_topk():
    logits = torch.randn(5, 30)
    got = run(logits, spec(vocab_size=30, top_k=0, sample_tail=False, num_samples=16))
    assert got["topk_ids"].shape == (5, 0) and np.isneginf(got["tail"]).all()
    full = run(logits, spec(vocab_size=30, top_k=30, sample_tail=False, num_samples=0))
    assert np.isneginf(full["tail"]).all()
    np.testing.assert_allclose(np.exp(full["topk_logprobs"]).sum(axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------ draws


def test_draws_follow_the_distribution_iid():
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625 - 1e-3, 1e-3, 0.0])
    with np.errstate(divide="ignore"):
        logits = torch.from_numpy(np.tile(np.log(probs), (2000, 1))).float()
    got = run(logits, spec(vocab_size=7, top_k=0, sample_tail=False, draws="iid", num_samples=10))
    full = dense_counts(got["draws"], 7).sum(axis=0)
    assert full[-1] == 0 and full.sum() == 20000
    assert abs(chi_square_z([full], [probs], 20000)) < 4


def test_tail_draws_avoid_the_topk_and_follow_the_restricted_distribution():
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625 - 1e-3, 1e-3, 0.0])
    with np.errstate(divide="ignore"):
        logits = torch.from_numpy(np.tile(np.log(probs), (2000, 1))).float()
    got = run(logits, spec(vocab_size=7, top_k=2, draws="iid", num_samples=10))
    full = dense_counts(got["draws"], 7).sum(axis=0)
    assert full[:2].sum() == 0 and full[-1] == 0 and full.sum() == 20000
    restricted = np.where(np.arange(7) >= 2, probs, 0.0)
    assert abs(chi_square_z([full], [restricted / restricted.sum()], 20000)) < 4
    # a row whose mass is all in the top-k draws nothing
    only_two = torch.full((1, 7), float("-inf"))
    only_two[0, :2] = torch.tensor([0.0, -1.0])
    none = run(only_two, spec(vocab_size=7, top_k=2, draws="iid", num_samples=10))
    assert (none["draws"] == -1).all() and np.isneginf(none["tail"]).all()
    offsets, ids, _ = draws_to_counts(none["draws"])
    assert offsets.tolist() == [0, 0] and ids.size == 0


def test_systematic_draws_are_unbiased_with_bounded_counts():
    """Each id's count is floor or ceil of N p; the mean count is N p; the tail variant never
    draws a top-k id; far less spread than iid."""
    probs = np.array([0.41, 0.23, 0.17, 0.09, 0.05, 0.03, 0.015, 0.005, 0.0])
    with np.errstate(divide="ignore"):
        logits = torch.from_numpy(np.tile(np.log(probs), (4000, 1))).float()
    n = 20
    got = dense_counts(run(logits, spec(vocab_size=9, top_k=0, sample_tail=False, num_samples=n))["draws"], 9)
    assert (got.sum(axis=1) == n).all() and (got[:, -1] == 0).all()
    assert (got >= np.floor(n * probs - 1e-6)).all() and (got <= np.ceil(n * probs + 1e-6)).all()
    se = 0.5 / np.sqrt(4000)
    np.testing.assert_array_less(np.abs(got.mean(axis=0) - n * probs), 4 * se + 1e-12)
    iid = dense_counts(run(logits[:500], spec(vocab_size=9, top_k=0, sample_tail=False, num_samples=n,
                                              draws="iid"))["draws"], 9)
    assert np.ptp(got[:, 0]) <= 1 < np.ptp(iid[:, 0])
    tail = dense_counts(run(logits, spec(vocab_size=9, top_k=2, num_samples=n))["draws"], 9)
    restricted = np.where(np.arange(9) >= 2, probs, 0.0) / probs[2:].sum()
    assert (tail[:, :2] == 0).all()
    assert (tail >= np.floor(n * restricted - 1e-6)).all() and (tail <= np.ceil(n * restricted + 1e-6)).all()


def test_two_level_cdf_search_equals_a_full_float64_cumsum():
    """Large vocabulary (several CDF blocks), zeros inside blocks: the two-level search draws
    what a float64 cumsum over the whole row draws."""
    torch.manual_seed(1)
    vocab = 5000
    logits = torch.randn(64, vocab) * 3
    logits[:, 1000:1700] = float("-inf")  # whole blocks and block edges without mass
    s = spec(vocab_size=vocab, top_k=4, num_samples=16)
    got = run(logits, s)
    positions = torch.arange(1, 65)
    points = draw_points(counter_uniforms(s.seed, torch.full((64,), 3), positions, 1), 16, "systematic")
    weights = torch.exp(logits.double() - logits.max(dim=1, keepdim=True).values.double())
    weights.scatter_(1, torch.from_numpy(got["topk_ids"]).long(), 0.0)
    cdf = weights.cumsum(-1)
    ref = torch.searchsorted(cdf / cdf[:, -1:], points, right=True)
    assert (ref.numpy() == got["draws"]).mean() > 0.999
    assert not ((got["draws"] >= 1000) & (got["draws"] < 1700)).any()


def test_draws_do_not_depend_on_chunking_batching_or_other_positions():
    torch.manual_seed(2)
    hidden = torch.randn(50, 16)
    weight = torch.randn(200, 16)
    s = spec(vocab_size=200, top_k=3, num_samples=8, draws="iid")
    seq = torch.full((50,), 9)
    positions = torch.arange(5, 55)
    targets = torch.randint(0, 200, (50,))
    logits = hidden @ weight.T
    whole = statistics_in_chunks(lambda rows: rows, logits, targets, seq, positions, s, 64)
    chunked = statistics_in_chunks(lambda rows: rows, logits, targets, seq, positions, s, 7)
    assert torch.equal(whole, chunked)
    some = position_statistics(logits[10:20], targets[10:20], seq[10:20], positions[10:20], s)
    assert torch.equal(some, whole[10:20])
    other_seq = statistics_in_chunks(lambda h: h @ weight.T, hidden, targets, seq + 1, positions, s, 64)
    assert not torch.equal(other_seq[:, -8:], whole[:, -8:])


def test_draws_to_counts_and_spans_and_scores():
    draws = np.array([[5, 3, 5, 5], [-1, -1, -1, -1], [0, 1, 2, 2]])
    offsets, ids, counts = draws_to_counts(draws)
    assert offsets.tolist() == [0, 2, 2, 5]
    assert ids.tolist() == [3, 5, 0, 1, 2] and counts.tolist() == [1, 3, 1, 1, 2]
    assert target_spans(np.array([3, 4, 5, 9, 10, 20])) == [[3, 6], [9, 11], [20, 21]]
    assert target_spans(np.array([], dtype=np.int32)) == []
    s = spec(vocab_size=50, top_k=2, num_samples=4)
    block = position_statistics(torch.randn(3, 50), torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long),
                                torch.tensor([1, 2, 3]), s).numpy()
    scores = scores_from_statistics(0, "mem:1", np.arange(4), np.array([1, 2, 3]), block, s)
    assert scores.topk_ids.shape == (3, 2) and scores.sample_offsets[-1] == len(scores.sample_ids)
    assert all(scores.sample_counts[scores.sample_offsets[r]:scores.sample_offsets[r + 1]].sum() == 4 for r in range(3))
    with pytest.raises(RuntimeError, match="shape"):
        scores_from_statistics(0, "mem:1", np.arange(4), np.array([1, 2]), block, s)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="top_k >= 1"):
        spec(top_k=0, sample_tail=True)
    with pytest.raises(ValueError, match="unknown draw scheme"):
        spec(draws="stratified")


def test_a_point_at_the_top_of_the_cdf_never_lands_on_zero_weight():
    """Rounding can make ``x * total`` equal the total; the draw is then the last id with weight,
    also when the last blocks hold none (excluded or underflowed ids)."""
    from kdcache.teacher.statistics import _block_sums, _inverse_cdf

    weights = torch.zeros(2, 1000)
    weights[0, :300] = torch.rand(300) + 0.1
    weights[1, 700] = 1.0
    points = torch.tensor([[1 - 2.0 ** -53, 0.5], [1 - 2.0 ** -53, 0.0]], dtype=torch.float64)
    ids = _inverse_cdf(weights, _block_sums(weights), points)
    assert (weights.gather(1, ids) > 0).all(), ids
    assert ids[0, 0] == 299 and ids[1].tolist() == [700, 700]
