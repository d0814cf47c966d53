#!/usr/bin/env bash
# Stage one on a GPU: the bare vLLM engine (top-64 prompt log-probs) vs kdcache's default mode
# computed inside vLLM vs the transformers backend, on a random-init Qwen2.5-7B-shaped teacher,
# with model FLOP utilization (benchmarks/bench_engine_stats.py). Goals (issue 11): default
# mode >= 0.9x the bare engine, >= 40% MFU.
#
# The device machine has torch 2.11.0+cu130 but no vLLM, and reaches no package index, so
# vLLM 0.24.0 (the CUDA 13 release that pins torch 2.11.0) and the packages it imports travel
# as wheels, cut into parts of at most 60 MiB (a call carries at most 64 MiB; files under /tmp
# stay while the machine is warm, 30 s after a call):
#
#   here:        bash benchmarks/gpu_stage_one.sh prepare          # downloads, cuts .carry/stage1/part-*
#   device, 1..N: bash benchmarks/gpu_stage_one.sh receive         # carry .carry/stage1/part-NN, one per call
#   device, last: bash benchmarks/gpu_stage_one.sh run             # installs, imports, measures into $OUT
#
# Not yet run on a device (none was lent to the session that wrote it): the dependency list
# below is Requires-Dist of vllm 0.24.0 minus what the device image lists; `run` first tries
# `from vllm import LLM` and prints any module still missing, so a first call learns that
# cheaply.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=.carry/stage1
STAGE=/tmp/kdcache-stage1
PY_TAGS=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
         --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
         --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform any)
# Imported by `vllm.LLM` (engine, tokenizer-free generation and pooling) and absent from the device image.
DEPS=(vllm==0.24.0 cachetools blake3 msgspec pyzmq compressed-tensors==0.17.0 depyf==0.20.0 astor dill pybase64 cbor2
      setproctitle partial-json-parser pydantic pydantic-core annotated-types typing-inspection openai distro jiter
      sniffio fastapi starlette mistral_common xgrammar llguidance outlines_core==0.2.14 lark==1.2.2 diskcache==5.6.3
      lm-format-enforcer==0.11.3 interegular gguf python-json-logger ijson openai-harmony jsonschema referencing
      rpds-py jsonschema-specifications zstandard datasets pyarrow-hotfix multiprocess)

case "${1:-}" in
prepare)
    rm -rf .whl-stage1 "$PARTS" && mkdir -p .whl-stage1 "$PARTS"
    grep -qx '/.whl-stage1/' .git/info/exclude 2>/dev/null || echo '/.whl-stage1/' >> .git/info/exclude
    python3 -m pip download --no-deps "${PY_TAGS[@]}" -d .whl-stage1 "${DEPS[@]}"
    # kdcache itself as a wheel: vLLM finds kdcache's plugin through installed entry points
    python3 -m pip wheel -q --no-deps -w .whl-stage1 .
    # the tokenizer for the random-init teacher and the texts (no hub, no PyPI there)
    python3 - <<'PY'
import json
from pathlib import Path
from transformers import AutoTokenizer
from kdcache.demo import wiki_entries
from kdcache.teacher.gguf import convert_gguf_to_hf
from kdcache.testing.models import smollm2_gguf_path
AutoTokenizer.from_pretrained(str(convert_gguf_to_hf(smollm2_gguf_path()))).save_pretrained(".whl-stage1/tokenizer")
Path(".whl-stage1/texts.json").write_text(json.dumps([e["extract"] for e in wiki_entries()]))
PY
    tar -C .whl-stage1 -cf - . | split -b 60m -d -a 2 - "$PARTS/part-"
    (cd "$PARTS" && sha256sum part-* > SHA256SUMS)
    ls -la "$PARTS"
    echo "carry one part per call: .carry/stage1/part-NN (and SHA256SUMS with the last)"
    ;;
receive)
    mkdir -p "$STAGE"
    cp -v "$PARTS"/part-* "$PARTS"/SHA256SUMS "$STAGE"/ 2>/dev/null || cp -v "$PARTS"/part-* "$STAGE"/
    ls -la "$STAGE"
    ;;
run)
    OUT=${OUT:-benchmarks/results/gpu}
    mkdir -p "$OUT" "$STAGE/wheels"
    (cd "$STAGE" && { [ ! -f SHA256SUMS ] || sha256sum -c SHA256SUMS; } && cat part-* | tar -C wheels -xf -)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STAGE"/wheels/*.whl
    # this checkout's code wins over the kdcache wheel's; the wheel supplies the plugin entry point
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    python3 -c "from vllm import LLM; import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -3
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    [ -f /tmp/qwen7b/config.json ] || python3 benchmarks/bench_engine_stats.py --make-model qwen2.5-7b /tmp/qwen7b \
        --tokenizer "$STAGE/wheels/tokenizer"
    timeout 420 python3 benchmarks/bench_engine_stats.py --model /tmp/qwen7b --dtype bfloat16 --texts 400 \
        --texts-json "$STAGE/wheels/texts.json" \
        --max-length 2048 --rounds 3 --with-hf --flops --peak-tflops 790 --gpu-memory-utilization 0.45 \
        --out "$OUT/engine_stats_h200.json" 2> "$OUT/engine_stats_h200.err" | tail -40
    ;;
*)
    sed -n 2,22p "$0"; exit 2 ;;
esac
