"""The output transform of a causal LM, found by checking against ``model.forward``.

kdcache computes logits outside ``model.forward`` on both sides (the teacher's transformers
backend feeds chunks of hidden states to the statistics, the student's chunked loss never
builds full logits), so it must apply whatever the architecture does after ``lm_head``:
Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``, HyperCLOVAX
multiplies by it, Gemma 2/3 soft-cap, and the next architecture will do something else.
Instead of a list of config keys, :func:`probe_output_transform` runs ``model.forward`` once
on a short probe and fits the transform that reproduces its logits from the decoder's
hidden states: ``logits = softcap(scale * (h @ W.T + b))``, ``scale`` by least squares and
``softcap`` (``c * tanh(x / c)``) only when the config names one. A model whose logits
neither form reproduces is refused with one line naming its architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from kdcache.errors import KdcacheError

#: Probe length in tokens and the seed of its random ids.
PROBE_TOKENS = 12
PROBE_SEED = 1234


@dataclass(frozen=True)
class OutputTransform:
    """``logits = softcap(scale * raw)`` with ``raw = h @ W.T + b``.

    Attributes:
        scale: multiplier of the raw logits (1.0 for most architectures).
        softcap: ``c`` of ``c * tanh(x / c)``, or None.
    """

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, raw: Tensor) -> Tensor:
        out = raw * self.scale if self.scale != 1.0 else raw
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @property
    def is_linear(self) -> bool:
        return self.softcap is None


def _tolerance(ref: Tensor, dtype: torch.dtype) -> float:
    """Agreement needed between kdcache's logits and ``model.forward``'s, in logit units:
    a few roundings of the model's dtype at the logits' scale."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1e-6
    return 16 * max(eps, 1e-6) * (1.0 + float(ref.abs().max()))


@torch.no_grad()
def probe_output_transform(
    forward_logits: Callable[[Tensor], Tensor],
    hidden_states: Callable[[Tensor], Tensor],
    raw_logits: Callable[[Tensor], Tensor],
    *,
    vocab_rows: int,
    config_softcap: float | None,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
    allow_softcap: bool = True,
) -> OutputTransform:
    """Fit and check the transform between ``raw_logits(hidden_states(ids))`` and ``forward_logits(ids)``.

    Args:
        forward_logits: ``ids [1, T] -> [T, V]`` the model's own logits (``model(ids).logits[0]``).
        hidden_states: ``ids [1, T] -> [T, H]`` the decoder's final hidden states.
        raw_logits: ``[T, H] -> [T, V]`` ``h @ W.T + b`` with kdcache's head weights.
        vocab_rows: output rows (probe ids are drawn below it).
        config_softcap: the soft-cap value the config names (``final_logit_softcapping``), if any.
        dtype: the model's compute dtype (sets the tolerance).
        name: what to call the model in an error (its architecture).
        allow_softcap: False where the caller cannot apply a soft-cap (the student's chunked
            loss, whose gradient assumes linear logits).

    Raises:
        KdcacheError: no transform of that form reproduces ``model.forward``, or it soft-caps
            and ``allow_softcap`` is False.
    """
    generator = torch.Generator().manual_seed(PROBE_SEED)
    ids = torch.randint(0, max(1, vocab_rows), (1, PROBE_TOKENS), generator=generator).to(device)
    ref = forward_logits(ids).float()
    raw = raw_logits(hidden_states(ids)).float()
    if not (torch.isfinite(ref).all() and torch.isfinite(raw).all()):
        raise KdcacheError(f"{name}: non-finite logits on a {PROBE_TOKENS}-token probe at load time "
                           "(overflow in this dtype? try --dtype bfloat16 or float32)")
    tol = _tolerance(ref, dtype)
    candidates = []
    denominator = float((raw * raw).sum())
    scale = float((ref * raw).sum()) / denominator if denominator > 0 else 1.0
    candidates.append(OutputTransform(1.0))
    if math.isfinite(scale) and scale != 0.0:
        candidates.append(OutputTransform(_round_scale(scale)))
    if config_softcap:
        candidates += [OutputTransform(1.0, float(config_softcap))]
        capped_scale = _softcap_scale(ref, raw, float(config_softcap))
        if capped_scale is not None:
            candidates.append(OutputTransform(_round_scale(capped_scale), float(config_softcap)))
    worst = math.inf
    for candidate in candidates:
        error = float((candidate.apply(raw) - ref).abs().max())
        worst = min(worst, error)
        if error <= tol:
            if not candidate.is_linear and not allow_softcap:
                raise KdcacheError(f"{name}: its logits are soft-capped (c = {candidate.softcap}), which kdcache's "
                                   "chunked student loss cannot apply; distill into another architecture")
            return candidate
    raise KdcacheError(
        f"{name}: kdcache cannot reproduce this architecture's logits outside model.forward (best max difference "
        f"{worst:.3g} on a probe, allowed {tol:.3g}); it applies an output transform kdcache does not know"
    )


def _round_scale(scale: float) -> float:
    """A fitted scale snapped to the nearest simple value when within float noise (``0.25``
    fits as ``0.2500001``): keeps ``1.0`` exactly ``1.0``."""
    for simple in (1.0, round(scale, 6)):
        if abs(scale - simple) <= 1e-6 * max(1.0, abs(scale)):
            return simple
    return scale


def _softcap_scale(ref: Tensor, raw: Tensor, cap: float) -> float | None:
    """Least-squares scale inside a soft-cap: ``atanh(ref / c) * c ~ scale * raw``."""
    inner = ref / cap
    if float(inner.abs().max()) >= 1.0:
        return None
    target = torch.atanh(inner) * cap
    denominator = float((raw * raw).sum())
    return float((target * raw).sum()) / denominator if denominator > 0 else None
