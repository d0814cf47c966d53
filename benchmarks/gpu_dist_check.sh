#!/usr/bin/env bash
# Issue 13's GPU measurements, as one command for a machine with one CUDA GPU (ready, not yet
# run: no GPU was lent to the session that wrote it; expect about 6-8 minutes on an H200):
#   1. benchmarks/bench_dist.py: train-student's single-GPU step vs its FSDP2 path at world
#      size 1 (step time, peak memory), Qwen2.5-1.5B shapes, 4 x 2048 tokens;
#   2. benchmarks/bench_liger.py: the KD step vs Liger-Kernel's fused-linear-cross-entropy SFT
#      step (goal: KD <= 1.0x time and <= 1.0x peak memory), without and with gradient checkpointing.
# Wheels the machine lacks (liger-kernel 0.8.5, zstandard) go in .whl/ first; the pip download
# command is in benchmarks/bench_liger.py's docstring. Results go to $OUT (default
# benchmarks/results/gpu_dist).
#
#   bash benchmarks/gpu_dist_check.sh
set -u
OUT=${OUT:-benchmarks/results/gpu_dist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run() {  # name, script, args...
    local name=$1; shift
    timeout 300 python3 "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
    [ -s "$OUT/$name.err" ] || rm -f "$OUT/$name.err"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], d['ratios'], d.get('goals', ''))" \
        "$OUT/$name.json" || tail -5 "$OUT/$name.err"
}
run dist_world1 benchmarks/bench_dist.py
run kd_vs_liger benchmarks/bench_liger.py
run kd_vs_liger_gradckpt benchmarks/bench_liger.py --grad-ckpt
