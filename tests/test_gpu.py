"""Checks that need a CUDA GPU (run on the device machine; skipped where there is none).

* the memory-lean layers on CUDA, where they run PyTorch's fused RMSNorm kernels: as
  accurate as the plain layers against a float64 reference, and the promised bytes saved;
* QLoRA end to end: a 4-bit NF4 base (bitsandbytes) trains LoRA adapters from a cache and
  exports an adapter and a merged model that transformers loads.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qwen2(dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=2816, vocab_size=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(device)


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


@cuda
def test_lean_layers_on_cuda_match_the_float64_reference_and_save_memory():
    from kdcache.student.lean import _use_fused, apply_lean_layers

    ids = torch.randint(0, 4096, (2, 1024), generator=torch.Generator().manual_seed(1)).cuda()
    reference_model = _qwen2(torch.float64, "cuda")
    plain_model = copy.deepcopy(reference_model).to(torch.bfloat16).train()
    reference = _grads(reference_model, ids)
    lean_model = copy.deepcopy(plain_model)
    lean = apply_lean_layers(lean_model)
    assert (len(lean.rms_norms), len(lean.swiglus)) == (5, 2)
    norm = lean.rms_norms[0]
    assert _use_fused(torch.empty(1, device="cuda", dtype=torch.bfloat16), norm.weight)
    errors = {}
    peaks = {}
    for name, model in (("plain", plain_model), ("lean", lean_model)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        hidden = model.model(input_ids=ids).last_hidden_state
        peaks[name] = torch.cuda.max_memory_allocated() - before
        del hidden
        grads = _grads(model, ids)
        errors[name] = float((grads - reference).norm() / reference.norm())
    print(json.dumps({"relative_grad_error_vs_fp64": errors, "forward_peak_bytes": peaks}))
    assert errors["plain"] < 0.1, errors  # bf16 rounding, not a different model
    assert errors["lean"] <= 1.25 * errors["plain"], errors
    # Per token and layer 2 x 4H (norms) + 2I (SwiGLU) bytes fewer: 2048 tokens, 2 layers.
    assert peaks["plain"] - peaks["lean"] >= 0.8 * 2048 * 2 * (8 * 1024 + 2 * 2816), peaks


@cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_trains_and_exports(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdcache.student.train import train_student
    from tests.test_train import config, make_cache, texts

    cache = make_cache(tmp_path / "cache", tiny_llama, texts(24, 0))
    out = tmp_path / "qlora"
    summary = train_student(config(tiny_llama, cache, out, device="cuda", lora_r=8, load_in_4bit=True, max_steps=3,
                                   lr=1e-3, final_model="last"))
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["type"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (out / "COMPLETE").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in merged.parameters()) > 0
