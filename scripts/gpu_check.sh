#!/usr/bin/env bash
# The prepared run for a GPU machine (docs/performance.md, "On a GPU"), in two stages that fit
# one 10-minute device call each (times below: the limits; an H200 run's measured times are in
# docs/performance.md):
#   STAGE=tests  the device and versions (device.txt; fails if $DEVICE is not there), the
#                accelerator tests (tests.log, tests/test_accelerator.py) and the union
#                attention's and the SSD's Triton kernels against their references (tests_triton.log,
#                tests/ops/test_{attention,ssd}_triton.py, compiled for the device): 5.5 minutes at most;
#   STAGE=bench  the training step of B'MOJO and Mamba-2 with PyTorch's ops and with the Triton
#                kernels at 4,096, `bench train` one length at a time (longest first), `bench
#                decode` at every context in one call (the six models are built once: built
#                anew per context they took more than 40 s each on the H200), then `bmojo bench
#                ops` (with the Triton kernels' rows); each call in its own log, so a run cut short
#                by its time limit keeps every measurement finished before: 9.5 minutes at most.
# STAGE=all runs both; STAGE has no default. BUDGET (seconds) bounds the whole run, for one
# device call: each step's limit is cut to the time left, and a step with under 20 s left is
# skipped and reported, so the run ends inside BUDGET with every finished measurement kept.
# Everything goes to files in $OUT (default runs/gpu); each step has its own time limit, so a
# slow step cannot take the others' time.
#
#   STAGE=tests bash scripts/gpu_check.sh; STAGE=bench bash scripts/gpu_check.sh  # on the GPU
#   STAGE=all BUDGET=480 bash scripts/gpu_check.sh           # both in one device call
#   DEVICE=cpu QUICK=1 STAGE=all bash scripts/gpu_check.sh   # a dry run of the script, anywhere
#
# It needs python3 with torch, numpy, safetensors, tqdm, matplotlib and pytest (and triton, which
# CUDA builds of torch install), and no install: the package runs from src/. Where pytest-xdist
# is installed, the Triton tests run in 8 processes (their kernels compile in parallel).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
SIZE=${SIZE:-125m}
STAGE=${STAGE:-}
BUDGET=${BUDGET:-}
case $STAGE in tests | bench | all) ;; *) echo "STAGE must be tests, bench or all, not '$STAGE'" >&2; exit 2 ;; esac
case $BUDGET in '' | *[!0-9]*) [ -z "$BUDGET" ] || { echo "BUDGET must be whole seconds, not '$BUDGET'" >&2; exit 2; } ;; esac
if [ -n "${QUICK:-}" ]; then  # the benchmarks' tiny smoke-test shapes, one call each
    ops_shapes=(--quick) train_runs=(quick) decode_run=quick kernel_run=(--quick --lengths 64)
else
    ops_shapes=()
    # The 125m Transformer's matched width gives 78-dim heads, which fp32 SDPA runs in its
    # math kernel (an [H, N, N] score matrix): contexts stop at 16K, where that is 13 GB.
    # Longest first: where BUDGET runs out, the lengths B'MOJO is for are measured.
    train_runs=(16384 4096 1024) decode_run=1024,4096,16384
    kernel_run=(--size "$SIZE" --lengths 4096 --precision bf16 --repeats 3)
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BMOJO_TEST_DEVICE=$DEVICE
mkdir -p "$OUT"
failed=() skipped=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, output to $OUT/NAME
    local name=$1 limit=$2
    shift 2
    if [ -n "$BUDGET" ]; then
        local left=$((BUDGET - SECONDS))
        if [ "$left" -lt 20 ]; then
            echo "== $name: skipped, ${left}s of BUDGET=$BUDGET left"
            skipped+=("$name")
            return
        fi
        [ "$limit" -le "$left" ] || limit=$left
    fi
    echo "== $name: $* (limit ${limit}s)"
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name" 2>&1
    local code=$?
    tail -n 25 "$OUT/$name" | cut -c1-200
    echo "== $name: $((SECONDS - started))s"
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
try:
    import triton
    print(\"triton\", triton.__version__)
except ImportError:
    print(\"triton not installed\")
device = torch.device(\"$DEVICE\")
if device.type == \"cuda\":
    if not torch.cuda.is_available():
        sys.exit(f\"{device} was asked for and torch sees no CUDA device\")
    print(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
'"
    step tests.log 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_accelerator.py
    parallel=()
    "$PYTHON" -c "import xdist" 2> /dev/null && parallel=(-n 8)
    step tests_triton.log 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rs ${parallel[@]+"${parallel[@]}"} \
        tests/ops/test_attention_triton.py tests/ops/test_ssd_triton.py
fi
if [ "$STAGE" != tests ]; then
    bench=("$PYTHON" -m bmojo bench)
    if [ "$DEVICE" != cpu ]; then  # the Triton kernels run on CUDA
        step bench_train_kernels.log 80 "${bench[@]}" train --device "$DEVICE" --archs transformer,bmojo,mamba2 \
            --kernel torch,triton "${kernel_run[@]}" --json --no-progress --plot-dir "$OUT/train_kernels"
    fi
    for run in "${train_runs[@]}"; do
        # shellcheck disable=SC2046  # shapes prints separate words on purpose
        step "bench_train_$run.log" 60 "${bench[@]}" train --device "$DEVICE" $(shapes train "$run") \
            --json --no-progress --plot-dir "$OUT/train_$run"
    done
    # shellcheck disable=SC2046
    step bench_decode.log 150 "${bench[@]}" decode --device "$DEVICE" $(shapes decode "$decode_run") \
        --json --no-progress --plot-dir "$OUT/decode"
    # The sequential SSD baseline is a Python loop over the positions: 0.49 s per forward at
    # L=1024 on the H200, where a 90 s limit ended the run.
    step bench_ops.log 150 "${bench[@]}" ops --device "$DEVICE" --json ${ops_shapes[@]+"${ops_shapes[@]}"}
fi

[ ${#skipped[@]} -eq 0 ] || echo "skipped (BUDGET): ${skipped[*]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "every step that ran passed ($STAGE); results in $OUT"
