#!/usr/bin/env bash
# The GPU check: what a machine with an NVIDIA GPU must pass, sized for a short slot (under 8 minutes):
#
#   1. tests/test_cuda.py: the engine on CUDA against the CPU reference (factors, eigenbasis, edits,
#      generation, perplexity);
#   2. the tiny pipeline's main job end to end with `compute.device: cuda`: every step that runs a model
#      on the GPU, the factor step through Pipes (with 2+ GPUs as 2 torchrun processes on NCCL);
#   3. factor collection against a training step at OLMo-2-1B shapes in bf16 (bench/bench_factors.py).
#
# Run from the project directory: bench/gpu_check.sh. Needs a CUDA build of torch in .venv (PYTHON=...
# picks another interpreter). Everything printed also goes to bench/results/gpu_check-<UTC time>.log;
# the benchmark writes bench/results/bench_factors-olmo2-1b-cuda.json. Exits 1 if a step failed, 2
# when there is no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p bench/results
LOG=bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).log
exec > >(tee "$LOG") 2>&1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$PYTHON" -c 'import torch; print(f"gpu_check: CUDA is not available: torch {torch.__version__}, " + (
        "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"))'
    echo "gpu_check: run it on a machine with an NVIDIA GPU and a CUDA build of torch in .venv" \
        "(torch==2.13.0 from https://download.pytorch.org/whl/ for the CUDA version); nothing was run"
    exit 2
fi
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
PROCESSES=$((GPUS >= 2 ? 2 : 1))
echo "gpu_check: $(date -u), $(hostname), $GPUS GPU(s)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")'

declare -a RESULTS
FAILED=0
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo; echo "=== $name (limit ${limit} s) ==="
    timeout "$limit" "$@"
    status=$?
    RESULTS+=("$(printf '%-58s %s, %d s' "$name" "$([ $status = 0 ] && echo passed || echo "FAILED ($status)")" \
        $((SECONDS - start)))")
    [ $status = 0 ] || FAILED=1
}

step "tests/test_cuda.py" 150 "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests/test_cuda.py

HOME_DIR=$(mktemp -d)
"$PYTHON" -c "from memkfac.tiny import build_tiny_model; build_tiny_model('$HOME_DIR/inputs/tiny-llama', arch='llama', seed=0)"
# the tiny config with every model-running step on the GPU (the MEMKFAC_FACTOR_* overrides unset)
{ cat configs/tiny.yaml; printf '\ncompute: {device: cuda, processes: %d}\n' "$PROCESSES"; } >"$HOME_DIR/cuda.yaml"
step "tiny main job, compute.device cuda, factors x $PROCESSES process(es)" 240 env -u MEMKFAC_FACTOR_DEVICE \
    -u MEMKFAC_FACTOR_PROCESSES MEMKFAC_HOME="$HOME_DIR" MEMKFAC_CONFIG="$HOME_DIR/cuda.yaml" \
    "$PYTHON" -m jobs.main
rm -rf "$HOME_DIR"

step "factors vs training step, OLMo-2-1B shapes, bf16" 120 "$PYTHON" bench/bench_factors.py \
    --model olmo2-1b --device cuda --dtype bfloat16 --batches 6 --batch-size 4 --seq-len 512

echo; echo "=== gpu_check summary ($LOG) ==="
printf '%s\n' "${RESULTS[@]}"
exit $FAILED
