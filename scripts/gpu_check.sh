#!/usr/bin/env bash
# The prepared run for a GPU machine (docs/performance.md, "On a GPU"), in two stages that fit
# one 10-minute device call each:
#   STAGE=tests  the device and versions (device.txt; fails if $DEVICE is not there), the
#                accelerator tests (tests.log, tests/test_accelerator.py) and the union
#                attention's and the SSD's Triton kernels against their references (tests_triton.log,
#                tests/ops/test_{attention,ssd}_triton.py, compiled for the device): 6 minutes at most;
#   STAGE=bench  `bmojo bench ops` (with the Triton kernels' rows), the training step of
#                B'MOJO and Mamba-2 with PyTorch's ops and with the Triton kernels at 4,096,
#                then `bench train` one length at a time and `bench decode` one context at a
#                time; each call in its own log, so a run cut short by its time limit keeps
#                every measurement finished before: 9 minutes at most.
# STAGE=all runs both (more than one device call, except with QUICK); STAGE has no default.
# Everything goes to files in $OUT (default runs/gpu); each step has its own time limit, so a
# slow step cannot take the others' time.
#
#   STAGE=tests bash scripts/gpu_check.sh; STAGE=bench bash scripts/gpu_check.sh  # on the GPU
#   DEVICE=cpu QUICK=1 STAGE=all bash scripts/gpu_check.sh   # a dry run of the script, anywhere
#
# It needs python3 with torch, numpy, safetensors, tqdm, matplotlib and pytest (and triton, which
# CUDA builds of torch install), and no install: the package runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
SIZE=${SIZE:-125m}
STAGE=${STAGE:-}
case $STAGE in tests | bench | all) ;; *) echo "STAGE must be tests, bench or all, not '$STAGE'" >&2; exit 2 ;; esac
if [ -n "${QUICK:-}" ]; then  # the benchmarks' tiny smoke-test shapes, one call each
    ops_shapes=(--quick) train_runs=(quick) decode_runs=(quick) kernel_run=(--quick --lengths 64)
else
    ops_shapes=()
    # The 125m Transformer's matched width gives 78-dim heads, which fp32 SDPA runs in its
    # math kernel (an [H, N, N] score matrix): contexts stop at 16K, where that is 13 GB.
    train_runs=(1024 4096 16384) decode_runs=(1024 4096 16384)
    kernel_run=(--size "$SIZE" --lengths 4096 --precision bf16 --repeats 3)
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BMOJO_TEST_DEVICE=$DEVICE
mkdir -p "$OUT"
failed=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, output to $OUT/NAME
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name" 2>&1
    local code=$?
    tail -n 25 "$OUT/$name" | cut -c1-200
    [ "$code" -eq 0 ] || { echo "== $name: exit status $code"; failed+=("$name"); }
}

shapes() {  # shapes KIND RUN: the bench arguments of one run (a length or a context, or quick)
    if [ "$2" = quick ]; then echo --quick; elif [ "$1" = train ]; then
        echo --size "$SIZE" --lengths "$2" --precision bf16 --repeats 3
    else echo --size "$SIZE" --contexts "$2" --repeats 2; fi
}

if [ "$STAGE" != bench ]; then
    step device.txt 30 bash -c "date -u; nvidia-smi || true; $PYTHON -c '
import platform, sys, torch
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda)
device = torch.device(\"$DEVICE\")
if device.type == \"cuda\":
    if not torch.cuda.is_available():
        sys.exit(f\"{device} was asked for and torch sees no CUDA device\")
    print(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
'"
    step tests.log 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_accelerator.py
    step tests_triton.log 180 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/ops/test_attention_triton.py \
        tests/ops/test_ssd_triton.py
fi
if [ "$STAGE" != tests ]; then
    bench=("$PYTHON" -m bmojo bench)
    step bench_ops.log 90 "${bench[@]}" ops --device "$DEVICE" --json ${ops_shapes[@]+"${ops_shapes[@]}"}
    if [ "$DEVICE" != cpu ]; then  # the Triton kernels run on CUDA
        step bench_train_kernels.log 90 "${bench[@]}" train --device "$DEVICE" --archs transformer,bmojo,mamba2 \
            --kernel torch,triton "${kernel_run[@]}" --json --no-progress --plot-dir "$OUT/train_kernels"
    fi
    for run in "${train_runs[@]}"; do
        # shellcheck disable=SC2046  # shapes prints separate words on purpose
        step "bench_train_$run.log" 80 "${bench[@]}" train --device "$DEVICE" $(shapes train "$run") \
            --json --no-progress --plot-dir "$OUT/train_$run"
    done
    for run in "${decode_runs[@]}"; do
        # shellcheck disable=SC2046
        step "bench_decode_$run.log" 40 "${bench[@]}" decode --device "$DEVICE" $(shapes decode "$run") \
            --json --no-progress --plot-dir "$OUT/decode_$run"
    done
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all steps passed ($STAGE); results in $OUT"
