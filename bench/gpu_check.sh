#!/usr/bin/env bash
# One-call GPU session: install + CUDA build, the test suite on the GPU, and the GPU benchmark.
#
#   bash bench/gpu_check.sh            (from anywhere, on a machine with a CUDA GPU)
#
# Meant for an offline GPU box whose python3 already has torch (CUDA), triton, pytest, ninja, pybind11 and
# matplotlib: the project is installed with --no-deps --no-build-isolation, nothing is downloaded. Runs in
# under 8 minutes: install/build (cap 180 s), pytest -x (cap 170 s), benchmark (budget 120 s, cap 170 s).
# Benchmark: b=8, h=16 (b*h = 128), p=64, m=128, bf16, n = 1k, 4k, 16k, 64k, forward and forward+backward,
# every available method (skyformer per backend, naive, kernelized, SDPA flash/efficient/math, flash_attn).
# Results: bench/results/<gpu-name>/ and, when $OUT is set, a copy under $OUT/bench/results/<gpu-name>/
# with gpu_check.log and gpu_check_summary.txt next to it. Exit status 0 only when every step passed.
#
# Dry run of everything but CUDA on a CPU machine (tiny sizes; reinstalls the package, non-editable, into
# $PYTHON's environment; results under bench/results/_scratch/):
#   PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZES="256 512" bash bench/gpu_check.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
case "$PYTHON" in  # a relative path must survive the cd into the staging folder below
    */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;
esac
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SIZES="${GPU_CHECK_SIZES:-1024 4096 16384 65536}"
LOG_DIR="${OUT:-$REPO/bench/results/_scratch}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
SUMMARY="$LOG_DIR/gpu_check_summary.txt"
: > "$SUMMARY"
exec > >(tee -a "$LOG") 2>&1

status=0
step() {  # step <name> <cap seconds> <command...>: runs the command under a time cap, records the outcome
    local name="$1" cap="$2"
    shift 2
    echo "=== $name (cap ${cap}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$cap" "$@"
    local rc=$?
    local verdict="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict="FAILED"; fi
    [ $rc -eq 0 ] || status=1
    echo "$name: $verdict (rc=$rc, $((SECONDS - start)) s)" | tee -a "$SUMMARY"
}

cd "$REPO"
if [ "$DEVICE" = "cuda" ]; then
    if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "no usable CUDA device: nothing to check" | tee -a "$SUMMARY"
        exit 2
    fi
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
    # Build only for this GPU's architecture (much faster than the default list).
    TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
    export TORCH_CUDA_ARCH_LIST
fi
MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MAX_JOBS

step "install (CUDA build)" 180 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-input .

# Run from a staging folder that holds bench/ and tests/ but not the source tree's skyformer_ext, so that
# the installed package (with its compiled extension) is the one imported.
STAGE="$(mktemp -d)"
ln -s "$REPO/bench" "$STAGE/bench"
ln -s "$REPO/tests" "$STAGE/tests"
cd "$STAGE"
"$PYTHON" -c '
import pathlib, skyformer_ext, skyformer_ext.api as api
package = pathlib.Path(skyformer_ext.__file__).parent
print("skyformer_ext from", package, "backends", api.BACKENDS)
print("compiled modules:", sorted(p.name for p in package.rglob("*.so")) or "none")' || status=1

step "pytest on the $DEVICE" 170 "$PYTHON" -m pytest -q tests -x -p no:cacheprovider

DEVICE_NAME="$("$PYTHON" -c "import torch; from bench.throughput import device_name; print(device_name(torch.device('$DEVICE')))")"
if [ "$DEVICE" = "cuda" ]; then
    RESULTS="$REPO/bench/results/$DEVICE_NAME"
else
    RESULTS="$REPO/bench/results/_scratch/gpu_check_$DEVICE_NAME"
fi
# shellcheck disable=SC2086  # SIZES is a list of numbers
step "benchmark" 170 "$PYTHON" -m bench --device "$DEVICE" --batch 8 --heads 16 --p 64 --m 128 --dtype bf16 \
    --n $SIZES --modes fwd fwd+bwd --budget-s 120 --cap-s 30 --out "$RESULTS"

cd "$REPO"
rm -rf "$STAGE"
if [ -n "${OUT:-}" ] && [ -d "$RESULTS" ]; then
    mkdir -p "$OUT/bench/results"
    cp -r "$RESULTS" "$OUT/bench/results/"
fi
echo "--- summary"
cat "$SUMMARY"
exit $status
