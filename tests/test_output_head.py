"""Logits computed outside model.forward (the teacher's transformers backend, the student's
chunked loss and evaluation) equal log_softmax(model(ids).logits) for architectures that
transform the logits after lm_head, or the model is refused with one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.errors import KdcacheError
from tests.conftest import CORPUS


def _register_custom_architectures():
    """Two architectures transformers does not ship: one that multiplies the logits by
    ``logits_scaling`` (as HyperCLOVAX does; Granite divides), one with a transform no scale
    reproduces (a per-id offset)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class ScaledConfig(LlamaConfig):
        model_type = "kdcache_test_scaled"

    class ScaledForCausalLM(LlamaForCausalLM):
        config_class = ScaledConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * self.config.logits_scaling
            return out

    class OffsetConfig(LlamaConfig):
        model_type = "kdcache_test_offset"

    class OffsetForCausalLM(LlamaForCausalLM):
        config_class = OffsetConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + torch.linspace(0, 3, out.logits.shape[-1], dtype=out.logits.dtype)
            return out

    for config, model in ((ScaledConfig, ScaledForCausalLM), (OffsetConfig, OffsetForCausalLM)):
        try:
            AutoConfig.register(config.model_type, config)
            AutoModelForCausalLM.register(config, model)
        except ValueError:  # already registered in this session
            pass
    return ScaledConfig, OffsetConfig


def _tiny(out: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, GraniteConfig, Gemma2Config

    from kdcache.testing.models import train_tokenizer

    tok = train_tokenizer(CORPUS, 512)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                  tie_word_embeddings=False)
    scaled, offset = _register_custom_architectures()
    if kind == "scaled":
        config = scaled(**common, head_dim=64, logits_scaling=0.25)
    elif kind == "offset":
        config = offset(**common, head_dim=64)
    elif kind == "granite":
        config = GraniteConfig(**common, logits_scaling=4.0)
    else:
        config = Gemma2Config(**common, head_dim=64, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # logits of several nats, so a wrong transform shows
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _forward_logprobs(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].float(), -1).numpy()


@pytest.mark.parametrize("kind", ["scaled", "granite", "softcap"])
def test_teacher_and_student_logits_equal_model_forward(kind, tmp_path):
    from kdcache.student.evaluate import evaluate_model
    from kdcache.teacher.generate import GenerateConfig, generate_teacher_cache
    from kdcache.teacher.hf_backend import HFBackend

    model_dir = _tiny(tmp_path / kind, kind)
    backend = HFBackend(model_dir, dtype="float32")
    assert backend.describe()["output_transform"] == {"scale": {"scaled": 0.25, "granite": 0.25, "softcap": 1.0}[kind],
                                                     "softcap": 5.0 if kind == "softcap" else None}
    from kdcache.data.example import TokenizedExample
    from kdcache.teacher.base import ScoringSettings

    ids = np.asarray(backend.tokenizer(" ".join(CORPUS[:3]))["input_ids"], dtype=np.int32)
    ex = TokenizedExample(0, "mem:1", ids, np.arange(1, len(ids), dtype=np.int32))
    got = list(backend.score([ex], ScoringSettings(top_k=8)))[0]
    want = _forward_logprobs(model_dir, ids)
    np.testing.assert_allclose(got.target_logprobs, want[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    np.testing.assert_allclose(got.topk_logprobs, np.sort(want[:-1], axis=1)[:, ::-1][:, :8], atol=1e-4)
    backend.close()

    # The model as its own student: on its own cache, the chunked CE is the teacher's CE.
    data = tmp_path / f"{kind}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:6]))
    manifest = generate_teacher_cache(GenerateConfig(teacher=str(model_dir), dataset=str(data),
                                                     output=str(tmp_path / "cache"), backend="hf", top_k=8,
                                                     sampling="none", dtype="float32", progress=False))
    assert manifest["dataset"]["max_length"] == 256  # --max-length not given: the teacher's context
    if kind == "softcap":
        with pytest.raises(KdcacheError, match="soft-capped.*chunked student loss") as err:
            evaluate_model(str(model_dir), tmp_path / "cache", device="cpu")
        assert "\n" not in str(err.value) and "Gemma2ForCausalLM" in str(err.value)
        return
    metrics = evaluate_model(str(model_dir), tmp_path / "cache", device="cpu")
    assert abs(metrics["ce"] - metrics["teacher_ce"]) < 5e-3, metrics
    assert metrics["kl"] < 1e-3 and metrics["top1_agree"] > 0.99


def test_an_unknown_output_transform_is_refused_on_both_sides(tmp_path):
    from kdcache.student.modeling import load_student
    from kdcache.teacher.hf_backend import HFBackend

    model_dir = _tiny(tmp_path / "offset", "offset")
    for load in (lambda: HFBackend(model_dir, dtype="float32"),
                 lambda: load_student(model_dir, device=torch.device("cpu"), dtype=torch.float32)):
        with pytest.raises(KdcacheError, match="cannot reproduce this architecture's logits outside model.forward") as err:
            load()
        assert "\n" not in str(err.value) and "OffsetForCausalLM" in str(err.value)
