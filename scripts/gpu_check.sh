#!/usr/bin/env bash
# The one prepared run for a GPU machine (docs/performance.md, "On a GPU"): the device and
# versions, the accelerator tests (tests/test_accelerator.py), then `bmojo bench ops`, `train`
# and `decode` on that device. Everything it prints goes to files in $OUT (default runs/gpu),
# at most eight: device.txt, tests.log, bench_ops.log, bench_train.log, bench_decode.log and
# the two plots. Each step has its own time limit, so a slow one cannot take the others' time;
# the limits add up to 8.5 minutes, inside one 10-minute device call.
#
#   bash scripts/gpu_check.sh                    # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh # a dry run of the script itself, anywhere
#
# It needs python3 with torch, numpy, safetensors, tqdm, matplotlib and pytest, and no install:
# the package runs from src/.
set -uo pipefail

OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
SIZE=${SIZE:-125m}
if [ -n "${QUICK:-}" ]; then  # the benchmarks' tiny smoke-test shapes
    ops_shapes=(--quick) train_shapes=(--quick) decode_shapes=(--quick)
else
    ops_shapes=()
    train_shapes=(--size "$SIZE" --lengths 1024,4096,16384 --precision bf16 --repeats 3)
    decode_shapes=(--size "$SIZE" --contexts 1024,4096,16384,32768 --repeats 2)
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BMOJO_TEST_DEVICE=$DEVICE
mkdir -p "$OUT"
failed=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, output to $OUT/NAME
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name" 2>&1
    local code=$?
    tail -n 25 "$OUT/$name" | cut -c1-200
    [ "$code" -eq 0 ] || { echo "== $name: exit status $code"; failed+=("$name"); }
}

step device.txt 30 bash -c "date -u; nvidia-smi || true; $PYTHON -c '
import platform, torch
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
'"
step tests.log 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_accelerator.py
bench=("$PYTHON" -m bmojo bench)
step bench_ops.log 90 "${bench[@]}" ops --device "$DEVICE" --json "${ops_shapes[@]}"
step bench_train.log 150 "${bench[@]}" train --device "$DEVICE" "${train_shapes[@]}" --json --no-progress \
    --plot-dir "$OUT"
step bench_decode.log 120 "${bench[@]}" decode --device "$DEVICE" "${decode_shapes[@]}" --json --no-progress \
    --plot-dir "$OUT"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all steps passed; results in $OUT"
