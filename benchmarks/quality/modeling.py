"""Loading causal LMs and running them to the final hidden state at the supervised positions.

Full-vocabulary logits are never built for a whole batch: callers take the hidden states at the
supervised positions (``[T, H]``) and apply the LM head in chunks of positions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from benchmarks.quality.tokens import Batch


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``dtype == "bfloat16"``, else a no-op (float32 everywhere)."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return contextlib.nullcontext()


def load_lm(path: str | Path, device: torch.device, *, train: bool = False) -> torch.nn.Module:
    """A causal LM with float32 weights on ``device``, in train or eval mode (no dropout either way
    for Llama; eval mode also turns off gradient bookkeeping via ``requires_grad_``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    model.config.use_cache = False
    if train:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model


def selected_hidden(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Final hidden states at the positions predicting ``batch.gold``: ``[T, H]``."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    return hidden[batch.rows, batch.cols]


def head_logprobs(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 log-softmax over the model's full output rows for ``hidden`` ``[C, H]``: ``[C, V]``."""
    logits = model.get_output_embeddings()(hidden)
    return torch.log_softmax(logits.float(), dim=-1)
