"""The student model: loading (full, LoRA, QLoRA), the packed forward pass, and export.

The loss never needs full-vocabulary logits for a whole micro-batch: :func:`hidden_states`
runs only the decoder body and returns the final hidden states of the supervised
positions; :func:`lm_head_params` gives the output layer's weight for the chunked loss.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcache.errors import KdcacheError, first_line
from kdcache.student.data import MicroBatch
from kdcache.student.lean import apply_lean_layers

logger = logging.getLogger("kdcache")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA settings; ``targets`` is ``"all-linear"`` or comma-separated module names."""

    r: int
    alpha: float
    dropout: float
    targets: str = "all-linear"
    load_in_4bit: bool = False

    def peft_config(self):
        from peft import LoraConfig

        targets: Any = self.targets
        if targets != "all-linear":
            targets = [t.strip() for t in str(targets).split(",") if t.strip()]
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
            bias="none", task_type="CAUSAL_LM",
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; anything else as torch parses it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise KdcacheError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def resolve_precision(dtype: str, autocast: str, device: torch.device, lora: bool) -> tuple[torch.dtype, torch.dtype | None]:
    """``(weight dtype, autocast dtype or None)`` from ``--dtype`` / ``--autocast``.

    ``--dtype auto``: float32 master weights for full fine-tuning; for LoRA the frozen base
    in bfloat16 where the device supports it. ``--autocast auto``: bfloat16 on CUDA devices
    that support it, none elsewhere.
    """
    if dtype == "auto":
        weights = torch.bfloat16 if (lora and bf16_supported(device)) else torch.float32
    elif dtype in DTYPES:
        weights = DTYPES[dtype]
    else:
        raise KdcacheError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if autocast == "auto":
        amp = torch.bfloat16 if bf16_supported(device) else None
    elif autocast in ("bf16", "bfloat16"):
        if device.type == "cuda" and not bf16_supported(device):
            raise KdcacheError("--autocast bf16: this GPU has no bfloat16 support (use --autocast none)")
        amp = torch.bfloat16
    elif autocast in ("none", "no", "off"):
        amp = None
    else:
        raise KdcacheError(f"--autocast {autocast!r}: use auto, bf16 or none")
    return weights, amp


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """``auto``: flash_attention_2 on CUDA when ``flash_attn`` is installed, else sdpa."""
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_qlora_available(device: torch.device) -> None:
    """QLoRA needs a CUDA device and bitsandbytes; one-line error otherwise."""
    if device.type != "cuda":
        raise KdcacheError("--load-in-4bit (QLoRA) needs a CUDA GPU; use plain LoRA (without --load-in-4bit) here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise KdcacheError("--load-in-4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def _load_error(model: str, exc: Exception) -> KdcacheError:
    return KdcacheError(f"{model}: transformers cannot load the student ({first_line(exc)})")


def load_student(
    model: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    lean_layers: bool = False,
    adapter: str | Path | None = None,
    trainable: bool = True,
) -> nn.Module:
    """A causal LM ready to train (or evaluate), on ``device``.

    Args:
        model: HF directory or hub id of the student (the base model for LoRA).
        dtype: weight dtype (the frozen base's under LoRA; QLoRA computes in it).
        lora: LoRA/QLoRA settings, or None for full fine-tuning.
        lean_layers: swap memory-lean forwards into the RMSNorm and SwiGLU layers
            (``kdcache.student.lean``; same math, fewer activations kept for backward).
        adapter: an existing peft adapter directory to load (resume / evaluation) instead of
            initializing a new one.
        trainable: False to load for evaluation only.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if lora is not None and lora.load_in_4bit:
        check_qlora_available(device)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    try:
        net = AutoModelForCausalLM.from_pretrained(str(model), **kwargs)
    except (ValueError, ImportError) as exc:
        if "attn_implementation" in str(exc) or "flash" in str(exc).lower():
            raise KdcacheError(f"{model}: attention implementation {attn_implementation!r} is not available "
                               f"({first_line(exc)}); pass --attn-implementation sdpa") from None
        raise _load_error(str(model), exc) from None
    except OSError as exc:
        raise _load_error(str(model), exc) from None
    if "quantization_config" not in kwargs:
        net.to(device)
    net.config.use_cache = False
    if lean_layers:
        # Before peft wraps the projections: the probe needs the deterministic (eval-mode,
        # no LoRA dropout) forward; the swapped MLP forward calls whatever gate/up/down are later.
        logger.info(apply_lean_layers(net).summary())
    # Before peft: how model.forward turns hidden states into logits (the chunked loss applies it).
    fit_output_transform(net, str(model))
    if lora is None:
        net.requires_grad_(trainable)
        if gradient_checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return net if trainable else net.eval()

    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if lora.load_in_4bit:
        net = prepare_model_for_kbit_training(
            net, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        net = PeftModel.from_pretrained(net, str(adapter), is_trainable=trainable)
    else:
        net = get_peft_model(net, lora.peft_config())
    # LoRA weights train in float32 even on a low-precision base (autocast handles the matmuls).
    for param in net.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return net if trainable else net.eval()


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that maps input ids to final (normed) hidden states."""
    lm = causal_lm(model)
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if body is None or body is lm:
        body = getattr(lm, "base_model", None)
    if body is None or body is lm:
        raise KdcacheError(f"{type(lm).__name__}: cannot find the decoder body of this model")
    return body


#: Attribute of the causal LM holding its :class:`~kdcache.output_head.OutputTransform`.
TRANSFORM_ATTR = "_kdcache_output_transform"


def fit_output_transform(model: nn.Module, name: str | None = None):
    """Find (once) how ``model.forward`` turns the decoder's hidden states into logits, by a
    probe at load time (:func:`kdcache.output_head.probe_output_transform`), and keep it on the
    causal LM. The chunked loss needs linear logits, so a soft-capped student is refused.

    Raises:
        KdcacheError: one line naming the architecture when no scale reproduces ``model.forward``.
    """
    from kdcache.output_head import probe_output_transform

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise KdcacheError(f"{type(lm).__name__}: the model has no output layer to distill into")
    body = decoder_body(model)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            transform = probe_output_transform(
                lambda ids: lm(input_ids=ids, use_cache=False).logits[0],
                lambda ids: body(input_ids=ids, use_cache=False).last_hidden_state[0],
                head,
                vocab_rows=int(head.weight.shape[0]), config_softcap=getattr(cfg, "final_logit_softcapping", None),
                dtype=head.weight.dtype, device=head.weight.device,
                name=f"{name or type(lm).__name__} ({type(lm).__name__})", allow_softcap=False,
            )
    finally:
        lm.train(was_training)
    setattr(lm, TRANSFORM_ATTR, transform)
    return transform


def lm_head_params(model: nn.Module) -> tuple[Tensor, Tensor | None, float]:
    """``(weight [V, H], bias [V] or None, hidden scale)`` of the output layer.

    ``logits = (scale * h) @ weight.T + bias`` reproduces ``model.forward``'s logits: the scale
    is fitted against ``model.forward`` when the model is loaded (:func:`fit_output_transform`;
    Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``, HyperCLOVAX
    multiplies by it), and the bias is scaled with it.
    """
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise KdcacheError(f"{type(lm).__name__}: the model has no output layer to distill into")
    if hasattr(head, "base_layer"):  # a LoRA-wrapped head: use the frozen base weight
        raise KdcacheError("LoRA on the output layer (lm_head) is not supported; leave it out of --lora-targets")
    transform = getattr(lm, TRANSFORM_ATTR, None) or fit_output_transform(lm)
    bias = getattr(head, "bias", None)
    if bias is not None and transform.scale != 1.0:
        bias = bias * transform.scale
    return head.weight, bias, transform.scale


def output_rows(model: nn.Module) -> int:
    return int(lm_head_params(model)[0].shape[0])


def attention_inputs(seq_lengths: list[int], attn_implementation: str, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """Attention mask for a packed row of sequences, or None.

    sdpa and eager get an additive block-diagonal causal mask ``[1, 1, T, T]`` in ``dtype``,
    the dtype the attention computes in (the autocast dtype under autocast): 0 where a
    query may attend, the dtype's minimum elsewhere. One tensor serves every layer; a boolean
    mask would be converted anew in each layer (under bf16 autocast on an H100 that cost
    4 GiB more at 16k tokens). Other implementations (flash_attention_2/3, flex_attention)
    get None: transformers derives the sequence boundaries from the restarting
    ``position_ids`` (varlen ``cu_seqlens`` / a document block mask). A single sequence
    needs no mask (plain causal attention). Memory: ``T * T * dtype.itemsize`` bytes.
    """
    if len(seq_lengths) == 1 or attn_implementation not in ("sdpa", "eager"):
        return None
    total = sum(seq_lengths)
    seg = torch.repeat_interleave(
        torch.arange(len(seq_lengths), device=device), torch.tensor(seq_lengths, device=device)
    )
    idx = torch.arange(total, device=device)
    blocked = (seg[:, None] != seg[None, :]) | (idx[:, None] < idx[None, :])
    mask = torch.zeros((total, total), dtype=dtype, device=device)
    mask.masked_fill_(blocked, torch.finfo(dtype).min)
    return mask[None, None]


def hidden_states(model: nn.Module, mb: MicroBatch, attn_implementation: str, mask_dtype: torch.dtype) -> Tensor:
    """Final hidden states of the supervised positions of ``mb``: ``[N, H]``.

    Runs the decoder body only (no lm_head, no logits).
    """
    body = decoder_body(model)
    mask = attention_inputs(mb.seq_lengths, attn_implementation, mb.input_ids.device, mask_dtype)
    out = body(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0].index_select(0, mb.hidden_index)


class StudentStep(nn.Module):
    """The student's training (and evaluation) forward as one module: decoder body, then a head.

    ``forward(mb, head, attn_implementation, mask_dtype, autocast_dtype)`` runs
    :func:`hidden_states` (under autocast when ``autocast_dtype`` is set) and returns
    ``head(hidden [N, H], weight [V, H], bias [V] or None, scale)`` with the output layer's
    parameters (:func:`lm_head_params`); the head is the chunked KD loss for training and the
    metric sums for evaluation. One module around the whole step gives FSDP2 and DDP one
    forward to hook: the output layer's weight is gathered whole for the head, and tied
    embeddings (one weight for input and output) live in one FSDP unit.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mb: MicroBatch, head: Any, attn_implementation: str, mask_dtype: torch.dtype,
                autocast_dtype: torch.dtype | None) -> Any:
        with torch.autocast(mb.input_ids.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            hidden = hidden_states(self.model, mb, attn_implementation, mask_dtype)
        weight, bias, scale = lm_head_params(self.model)
        return head(hidden, weight, bias, scale)


def uses_dropout(model: nn.Module) -> list[str]:
    """Where ``model`` draws random numbers in training: dropout modules with ``p > 0`` and
    config dropout rates (e.g. ``attention_dropout``) above 0; empty if none."""
    found = sorted({type(m).__name__ + f"(p={m.p})" for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0})
    lm = causal_lm(model)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for key, value in sorted(vars(cfg).items()):
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found.append(f"{key}={value}")
    return found


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def adapter_base(path: str | Path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def checkpoint_dtype(model: str | Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (config ``dtype`` / ``torch_dtype``), float32 if unknown."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(model))
    except Exception:  # noqa: BLE001
        return torch.float32
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return DTYPES.get(str(value), torch.float32)


def export_model(source: Path, out: Path, *, tokenizer, dtype: torch.dtype, base: str | None = None) -> None:
    """Write a standalone HF model directory (weights in ``dtype`` + tokenizer) atomically.

    ``source`` is a full model directory, or a peft adapter directory whose LoRA weights are
    merged into ``base`` (loaded fresh in ``dtype``, on the CPU). The result loads with
    ``AutoModelForCausalLM.from_pretrained`` and with vLLM.
    """
    from transformers import AutoModelForCausalLM

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if base is not None:
        from peft import PeftModel

        net = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        net = PeftModel.from_pretrained(net, str(source)).merge_and_unload()
    else:
        net = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    net.config.use_cache = True
    net.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del net
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
