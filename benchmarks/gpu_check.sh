#!/usr/bin/env bash
# The GPU measurements and checks, as one command for a machine with a CUDA GPU:
#   1. benchmarks/bench_kd_step.py four times (KD step vs SFT step, side by side in each run):
#      kd with train-student's defaults (lean layers), the same with gradient checkpointing in
#      both arms, kd with --no-lean-layers (the previous kd step, for reference), and float32
#      master weights under bf16 autocast (train-student's default for full fine-tuning);
#   2. tests/test_gpu.py (lean layers on CUDA's fused kernels; QLoRA end to end) and tests/test_lean.py.
# Results go to $OUT (default benchmarks/results/gpu). Wheels for packages the machine lacks
# (zstandard, bitsandbytes) may be put in .whl/ and are installed into /tmp/site first.
#
#   bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

bench() {  # name, args...
    local name=$1; shift
    timeout 240 python3 benchmarks/bench_kd_step.py "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
    [ -s "$OUT/$name.err" ] || rm -f "$OUT/$name.err"  # the device returns at most 8 files
    python3 - "$OUT/$name.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as exc:  # noqa: BLE001
    print(sys.argv[1], "no result:", exc); sys.exit()
r, c = d["ratios"], d["config"]
f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
print(f"{sys.argv[1]}: ckpt={c['grad_ckpt']} lean={c['kd_lean_layers']!r} sft {d['sft'].get('median_step_s', 0):.4f}s "
      f"{d['sft'].get('peak_gib', 0):.2f}GiB kd {d['kd'].get('median_step_s', 0):.4f}s {d['kd'].get('peak_gib', 0):.2f}GiB "
      f"time {f(r['time_kd_over_sft'])} mem {f(r['peak_mem_kd_over_sft'])} goals {d['goals']}")
PY
}
bench kd_step_lean
bench kd_step_lean_gradckpt --grad-ckpt
bench kd_step_plain --no-lean-layers
bench kd_step_lean_fp32_autocast --dtype float32 --autocast
timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_lean.py 2>&1 | tee "$OUT/pytest.log" | grep -v "Loading weights"
