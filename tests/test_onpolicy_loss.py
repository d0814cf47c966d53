"""The sampled-token reverse-KL loss (``sampled_rkl``) against a dense float64 reference.

The reference builds the student's full softmax from the logits and writes the PPO
objective in its textbook form, ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` with ``A``
detached; the sparse and chunked implementations must match its value and gradients,
inside and outside the clipping region. Two exact identities (no sampling noise) check the
estimator itself: averaged over the sampling distribution, its gradient is the gradient of
the per-position reverse KL, on-policy and with importance weights.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.student.chunked import chunked_kd_loss
from kdcache.student.losses import KDLossConfig, TeacherTargets, sparse_kd_loss

F64 = torch.float64

# (importance weight r, advantage A) per token: inside the clip range, and clipped or not
# on each side, for both signs of A.
CASES = [(1.0, 0.7), (1.0, -0.4), (1.1, 0.3), (0.9, -0.5), (1.5, 0.8), (1.5, -0.6), (0.5, -0.9), (0.5, 0.4),
         (1.25, 1.2), (0.7, -0.2), (2.0, -1.5), (0.3, 2.0)]
EPS = 0.2


def make_case(V: int = 30, H: int = 6, seed: int = 0) -> dict:
    """A linear student head and, per token, the cached ``log p`` and ``log mu`` chosen so that
    the importance weight and the advantage take the values of ``CASES`` at these weights."""
    g = torch.Generator().manual_seed(seed)
    T = len(CASES)
    hidden = torch.randn(T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64) * 0.5
    logq = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    gold = torch.multinomial(logq.exp(), 1, generator=g)[:, 0]
    s = logq.gather(1, gold[:, None])[:, 0]
    ratio = torch.tensor([r for r, _ in CASES], dtype=F64)
    advantage = torch.tensor([a for _, a in CASES], dtype=F64)
    targets = TeacherTargets(target_logprobs=s + advantage, rollout_logprobs=s - ratio.log())
    return {"hidden": hidden, "weight": weight, "bias": bias, "gold": gold, "targets": targets,
            "ratio": ratio, "advantage": advantage}


def ref_loss(h, w, b, case: dict, eps: float | None, ce_weight: float = 0.0) -> torch.Tensor:
    """Dense float64 reference: full log-softmax, textbook PPO, mean over tokens."""
    logq = torch.log_softmax(h @ w.T + b, dim=-1)
    s = logq.gather(1, case["gold"][:, None])[:, 0]
    t, old = case["targets"].target_logprobs, case["targets"].rollout_logprobs
    advantage = (t - s).detach()
    r = torch.exp(s - old)
    per_token = -r * advantage if eps is None else -torch.minimum(r * advantage, r.clamp(1 - eps, 1 + eps) * advantage)
    return ((1 - ce_weight) * per_token - ce_weight * s).mean()


def grads(fn, case: dict) -> list[torch.Tensor]:
    leaves = [case[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def sparse(h, w, b, case, config):
    return sparse_kd_loss(h @ w.T + b, case["targets"], case["gold"], config)[0]


def chunked(h, w, b, case, config, chunk_size=None):
    return chunked_kd_loss(h, w, case["targets"], case["gold"], config, bias=b, chunk_size=chunk_size)[0]


@pytest.mark.parametrize("eps", [EPS, None])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_value_and_gradient_match_dense_reference(eps: float | None, ce_weight: float) -> None:
    case = make_case()
    config = KDLossConfig(loss="sampled_rkl", clip_ratio=eps, ce_weight=ce_weight)
    expected = grads(lambda h, w, b: ref_loss(h, w, b, case, eps, ce_weight), case)
    candidates = {"sparse": lambda h, w, b: sparse(h, w, b, case, config)}
    for chunk_size in (1, 5, None):
        candidates[f"chunked/{chunk_size}"] = lambda h, w, b, c=chunk_size: chunked(h, w, b, case, config, c)
    for name, fn in candidates.items():
        for got, want in zip(grads(fn, case), expected):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name


def test_clipped_tokens_carry_no_gradient_and_the_others_do() -> None:
    case = make_case(seed=1)
    r, a = case["ratio"], case["advantage"]
    clipped = ((a > 0) & (r > 1 + EPS)) | ((a < 0) & (r < 1 - EPS))
    assert 0 < int(clipped.sum()) < len(CASES)  # the cases cover both regions
    h = case["hidden"].clone().requires_grad_()
    loss, metrics = chunked_kd_loss(h, case["weight"], case["targets"], case["gold"],
                                    KDLossConfig(loss="sampled_rkl", clip_ratio=EPS), bias=case["bias"], chunk_size=4)
    (grad_h,) = torch.autograd.grad(loss, h)
    row_norm = grad_h.norm(dim=-1)
    assert torch.all(row_norm[clipped] == 0)
    assert torch.all(row_norm[~clipped] > 0)
    # Clipped tokens still count in the value, at the clipped weight.
    bounded = -(r.clamp(1 - EPS, 1 + EPS) * a)
    plain = -(r * a)
    assert torch.allclose(loss, torch.where(clipped, bounded, plain).mean(), rtol=1e-10)
    assert math.isclose(metrics["clip_frac"], float(clipped.double().mean()), rel_tol=1e-12)
    # rkl: the plain sample mean of log q(x) - log p(x) = -A, whatever the weights.
    assert math.isclose(metrics["rkl"], float(-a.mean()), rel_tol=1e-9)


def test_on_policy_value_is_the_sampled_reverse_kl() -> None:
    """With mu = q (r = 1) the loss value is mean(log q(x) - log p(x)) and its gradient the
    REINFORCE form mean((log q - log p).detach() * grad log q)."""
    case = make_case(seed=2)
    logq = torch.log_softmax(case["hidden"] @ case["weight"].T + case["bias"], dim=-1)
    s = logq.gather(1, case["gold"][:, None])[:, 0]
    case["targets"] = TeacherTargets(target_logprobs=case["targets"].target_logprobs, rollout_logprobs=s.clone())
    config = KDLossConfig(loss="sampled_rkl")
    loss, metrics = chunked_kd_loss(case["hidden"], case["weight"], case["targets"], case["gold"], config,
                                    bias=case["bias"])
    kl_sample = s - case["targets"].target_logprobs
    assert torch.allclose(loss, kl_sample.mean(), rtol=1e-12)
    assert metrics["clip_frac"] == 0.0 and math.isclose(metrics["rkl"], float(kl_sample.mean()), rel_tol=1e-12)

    def reinforce(h, w, b):
        lq = torch.log_softmax(h @ w.T + b, dim=-1).gather(1, case["gold"][:, None])[:, 0]
        return ((lq - case["targets"].target_logprobs).detach() * lq).mean()

    got = grads(lambda h, w, b: chunked(h, w, b, case, config, 3), case)
    want = grads(reinforce, case)
    for g, w in zip(got[1:], want[1:]):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def _logit_grad_of_one_sample(z: torch.Tensor, x: int, logp_x: float, logmu_x: float, eps: float | None) -> torch.Tensor:
    """d loss / d logits for one position whose sampled token is ``x``."""
    z = z.detach().clone().requires_grad_()
    targets = TeacherTargets(target_logprobs=torch.tensor([logp_x], dtype=F64),
                             rollout_logprobs=torch.tensor([logmu_x], dtype=F64))
    loss, _ = sparse_kd_loss(z[None], targets, torch.tensor([x]), KDLossConfig(loss="sampled_rkl", clip_ratio=eps))
    (g,) = torch.autograd.grad(loss, z)
    return g


def test_estimator_expectation_is_the_reverse_kl_gradient() -> None:
    """Exact expectation over the sampled token x ~ mu of the loss gradient:
    sum_x mu(x) grad L(x) = grad_z KL(softmax(z) || p), on-policy (mu = q) and with
    importance weights from another sampling distribution (no clipping)."""
    g = torch.Generator().manual_seed(3)
    V = 7
    z = torch.randn(V, generator=g, dtype=F64)
    logp = torch.log_softmax(torch.randn(V, generator=g, dtype=F64) * 1.5, dim=-1)
    zz = z.clone().requires_grad_()
    logq = torch.log_softmax(zz, dim=-1)
    (exact,) = torch.autograd.grad((logq.exp() * (logq - logp)).sum(), zz)
    q = torch.softmax(z, dim=-1)
    mu_other = torch.softmax(z + torch.randn(V, generator=g, dtype=F64), dim=-1)  # a round-old policy
    for mu in (q, mu_other):
        expected = sum(mu[x] * _logit_grad_of_one_sample(z, x, float(logp[x]), float(mu[x].log()), None)
                       for x in range(V))
        assert torch.allclose(expected, exact, rtol=1e-10, atol=1e-13)
    # Clipping biases it once the rollout policy is far enough away.
    clipped = sum(mu_other[x] * _logit_grad_of_one_sample(z, x, float(logp[x]), float(mu_other[x].log()), 0.05)
                  for x in range(V))
    assert not torch.allclose(clipped, exact, rtol=1e-3)


def test_gradient_is_the_derivative_with_the_advantage_frozen() -> None:
    """At r = 1 the gradient of L is the derivative of ``-r A`` with ``A`` frozen at the
    current weights (checked by finite differences in float64): only ``r`` carries gradient."""
    case = make_case(seed=4)
    logq = torch.log_softmax(case["hidden"] @ case["weight"].T + case["bias"], dim=-1)
    s = logq.gather(1, case["gold"][:, None])[:, 0]
    frozen_advantage = (case["targets"].target_logprobs - s).detach()

    def frozen(h, w, b):  # -r A with A fixed: its true derivative is the estimator's gradient at the centre
        lq = torch.log_softmax(h @ w.T + b, dim=-1).gather(1, case["gold"][:, None])[:, 0]
        return (-torch.exp(lq - s) * frozen_advantage).mean()

    case["targets"] = TeacherTargets(target_logprobs=case["targets"].target_logprobs, rollout_logprobs=s.clone())
    config = KDLossConfig(loss="sampled_rkl", clip_ratio=EPS)
    inputs = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    assert torch.autograd.gradcheck(frozen, inputs)
    got = grads(lambda h, w, b: chunked(h, w, b, case, config, 2), case)
    want = grads(frozen, case)
    for a, b in zip(got[1:], want[1:]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_float32_inputs_and_int32_ids() -> None:
    case = make_case(seed=5)
    config = KDLossConfig(loss="sampled_rkl")
    want = chunked_kd_loss(case["hidden"], case["weight"], case["targets"], case["gold"], config, bias=case["bias"])[0]
    targets32 = TeacherTargets(target_logprobs=case["targets"].target_logprobs.float(),
                               rollout_logprobs=case["targets"].rollout_logprobs.float())
    got, _ = chunked_kd_loss(case["hidden"].float(), case["weight"].float(), targets32, case["gold"].int(), config,
                             bias=case["bias"].float())
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-5)


def test_validation_errors() -> None:
    case = make_case()
    with pytest.raises(ValueError, match="rollout_logprobs"):
        sparse_kd_loss(case["hidden"] @ case["weight"].T, TeacherTargets(target_logprobs=case["targets"].target_logprobs),
                       case["gold"], KDLossConfig(loss="sampled_rkl"))
    with pytest.raises(ValueError, match="gold_ids"):
        chunked_kd_loss(case["hidden"], case["weight"], case["targets"], None, KDLossConfig(loss="sampled_rkl"))
    with pytest.raises(ValueError, match="tau"):
        KDLossConfig(loss="sampled_rkl", tau=2.0)
    with pytest.raises(ValueError, match="clip_ratio"):
        KDLossConfig(loss="sampled_rkl", clip_ratio=0.0)
