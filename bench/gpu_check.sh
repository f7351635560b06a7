#!/usr/bin/env bash
# One prepared check for an NVIDIA machine: installs nothing, runs in under 8 minutes, writes JSON under
# $OUT (default bench/results/gpu/) and prints a short table last.
#   1. the GPU tests (Triton kernels compiled for real, bf16 included) against fp32 references
#   2. measured ceilings (copy bandwidth, bf16 GEMM rate) and each fused kernel against eager and
#      torch.compile at DiT-XL/2 shapes (hidden 1152, 256 tokens, batch 32 to 256)
#   3. bench/latency.py --preset xl on cuda: eager, compile and triton, bf16, batch 64, CUDA graphs,
#      DiT-XL/2 at 28, 21, 14 and 7 layers
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # compiled kernels (tests/conftest.py would otherwise choose the interpreter)
$PY -c "import json, torch, triton, datetime; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'triton': triton.__version__, 'date': datetime.date.today().isoformat()}))" > "$OUT/device.json"
cat "$OUT/device.json"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 120 $PY bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tail -20
timeout 240 $PY bench/latency.py --preset xl --device cuda --dtype bf16 --batch 64 --backends eager compile triton \
    --cuda-graphs --repeats 20 --json "$OUT/latency_xl.json" 2>&1 | tail -8
echo "results in $OUT"
