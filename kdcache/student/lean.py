"""Memory-lean forwards for the student's RMSNorm and SwiGLU layers (same math, fewer saved tensors).

Activations saved for backward dominate a training step's memory once the loss is chunked
(``kdcache.student.chunked``). Two layer types of Llama-family decoders save far more than
their backward needs, per token and layer (``H`` hidden size, ``I`` MLP width, bf16):

* transformers' eager RMSNorm upcasts to float32 and keeps the float32 input and the bf16
  normalized output for backward (``4H + 2H`` bytes). :class:`RMSNormFunction` keeps the
  bf16 input and one float32 ``rstd`` (``2H + 4`` bytes), and on CUDA runs PyTorch's fused
  RMSNorm kernels instead of eight elementwise passes.
* SwiGLU ``down(silu(gate(x)) * up(x))`` keeps ``gate``, ``silu(gate)``, ``up`` and the
  product. :class:`SiLUMul` keeps ``gate`` and ``up`` and recomputes ``silu(gate)`` in
  backward: ``2I`` bytes less, for one extra elementwise pass.

:func:`apply_lean_layers` swaps these forwards in on the module instances it finds, after
checking on a random probe that the swapped forward gives the module's own output (to
rounding), so an architecture with a different norm (Gemma's ``1 + weight``) or MLP is left
as it is. LoRA-wrapped projections keep working: the MLP forward calls its submodules.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SiLUMul(torch.autograd.Function):
    """``silu(gate) * up`` saving only ``gate`` and ``up``; ``silu(gate)`` is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (``[..., I]`` each); memory-lean under autograd."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        if gate.dtype != up.dtype:  # autocast off, mixed inputs: let autograd promote
            return F.silu(gate) * up
        return SiLUMul.apply(gate, up)
    return F.silu(gate) * up


def _rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """transformers' Llama RMSNorm: ``(weight * (x * rstd).to(x.dtype), rstd [..., 1] float32)``."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def _use_fused(x: Tensor, weight: Tensor) -> bool:
    # PyTorch's fused RMSNorm kernels run on CUDA only (the CPU op has no backward).
    return x.is_cuda and weight.dtype == x.dtype and _HAS_FUSED_RMS_NORM


_HAS_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm") and hasattr(torch.ops.aten, "_fused_rms_norm_backward")


class RMSNormFunction(torch.autograd.Function):
    """Llama-style RMSNorm saving only its input and one float32 ``rstd`` per row.

    Forward: ``weight * (x * rstd)``, ``rstd = 1 / sqrt(mean(x**2) + eps)`` computed in float32
    (on CUDA PyTorch's fused kernel, which rounds once instead of twice). Backward, with
    ``xh = x * rstd`` and ``gh = grad * weight`` (float32):
    ``dx = rstd * (gh - xh * mean(gh * xh))``, ``dweight = sum over rows of grad * xh``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        shape = [x.shape[-1]]
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 math as written
            if _use_fused(x, weight):
                y, rstd = torch.ops.aten._fused_rms_norm(x, shape, weight, eps)
            else:
                y, rstd = _rms_norm_reference(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if _use_fused(x, weight) and grad.dtype == x.dtype:
            dx, dw = torch.ops.aten._fused_rms_norm_backward(
                grad.contiguous(), x, [x.shape[-1]], rstd, weight, [need_x, need_w]
            )
            return (dx if need_x else None), (dw if need_w else None), None
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xh = x.to(acc) * rstd.to(acc)
        dx = dw = None
        if need_w:
            dw = (grad.to(acc) * xh).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if need_x:
            gh = grad.to(acc) * weight.to(acc)
            dx = (rstd.to(acc) * (gh - xh * (gh * xh).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


def _lean_rms_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad):
        return RMSNormFunction.apply(hidden_states, self.weight, self._kdcache_eps)
    return _rms_norm_reference(hidden_states, self.weight, self._kdcache_eps)[0]


def _lean_swiglu_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _norm_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _is_rms_norm_candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and _norm_eps(module) is not None
    )


def _is_swiglu_candidate(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
        and act is not None
        and type(act).__name__ in ("SiLU", "SiLUActivation")
    )


def _probe_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _probe_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _input_width(module: nn.Module) -> int | None:
    if hasattr(module, "gate_proj"):
        width = getattr(module.gate_proj, "in_features", None)
        if width is None and hasattr(module.gate_proj, "base_layer"):
            width = getattr(module.gate_proj.base_layer, "in_features", None)
        return width
    return int(module.weight.shape[0])


def _agrees(module: nn.Module, lean: Callable[[nn.Module, Tensor], Tensor]) -> bool:
    """Whether ``lean`` gives the module's own output and input gradient on a random probe.

    Tolerance: 1e-5 relative in float32/float64; 2e-2 in bf16/fp16, where the fused kernels
    round once instead of twice.
    """
    width = _input_width(module)
    if width is None:
        return False
    dtype = _probe_dtype(module)
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(3, width, generator=gen).to(device=_probe_device(module), dtype=dtype)
    results = []
    try:
        for forward in (lambda x: lean(module, x), module.forward):
            x = probe.clone().requires_grad_(True)
            with torch.enable_grad():
                out = forward(x)
                (grad,) = torch.autograd.grad(out.float().sum(), x)
            results.append((out.detach().float(), grad.float()))
    except Exception:  # noqa: BLE001 -- any failure means: leave the module as it is
        return False
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    for ours, theirs in zip(results[0], results[1]):
        if ours.shape != theirs.shape:
            return False
        scale = theirs.abs().max().clamp(min=1.0)
        if not bool((ours - theirs).abs().max() / scale <= tol):
            return False
    return True


@dataclass
class LeanLayers:
    """What :func:`apply_lean_layers` swapped.

    :meth:`set_active` switches between the lean and the original forwards (benchmarks compare
    both on one model); :meth:`restore` puts the originals back for good.
    """

    rms_norms: list[nn.Module] = field(default_factory=list)
    swiglus: list[nn.Module] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def set_active(self, active: bool) -> None:
        for module in self.rms_norms + self.swiglus:
            module.forward = module._kdcache_lean_forward if active else module._kdcache_original_forward

    def restore(self) -> None:
        self.set_active(False)
        for module in self.rms_norms + self.swiglus:
            del module._kdcache_original_forward, module._kdcache_lean_forward
        self.rms_norms.clear()
        self.swiglus.clear()

    def summary(self) -> str:
        text = f"{len(self.rms_norms)} RMSNorm and {len(self.swiglus)} SwiGLU layers use memory-lean forwards"
        if self.skipped:
            text += f" ({len(self.skipped)} left as they are: {', '.join(sorted(set(self.skipped)))})"
        return text


def apply_lean_layers(model: nn.Module) -> LeanLayers:
    """Swap memory-lean forwards into ``model``'s RMSNorm and SwiGLU modules (in place).

    Only modules whose swapped forward reproduces their own output and input gradient on a
    random probe are changed (see :func:`_agrees`). Returns what changed; ``.restore()``
    undoes it.
    """
    done = LeanLayers()
    for module in model.modules():
        if hasattr(module, "_kdcache_original_forward"):
            continue
        if _is_rms_norm_candidate(module):
            kind, lean, bucket = "RMSNorm", _lean_rms_norm_forward, done.rms_norms
            module._kdcache_eps = _norm_eps(module)
        elif _is_swiglu_candidate(module):
            kind, lean, bucket = "SwiGLU", _lean_swiglu_forward, done.swiglus
        else:
            continue
        module._kdcache_original_forward = module.forward
        if not _agrees(module, lean):
            del module._kdcache_original_forward
            done.skipped.append(f"{type(module).__name__} ({kind})")
            continue
        module._kdcache_lean_forward = types.MethodType(lean, module)
        module.forward = module._kdcache_lean_forward
        bucket.append(module)
    return done
