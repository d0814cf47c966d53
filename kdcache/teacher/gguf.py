"""Turn a GGUF checkpoint into a plain Hugging Face directory both backends can load.

vLLM's GGUF loader needs a CUDA build and a separate tokenizer; dequantizing once through
transformers gives a bf16 directory that every backend, vLLM's CPU build included, reads.
The result is cached by the file's content hash, so repeated runs convert once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kdcache.cache.writer import file_sha256
from kdcache.errors import KdcacheError, first_line
from kdcache.testing.models import default_cache_home


def convert_gguf_to_hf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantize ``gguf_path`` to a bf16 HF model + tokenizer directory; returns its path.

    The directory is ``<cache_dir>/gguf/<sha256[:16]>`` (default cache: ``$KDCACHE_HOME`` or
    ``~/.cache/kdcache``), written to a temporary name and renamed when complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise KdcacheError(f"{gguf_path}: GGUF file not found (pass an existing .gguf file)")
    root = Path(cache_dir) if cache_dir else default_cache_home()
    target = root / "gguf" / file_sha256(gguf_path)[:16]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.bfloat16,
            )
        except Exception as exc:  # transformers raises many types for a bad file
            raise KdcacheError(
                f"{gguf_path}: cannot load GGUF file ({first_line(exc)}); "
                "check the file is complete and its architecture is supported by transformers"
            ) from exc
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kdcache_source.txt").write_text(f"{gguf_path.resolve()}\n")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
