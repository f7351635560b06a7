#!/usr/bin/env bash
# One prepared check for an NVIDIA machine: installs nothing from the network, ends within $BUDGET seconds
# (default 480), writes its JSON, CSV, PNG and log into $OUT/gpu_check.tgz (default bench/results/gpu/),
# re-packed after every stage (the device tool returns at most 8 files). Stages, most important first, each
# under its own timeout and each leaving its file even when a later one is cut off:
#   0. bench/train_speed.py: the search and Masked-KD steps at DiT-XL/2's shape, bf16/fp16/fp32(+TF32),
#      eager and compiled, beside the official TinyFusion code when a checkout travels in .official/
#      (carry it: `git clone`/copy github.com/VainF/TinyFusion there; never committed); then
#      bench/train_smoke.py: prune -> finetune -> SIGKILL -> --resume -> sample for DiT, SiT, MAR (NCCL);
#      bench/fsdp_step.py --nproc 1: train and Masked KD with --fsdp beside DDP, step time and peak memory
#   1. the GPU tests (Triton kernels compiled for real, bf16 included; the training engine on CUDA)
#   2. bench/latency.py --preset xl, eager beside triton and triton+fp8 (E4M3 block GEMMs), bf16, batch 64,
#      CUDA graphs: DiT-XL/2 at 28/21/14/7; then our triton+fp8 beside the peer, torchao's float8 inference
#      quantization (needs torchao: `pip download --no-deps -d .whl torchao` and carry .whl/), 28 and 14;
#      then bench/sampling.py --preset xl: guided DDIM images/s for eager, triton, triton + CUDA graphs at
#      depths 28/14/7 and batches 8/64/256 (DDPM-250's images/s follow from the same step time)
#   3. bench/latency_stacks.py --preset gpu: diffusers DiT/PixArt/SD3/Flux at XL width, 28 blocks (needs
#      diffusers: `pip download --no-deps -d .whl diffusers importlib_metadata` and carry .whl/)
#   4. bench/kernels.py: measured ceilings, each fused kernel against eager and torch.compile, and our
#      flash-attention kernel over several tile sizes against SDPA
#   5. bench/latency.py again, eager beside compile (Inductor compiles once per width)
#   6. bench/latency.py at 28 and 14 with TINYFUSION_ATTENTION=triton (our attention kernel, not SDPA)
#   7. a CPU subset of the test suite on this machine's torch (checks the code on another torch version)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-480}
RES=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$RES/log.txt") 2>&1
TEE=$!  # waited for before the last pack, so the log in it is whole
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried for packages the machine lacks (diffusers, torchao)
    SITE=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        && export PYTHONPATH=$SITE
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels (tests/conftest.py would otherwise choose the interpreter)

ONLY=${ONLY:-train smoke fsdp tests latency torchao sampling stacks kernels compile attention cpu}  # a rerun can name just the stages it needs
stage() {  # stage KEY NAME SECONDS COMMAND...: run under min(SECONDS, what is left of BUDGET)
    local key=$1 name=$2 limit=$3 left=$((BUDGET - SECONDS)); shift 3
    [[ " $ONLY " == *" $key "* ]] || return 0
    ((left < limit)) && limit=$left
    if ((limit < 20)); then echo "== $name: skipped, budget spent"; return; fi
    echo "== $name (at ${SECONDS}s, limit ${limit}s)"
    timeout -k 10 "$limit" "$@"  # -k: a process stuck in the driver that ignores TERM is killed 10 s later
    echo "== $name: exit $? after ${SECONDS}s"
    tar czf "$OUT/gpu_check.tgz" -C "$RES" .
}

$PY -c "import json, torch, triton, datetime; print(json.dumps({'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'torch': torch.__version__, 'triton': triton.__version__, 'date': datetime.date.today().isoformat()}))" > "$RES/device.json"
cat "$RES/device.json"
{ nvidia-smi; $PY -m pip freeze; } > "$RES/environment.txt" 2>&1  # clocks, other processes, what is installed
OFFICIAL_ARG=(); [[ -f .official/train_masked_kd.py ]] && OFFICIAL_ARG=(--official .official)
stage train "training step speed (ours, official)" 150 $PY bench/train_speed.py --device cuda "${OFFICIAL_ARG[@]}" \
    --json "$RES/train_speed.json"
stage smoke "training commands under torchrun (NCCL)" 150 $PY bench/train_smoke.py --json "$RES/train_smoke.json"
stage fsdp "FSDP beside DDP on one GPU" 60 $PY bench/fsdp_step.py --nproc 1 --steps 40 --json "$RES/fsdp_step.json"
# -v: each test's result reaches the log as it ends (pytest writes the XML only at the end)
stage tests "GPU tests" 120 $PY -m pytest -v -p no:cacheprovider tests/test_gpu.py tests/test_gpu_training.py \
    --junitxml="$RES/gpu_tests.xml"
stage latency "latency xl: eager, triton, triton+fp8" 120 $PY bench/latency.py --preset xl --device cuda --dtype bf16 --batch 64 \
    --backends eager triton triton+fp8 --cuda-graphs --repeats 20 --json "$RES/latency_xl.json"
stage torchao "latency xl: triton+fp8 beside torchao+fp8" 90 $PY bench/latency.py --preset xl --device cuda --dtype bf16 \
    --batch 64 --backends triton+fp8 torchao+fp8 --depths 28 14 --cuda-graphs --repeats 20 --no-width \
    --json "$RES/latency_xl_fp8_peer.json"
stage sampling "sampling throughput xl: eager, triton, triton+graphs" 120 $PY bench/sampling.py --preset xl --device cuda \
    --variants eager triton triton+graphs --samplers ddim --steps 3 --warmup 1 --json "$RES/sampling_xl.json"
stage stacks "latency of the diffusers stacks" 120 $PY bench/latency_stacks.py --preset gpu --device cuda --dtype bf16 \
    --repeats 10 --json "$RES/latency_stacks_gpu.json"
stage kernels "kernels" 90 $PY bench/kernels.py --batches 32 128 --adaln-sweep --attention-sweep --json "$RES/kernels.json"
stage compile "latency xl: eager, compile" 120 $PY bench/latency.py --preset xl --device cuda --dtype bf16 --batch 64 \
    --backends eager compile --cuda-graphs --repeats 20 --no-width --json "$RES/latency_xl_compile.json"
stage attention "latency xl: triton with our attention kernel" 90 env TINYFUSION_ATTENTION=triton \
    $PY bench/latency.py --preset xl --device cuda --dtype bf16 --batch 64 --backends eager triton --depths 28 14 \
    --cuda-graphs --repeats 20 --no-width --json "$RES/latency_xl_triton_attention.json"
stage cpu "CPU tests on this torch" 90 env CUDA_VISIBLE_DEVICES= $PY -m pytest -q -x -p no:cacheprovider -n 12 \
    tests/test_model.py tests/test_diffusion.py tests/test_flow.py tests/test_sit.py tests/test_mar.py \
    tests/test_diffusers_stacks.py tests/test_pruning.py tests/test_checkpoint.py tests/test_training.py tests/test_data.py tests/test_fsdp.py tests/test_memory_plan.py \
    tests/test_run_folder.py \
    --junitxml="$RES/cpu_tests.xml"
echo "results in $OUT/gpu_check.tgz after ${SECONDS}s"
exec >&- 2>&- && wait "$TEE"
tar czf "$OUT/gpu_check.tgz" -C "$RES" .
