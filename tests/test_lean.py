"""Memory-lean RMSNorm/SwiGLU forwards: exact gradients, fewer saved bytes, safe skipping."""

from __future__ import annotations

import copy

import torch

from kdcache.student.lean import RMSNormFunction, SiLUMul, apply_lean_layers


def _qwen2(dtype: torch.dtype = torch.float64, layers: int = 2):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=128, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=352, vocab_size=300, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()


def _param_grads(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of distinct activation storages (not weights) autograd keeps over the decoder body."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids)
    return sum(storages.values())


def test_functions_pass_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
    gate = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiLUMul.apply, (gate, up))


def test_lean_model_has_the_same_outputs_and_gradients():
    model = _qwen2()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    plain_logits = model(input_ids=ids).logits.detach()
    plain = _param_grads(model, ids)
    lean = apply_lean_layers(model)
    assert (len(lean.rms_norms), len(lean.swiglus), lean.skipped) == (5, 2, [])
    # transformers' norm computes in float32 even for float64 weights; ours stays in float64.
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), plain_logits, rtol=1e-6, atol=1e-7)
    swapped = _param_grads(model, ids)
    assert swapped.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(swapped[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)
    lean.set_active(False)
    assert torch.equal(model(input_ids=ids).logits.detach(), plain_logits)
    lean.set_active(True)
    lean.restore()
    assert not any(hasattr(m, "_kdcache_original_forward") for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits.detach(), plain_logits)


def test_lean_layers_keep_fewer_activations():
    """bf16 (as trained on GPUs): RMSNorm stops keeping a float32 copy, SwiGLU stops keeping silu(gate)."""
    model = _qwen2(torch.bfloat16, layers=2).train()
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(2))
    plain = _saved_bytes(model, ids)
    apply_lean_layers(model)
    lean = _saved_bytes(model, ids)
    # Per token and layer: 2 norms x (4H + 2H - 2H) + 2I bytes fewer, of ~(38H + 8I) kept.
    h, i, tokens, layers = 128, 352, 64, 2
    expected_saving = tokens * layers * (2 * 4 * h + 2 * i)
    assert plain - lean >= 0.9 * expected_saving, (plain, lean, expected_saving)
    assert lean <= 0.8 * plain, (plain, lean)


def test_lora_and_checkpointing_on_top_of_lean_layers(tiny_llama):
    """The training path: lean layers under peft LoRA and gradient checkpointing, same gradients."""
    from kdcache.student.modeling import LoraSettings, load_student

    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(3))
    grads = []
    for lean, checkpointing in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        model = load_student(tiny_llama, device=torch.device("cpu"), dtype=torch.float32, lean_layers=lean,
                             gradient_checkpointing=checkpointing, lora=LoraSettings(4, 8, 0.0))
        model.train()
        assert sum(hasattr(m, "_kdcache_lean_forward") for m in model.modules()) == (2 * 2 + 1 + 2 if lean else 0)  # 2 layers: 5 norms, 2 MLPs
        grads.append(_param_grads(model, ids))
    assert grads[0] and grads[0].keys() == grads[1].keys() == grads[2].keys()
    for other in grads[1:]:
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_other_norms_and_mlps_are_left_alone():
    """Gemma's norm multiplies by (1 + weight) and its MLP uses GELU: the probe refuses both."""
    from transformers import AutoModelForCausalLM, GemmaConfig

    cfg = GemmaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                      intermediate_size=128, vocab_size=300)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 12))
    before = model(input_ids=ids).logits.detach()
    lean = apply_lean_layers(copy.deepcopy(model))
    assert lean.rms_norms == [] and lean.swiglus == []
    assert any("GemmaRMSNorm" in s for s in lean.skipped)
    assert torch.equal(model(input_ids=ids).logits.detach(), before)
