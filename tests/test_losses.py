"""KD losses: sparse and chunked implementations against a dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.student.chunked import choose_chunk_size, chunked_kd_loss
from kdcache.student.losses import (
    LOSS_NAMES,
    KDLossConfig,
    TeacherTargets,
    sparse_kd_loss,
    student_tail_from_topk,
)

F64 = torch.float64
COARSE = ["tail", "forward_kl", "reverse_kl", "jsd", "skew_forward", "skew_reverse", "tv", "akl"]
# Parameters chosen away from the special end points so the mixtures are exercised.
PARAMS = {"jsd": {"beta": 0.3}, "skew_forward": {"alpha": 0.2}, "skew_reverse": {"alpha": 0.2}, "akl": {"akl_mu": 0.5}}


def cfg(name: str, **kw) -> KDLossConfig:
    return KDLossConfig(loss=name, **{**PARAMS.get(name, {}), **kw})


def tg(case: dict, c: KDLossConfig) -> TeacherTargets:
    """The case's targets for loss ``c``: ``tail_rs`` reads samples drawn from outside the top-k."""
    t = case["targets"]
    if c.loss != "tail_rs":
        return t
    return TeacherTargets(t.topk_ids, t.topk_logprobs, t.tail_logmass, case["tail_sample_ids"], case["tail_sample_weights"])


# ----------------------------------------------------------------- dense reference


def ref_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) on probability rows, 0 log 0 = 0."""
    return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)


def ref_akl(p: torch.Tensor, q: torch.Tensor, mu: float) -> torch.Tensor:
    out = []
    for prow, qrow in zip(p.tolist(), q.tolist()):
        order = sorted(range(len(prow)), key=lambda i: -prow[i])
        cum, g_head, g_tail = 0.0, 0.0, 0.0
        for rank, i in enumerate(order):
            cum += prow[i]
            gap = abs(prow[i] - qrow[i])
            if rank == 0 or cum <= mu:
                g_head += gap
            else:
                g_tail += gap
        out.append((g_head, g_tail))
    w = torch.tensor(out, dtype=F64)
    w = w / w.sum(-1, keepdim=True)
    return w[:, 0] * ref_kl(p, q) + w[:, 1] * ref_kl(q, p)


def ref_divergence(name: str, p: torch.Tensor, q: torch.Tensor, c: KDLossConfig) -> torch.Tensor:
    """Per-row divergence between probability rows ``p`` (teacher) and ``q`` (student)."""
    if name in ("tail", "forward_kl"):
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        if c.beta == 0:
            return ref_kl(p, q)
        if c.beta == 1:
            return ref_kl(q, p)
        m = c.beta * p + (1 - c.beta) * q
        return c.beta * ref_kl(p, m) + (1 - c.beta) * ref_kl(q, m)
    if name == "skew_forward":
        return ref_kl(p, c.alpha * p + (1 - c.alpha) * q)
    if name == "skew_reverse":
        return ref_kl(q, (1 - c.alpha) * p + c.alpha * q)
    if name == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":
        return ref_akl(p, q, c.akl_mu)
    raise AssertionError(name)


def ref_temper(probs: torch.Tensor, tau: float) -> torch.Tensor:
    x = probs ** (1.0 / tau)
    return x / x.sum(-1, keepdim=True)


def coarse(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Merge every outcome outside ``ids`` into one bucket: ``[T, V] -> [T, k+1]``."""
    outside = torch.ones_like(probs, dtype=torch.bool).scatter(1, ids, False)
    return torch.cat([probs.gather(1, ids), (probs * outside).sum(-1, keepdim=True)], dim=-1)


def ref_loss(case: dict, c: KDLossConfig) -> torch.Tensor:
    """Dense float64 reference of ``(1 - w) kd + w ce``, averaged over positions."""
    p, q, ids = case["p"], case["q"], case["ids"]
    if c.loss == "rs_kd":
        kd = -(case["sample_weights_dense"] * q.log()).sum(-1)
    elif c.loss == "tail_rs":
        # exact coarse KL + p_tail KL(w || q restricted to the tail), all dense
        pc, qc = coarse(p, ids), coarse(q, ids)
        w = case["tail_weights_dense"]
        q_shape = q / qc[:, -1:]
        kd = ref_kl(pc, qc) + pc[:, -1] * (torch.special.xlogy(w, w) - torch.special.xlogy(w, q_shape)).sum(-1)
    elif c.loss == "topk_renorm":
        pk, qk = ref_temper(p.gather(1, ids), c.tau), ref_temper(q.gather(1, ids), c.tau)
        kd = ref_kl(pk / pk.sum(-1, keepdim=True), qk / qk.sum(-1, keepdim=True)) * c.tau**2
    else:
        kd = ref_divergence(c.loss, ref_temper(coarse(p, ids), c.tau), ref_temper(coarse(q, ids), c.tau), c)
        kd = kd * c.tau**2
    ce = -q.gather(1, case["gold"][:, None])[:, 0].log()
    return ((1 - c.ce_weight) * kd + c.ce_weight * ce).mean()


# ------------------------------------------------------------------------- cases


def make_case(T: int = 6, V: int = 50, H: int = 8, k: int = 8, seed: int = 0, dtype=F64) -> dict:
    """Random teacher, a linear student head, cached top-k (+ tail) and samples."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(T, V, generator=g, dtype=F64) * 2.0, dim=-1)
    lp_sorted, order = p.log().sort(dim=-1, descending=True)
    ids = order[:, :k]
    tail = p.gather(1, order[:, k:]).sum(-1).log() if k < V else torch.full((T,), float("-inf"), dtype=F64)
    counts = torch.zeros(T, V, dtype=F64).scatter_add_(
        1, torch.multinomial(p, 16, replacement=True, generator=g), torch.ones(T, 16, dtype=F64)
    )
    weights = counts / 16
    # --sampling tail: 16 draws from p restricted to the ids outside the top-k
    outside = torch.ones(T, V, dtype=torch.bool).scatter(1, ids, False)
    tail_counts = torch.zeros(T, V, dtype=F64)
    if k < V:
        tail_draws = torch.multinomial(p * outside, 16, replacement=True, generator=g)
        tail_counts.scatter_add_(1, tail_draws, torch.ones(T, 16, dtype=F64))
    tail_weights = tail_counts / 16
    hidden = torch.randn(T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64) * 0.5
    gold = torch.multinomial(p, 1, generator=g)[:, 0]
    targets = TeacherTargets(
        topk_ids=ids,
        topk_logprobs=lp_sorted[:, :k].to(dtype),
        tail_logmass=tail.to(dtype),
        sample_ids=torch.where(counts > 0, torch.arange(V).expand(T, V), -1),
        sample_weights=weights.to(dtype),
    )
    q = torch.softmax(hidden @ weight.T + bias, dim=-1)
    return {
        "p": p, "q": q, "ids": ids, "gold": gold, "targets": targets, "sample_weights_dense": weights,
        "tail_weights_dense": tail_weights, "tail_sample_weights": tail_weights.to(dtype),
        "tail_sample_ids": torch.where(tail_counts > 0, torch.arange(V).expand(T, V), -1),
        "hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": bias.to(dtype),
    }


def logits_of(case: dict) -> torch.Tensor:
    return case["hidden"] @ case["weight"].T + case["bias"]


def chunked(case: dict, c: KDLossConfig, chunk_size: int | None = 4, **kw):
    return chunked_kd_loss(
        case["hidden"], case["weight"], tg(case, c), case["gold"], c, bias=case["bias"], chunk_size=chunk_size, **kw
    )


def grads_of(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    return [loss, *torch.autograd.grad(loss, leaves)]


# ------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_full_vocab_topk_equals_dense_loss(name: str) -> None:
    """k == V (tail -inf): every sparse loss equals the dense full-distribution loss."""
    case = make_case(V=50, k=50)
    c = cfg(name, ce_weight=0.25)
    expected = ref_loss(case, c)
    if name == "topk_renorm":  # renormalizing a full top-k changes nothing: it is plain KL
        assert torch.allclose(expected, ref_loss(case, cfg("forward_kl", ce_weight=0.25)), atol=1e-12)
    sparse, metrics = sparse_kd_loss(logits_of(case), tg(case, c), case["gold"], c)
    chunk, chunk_metrics = chunked(case, c)
    assert torch.allclose(sparse, expected, rtol=1e-10, atol=1e-12), (sparse, expected)
    assert torch.allclose(chunk, expected, rtol=1e-10, atol=1e-12), (chunk, expected)
    assert metrics["n_tokens"] == chunk_metrics["n_tokens"] == 6
    assert math.isclose(metrics["kd"], chunk_metrics["kd"], rel_tol=1e-10)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_topk_with_tail_equals_dense_coarse_loss(name: str, tau: float) -> None:
    """k < V: each loss equals the dense loss on the merged (k+1)-outcome distributions."""
    if name in ("rs_kd", "tail_rs") and tau != 1.0:
        pytest.skip(f"{name} is defined at tau == 1 only")
    case = make_case(V=50, k=7, seed=1)
    c = cfg(name, tau=tau, ce_weight=0.1)
    expected = ref_loss(case, c)
    sparse, _ = sparse_kd_loss(logits_of(case), tg(case, c), case["gold"], c)
    chunk, _ = chunked(case, c, chunk_size=5)
    assert torch.allclose(sparse, expected, rtol=1e-10, atol=1e-12), (sparse, expected)
    assert torch.allclose(chunk, expected, rtol=1e-10, atol=1e-12), (chunk, expected)


@pytest.mark.parametrize("name", COARSE + ["topk_renorm"])
def test_temperature_full_vocab_is_exact_tempering(name: str) -> None:
    """With k == V the single-token tail rule is exact: tau^2 * D(softmax(lp/tau), softmax(z/tau))."""
    tau = 2.0
    case = make_case(V=30, k=30, seed=2)
    c = cfg(name, tau=tau)
    p_tau = torch.softmax(case["p"].log() / tau, dim=-1)
    q_tau = torch.softmax(logits_of(case) / tau, dim=-1)
    expected = tau**2 * (ref_divergence(name, p_tau, q_tau, c) if name != "topk_renorm" else ref_kl(p_tau, q_tau))
    got, _ = chunked(case, c)
    assert torch.allclose(got, expected.mean(), rtol=1e-10), (got, expected.mean())


def test_temperature_one_is_untempered_and_tau_scaling() -> None:
    case = make_case(V=40, k=6, seed=3)
    logits = logits_of(case)
    base, _ = sparse_kd_loss(logits, case["targets"], None, KDLossConfig())
    p_c, q_c = coarse(case["p"], case["ids"]), coarse(case["q"], case["ids"])
    assert torch.allclose(base, ref_kl(p_c, q_c).mean(), rtol=1e-10)
    # Continuity at tau = 1 through the tempered branch.
    near, _ = sparse_kd_loss(logits, case["targets"], None, KDLossConfig(tau=1.0 + 1e-7))
    assert torch.allclose(near, base, rtol=1e-5)
    # tau^2 times the divergence of the tempered coarse distributions.
    tempered, _ = sparse_kd_loss(logits, case["targets"], None, KDLossConfig(tau=3.0))
    expected = 9.0 * ref_kl(ref_temper(p_c, 3.0), ref_temper(q_c, 3.0)).mean()
    assert torch.allclose(tempered, expected, rtol=1e-10)


def test_jsd_and_skew_end_points() -> None:
    case = make_case(seed=4)
    logits = logits_of(case)

    def value(**kw) -> torch.Tensor:
        return sparse_kd_loss(logits, case["targets"], None, KDLossConfig(**kw))[0]

    fkl, rkl = value(loss="forward_kl"), value(loss="reverse_kl")
    assert torch.equal(value(loss="tail"), fkl)
    assert torch.allclose(value(loss="jsd", beta=0.0), fkl, rtol=1e-12)
    assert torch.allclose(value(loss="jsd", beta=1.0), rkl, rtol=1e-12)
    assert torch.allclose(value(loss="skew_forward", alpha=0.0), fkl, rtol=1e-12)
    assert torch.allclose(value(loss="skew_reverse", alpha=0.0), rkl, rtol=1e-12)
    # The mixture formula itself behaves like beta * FKL near 0 and (1 - beta) * RKL near 1.
    # (The relative error of the limit is about beta * chi^2, hence a very small beta.)
    beta = 1e-8
    assert torch.allclose(value(loss="jsd", beta=beta) / beta, fkl, rtol=1e-4)
    assert torch.allclose(value(loss="jsd", beta=1 - beta) / beta, rkl, rtol=1e-4)


def test_ce_weight_mix_and_global_token_count() -> None:
    case = make_case(seed=5)
    logits = logits_of(case)
    kd, m_kd = sparse_kd_loss(logits, case["targets"], case["gold"], KDLossConfig(ce_weight=0.0))
    ce, m_ce = sparse_kd_loss(logits, case["targets"], case["gold"], KDLossConfig(ce_weight=1.0))
    mix, m_mix = chunked(case, KDLossConfig(ce_weight=0.3))
    assert torch.allclose(mix, 0.7 * kd + 0.3 * ce, rtol=1e-12)
    assert math.isclose(m_mix["kd"], m_kd["kd"], rel_tol=1e-10) and math.isclose(m_mix["ce"], m_ce["ce"], rel_tol=1e-10)
    gold_lp = torch.log_softmax(logits, -1).gather(1, case["gold"][:, None])
    assert torch.allclose(ce, -gold_lp.mean(), rtol=1e-12)
    # A global denominator (e.g. 3 micro-batches of 6 tokens) divides the sums by 18.
    scaled, metrics = chunked(case, KDLossConfig(ce_weight=0.3), num_tokens=18)
    assert torch.allclose(scaled, mix / 3, rtol=1e-12)
    assert math.isclose(metrics["kd"], m_mix["kd"] / 3, rel_tol=1e-10) and metrics["n_tokens"] == 6


# --------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "akl"])
def test_chunked_gradcheck(name: str) -> None:
    """Finite differences in float64. AKL is excluded: its published head/tail weights are
    detached, so its gradient is deliberately not the derivative of its value (it is
    compared to the autograd reference in the next test instead)."""
    case = make_case(T=5, V=12, H=3, k=4, seed=6)
    c = cfg(name, ce_weight=0.3, tau=1.0 if name in ("rs_kd", "tail_rs") else 1.5)

    def fn(h, w, b):
        return chunked_kd_loss(h, w, tg(case, c), case["gold"], c, bias=b, chunk_size=2)[0]

    inputs = [case[x].clone().requires_grad_() for x in ("hidden", "weight", "bias")]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_chunked_gradient_matches_reference_and_chunking(name: str) -> None:
    case = make_case(T=7, V=40, k=6, seed=7)
    c = cfg(name, ce_weight=0.2)
    inputs = (case["hidden"], case["weight"], case["bias"])

    def reference(h, w, b):
        return sparse_kd_loss(h @ w.T + b, tg(case, c), case["gold"], c)[0]

    expected = grads_of(reference, *inputs)
    for chunk_size in (1, 3, 7, None):
        def fn(h, w, b, chunk_size=chunk_size):
            return chunked_kd_loss(h, w, tg(case, c), case["gold"], c, bias=b, chunk_size=chunk_size)[0]

        for got, want in zip(grads_of(fn, *inputs), expected):
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (name, chunk_size)


def test_backward_scales_by_upstream_gradient_and_no_grad_path() -> None:
    case = make_case(seed=8)
    h = case["hidden"].clone().requires_grad_()
    loss, _ = chunked_kd_loss(h, case["weight"], case["targets"], None, KDLossConfig(), chunk_size=4)
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, h)
    assert torch.allclose(g3, 3.0 * g1, rtol=1e-12)
    with torch.no_grad():
        again, _ = chunked_kd_loss(h, case["weight"], case["targets"], None, KDLossConfig(), chunk_size=4)
    assert torch.equal(again, loss.detach())


def test_bf16_weights_match_float32() -> None:
    case = make_case(T=16, V=64, H=16, k=8, seed=9, dtype=torch.float32)
    c = KDLossConfig(ce_weight=0.5)
    h32 = case["hidden"].clone().requires_grad_()
    w32 = case["weight"].clone().requires_grad_()
    loss32, _ = chunked_kd_loss(h32, w32, case["targets"], case["gold"], c, chunk_size=5)
    loss32.backward()
    h16 = case["hidden"].bfloat16().requires_grad_()
    w16 = case["weight"].bfloat16().requires_grad_()
    loss16, _ = chunked_kd_loss(h16, w16, case["targets"], case["gold"], c, chunk_size=5)
    loss16.backward()
    assert loss16.dtype == torch.float32 and w16.grad.dtype == torch.bfloat16
    assert torch.allclose(loss16, loss32, rtol=5e-2)
    cos = torch.nn.functional.cosine_similarity(w16.grad.float().flatten(), w32.grad.flatten(), dim=0)
    assert cos > 0.99


# ------------------------------------------------------------------ rs_kd target


def test_rs_kd_target_is_unbiased_for_dense_cross_entropy() -> None:
    """Average of the sampled-target loss over many count vectors ~ CE(p, q)."""
    g = torch.Generator().manual_seed(1234)
    V, R, N = 20, 4000, 16
    p = torch.softmax(torch.randn(V, generator=g, dtype=F64) * 1.5, -1)
    logits = torch.randn(V, generator=g, dtype=F64)
    log_q = torch.log_softmax(logits, -1)
    draws = torch.multinomial(p.expand(R, V), N, replacement=True, generator=g)
    counts = torch.zeros(R, V, dtype=F64).scatter_add_(1, draws, torch.ones(R, N, dtype=F64))
    targets = TeacherTargets(
        sample_ids=torch.where(counts > 0, torch.arange(V).expand(R, V), -1), sample_weights=counts / N
    )
    loss, metrics = sparse_kd_loss(logits.expand(R, V), targets, None, KDLossConfig(loss="rs_kd"))
    dense_ce = -(p * log_q).sum()
    var_one_draw = (p * log_q**2).sum() - dense_ce**2
    std_err = (var_one_draw / (N * R)).sqrt()
    assert abs(loss - dense_ce) < 4 * std_err, (loss, dense_ce, std_err)
    # rs_kl = KL(w || q): the CE minus the empirical entropy, >= 0.
    neg_entropy = torch.special.xlogy(counts / N, counts / N).sum(-1).mean()
    assert math.isclose(metrics["rs_kl"], float(loss + neg_entropy), rel_tol=1e-10)
    assert metrics["rs_kl"] >= 0
    # Same value through the chunked path.
    w = torch.eye(V, dtype=F64)
    chunk, _ = chunked_kd_loss(logits.expand(R, V).contiguous(), w, targets, None, KDLossConfig(loss="rs_kd"))
    assert torch.allclose(chunk, loss, rtol=1e-10)


def test_tail_rs_with_the_exact_tail_shape_is_the_full_vocabulary_kl() -> None:
    """With weights equal to the teacher's exact tail shape p_j / p_tail (the expectation of
    the sampled weights), tail_rs equals the dense full-vocabulary forward KL, value and
    gradient; since the loss is affine in the weights, sampled weights give an unbiased
    gradient."""
    case = make_case(T=6, V=40, k=5, seed=12)
    p, ids = case["p"], case["ids"]
    outside = torch.ones_like(p, dtype=torch.bool).scatter(1, ids, False)
    shape = p * outside / (p * outside).sum(-1, keepdim=True)
    t = case["targets"]
    exact = TeacherTargets(t.topk_ids, t.topk_logprobs, t.tail_logmass,
                           torch.where(outside, torch.arange(40).expand(6, 40), -1), shape)
    c = KDLossConfig(loss="tail_rs")
    inputs = (case["hidden"], case["weight"], case["bias"])

    def dense(h, w, b):
        return ref_kl(p, torch.softmax(h @ w.T + b, dim=-1)).mean()

    def sparse(h, w, b):
        return chunked_kd_loss(h, w, exact, None, c, bias=b, chunk_size=4)[0]

    for got, want in zip(grads_of(sparse, *inputs), grads_of(dense, *inputs)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # Sampled weights: the gradient is affine in them, so averaging the sampled losses'
    # gradients over draws converges to this one (checked on the mean of 2,000 draws).
    g = torch.Generator().manual_seed(3)
    R = 2000
    draws = torch.multinomial(shape.repeat(R, 1), 16, replacement=True, generator=g)
    counts = torch.zeros(R * 6, 40, dtype=F64).scatter_add_(1, draws, torch.ones(R * 6, 16, dtype=F64))
    mean_w = (counts / 16).view(R, 6, 40).mean(0)
    averaged = TeacherTargets(t.topk_ids, t.topk_logprobs, t.tail_logmass, exact.sample_ids, mean_w)
    got = grads_of(lambda h, w, b: chunked_kd_loss(h, w, averaged, None, c, bias=b)[0], *inputs)
    want = grads_of(dense, *inputs)
    assert torch.allclose(got[2], want[2], atol=0.02), (got[2] - want[2]).abs().max()
    # The tail term is >= 0: the coarse KL (`tail`) is a lower bound of tail_rs.
    kd_tail = chunked(case, cfg("tail"))[1]["kd"]
    kd_tail_rs = chunked(case, c)[1]["kd"]
    assert kd_tail_rs >= kd_tail


# ---------------------------------------------------------------- degenerate inputs


def extreme_case(teacher_tail_inf: bool, student_saturated: bool) -> dict:
    """float32 case: the teacher top-k holds all mass and/or the student puts ~all mass on it."""
    case = make_case(T=6, V=50, H=8, k=5, seed=10, dtype=torch.float32)
    t = case["targets"]
    if teacher_tail_inf:
        t.topk_logprobs = torch.log_softmax(t.topk_logprobs, dim=-1)
        t.tail_logmass = torch.full_like(t.tail_logmass, float("-inf"))
    if student_saturated:
        # Logits are h @ W^T: about +32..+46 at the top-k ids and -32 elsewhere, so the
        # student's tail mass (~1e-27) is far below float32 resolution of 1 - sum q_K.
        w = case["weight"].clone()
        h = case["hidden"].clone()
        h[:] = 4.0
        w[:] = -1.0
        w[t.topk_ids[0]] = 1.0 + 0.1 * torch.arange(5, dtype=torch.float32)[:, None]
        t.topk_ids = t.topk_ids[0].expand(6, 5).contiguous()
        case.update(hidden=h, weight=w, bias=torch.zeros_like(case["bias"]))
        lp = torch.log_softmax(h @ w.T, dim=-1)
        # Saturated: log(1 - exp(logsumexp(top-k))) would be log(0) or NaN in float32.
        assert torch.logsumexp(lp.gather(1, t.topk_ids), dim=-1).ge(0).all()
    return case


@pytest.mark.parametrize("teacher_tail_inf,student_saturated", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_no_nan_or_inf_in_degenerate_cases(teacher_tail_inf: bool, student_saturated: bool, tau: float) -> None:
    case = extreme_case(teacher_tail_inf, student_saturated)
    for name in LOSS_NAMES:
        if name in ("rs_kd", "tail_rs") and tau != 1.0:
            continue
        c = cfg(name, tau=tau, ce_weight=0.1)
        h = case["hidden"].clone().requires_grad_()
        w = case["weight"].clone().requires_grad_()
        loss, metrics = chunked_kd_loss(h, w, tg(case, c), case["gold"], c, bias=case["bias"], chunk_size=4)
        loss.backward()
        assert torch.isfinite(loss), name
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all(), name
        assert all(math.isfinite(v) for v in metrics.values()), (name, metrics)
        ref = sparse_kd_loss(case["hidden"] @ case["weight"].T + case["bias"], tg(case, c), case["gold"], c)[0]
        assert torch.allclose(loss, ref, rtol=1e-4, atol=1e-5), (name, loss, ref)


def test_student_tail_from_topk_is_stable() -> None:
    # Moderate tails: matches the exact value.
    lp = torch.log_softmax(torch.randn(4, 10, dtype=F64), -1)[:, :6]
    exact = torch.log1p(-lp.exp().sum(-1))
    assert torch.allclose(student_tail_from_topk(lp), exact, rtol=1e-12)
    tiny = torch.log(torch.tensor([1e-3, 1e-12], dtype=F64))
    assert torch.allclose(student_tail_from_topk(torch.log1p(-tiny.exp())[:, None]), tiny, rtol=1e-6)
    # All mass inside the top-k (sums to >= 1 in float32): finite, with finite gradients.
    x = torch.log_softmax(torch.tensor([[30.0, 29.0, -30.0], [0.0, 0.0, 0.0]]), -1).requires_grad_()
    tail = student_tail_from_topk(x)
    tail.sum().backward()
    assert torch.isfinite(tail).all() and torch.isfinite(x.grad).all()
    assert tail.max() <= math.log(torch.finfo(torch.float32).eps) + 1e-4


# ------------------------------------------------------------------------ misc


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="unknown KD loss"):
        KDLossConfig(loss="kl")
    with pytest.raises(ValueError, match=r"needs tau \(--temperature\) == 1.*a top-k cache"):
        KDLossConfig(loss="rs_kd", tau=2.0)
    with pytest.raises(ValueError, match="use --loss tail on this cache"):
        KDLossConfig(loss="tail_rs", tau=2.0)
    with pytest.raises(ValueError, match=r"ce_weight \(--ce-weight\)"):
        KDLossConfig(loss="tail", ce_weight=2.0)
    case = make_case()
    no_samples = TeacherTargets(case["targets"].topk_ids, case["targets"].topk_logprobs, case["targets"].tail_logmass)
    with pytest.raises(ValueError, match="sample_ids"):
        chunked_kd_loss(case["hidden"], case["weight"], no_samples, None, KDLossConfig(loss="rs_kd"))
    with pytest.raises(ValueError, match="gold_ids"):
        chunked_kd_loss(case["hidden"], case["weight"], case["targets"], None, KDLossConfig(ce_weight=0.5))


def test_choose_chunk_size_and_empty_batch() -> None:
    assert choose_chunk_size(151936, 512 * 2**20) == 883
    assert choose_chunk_size(10**9, 1) == 1
    case = make_case()
    empty = case["targets"].rows(0, 0)
    h = case["hidden"][:0].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    loss, metrics = chunked_kd_loss(h, w, empty, case["gold"][:0], KDLossConfig(ce_weight=0.5))
    loss.backward()
    assert loss.item() == 0.0 and metrics["n_tokens"] == 0 and torch.count_nonzero(w.grad) == 0


def test_int32_ids_from_the_cache_are_accepted() -> None:
    case = make_case(seed=11)
    t = case["targets"]
    t32 = TeacherTargets(t.topk_ids.int(), t.topk_logprobs, t.tail_logmass, t.sample_ids.int(), t.sample_weights)
    for name in ("tail", "rs_kd"):
        c = cfg(name, ce_weight=0.5)
        want, _ = chunked(case, c)
        got, _ = chunked_kd_loss(case["hidden"], case["weight"], t32, case["gold"].int(), c, bias=case["bias"])
        ref, _ = sparse_kd_loss(logits_of(case), t32, case["gold"].int(), c)
        assert torch.allclose(got, want, rtol=1e-12) and torch.allclose(ref, want, rtol=1e-10)
