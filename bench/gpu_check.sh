#!/usr/bin/env bash
# One-call GPU session: install + CUDA build, the test suite on the GPU, launch counts, a kernel profile and
# the GPU benchmark, everything brought back in at most 8 files directly in $OUT.
#
#   bash bench/gpu_check.sh            (from anywhere, on a machine with a CUDA GPU)
#
# Meant for an offline GPU box whose python3 already has torch (CUDA), triton, pytest, ninja, pybind11 and
# matplotlib: the project is installed with --no-deps --no-build-isolation, nothing is downloaded.
# Steps and their caps (seconds; 470 in all, under 8 minutes):
#   install (CUDA build) 150 | versions 20 | pytest, CUDA-only files first (solve_cuda, cuda_graphs) 50 |
#   pytest, the rest 110 | launch counts (python -m bench.launches) 30 | kernel profile at n = 16k 30 |
#   benchmark 80 (b=8, h=16, p=64, m=128, bf16, n = 1k..64k, fwd and fwd+bwd, every available method).
# pytest runs without -x, so one run reports every failure; a failing step does not stop the later ones.
#
# What comes back ($OUT keeps at most 8 files and at most 2 folders deep, so everything lies directly in
# it): gpu_check.log, gpu_check_summary.txt, versions.txt, launches.txt, kernel_profile.txt, and
# results_<device>.tar.gz holding bench/results/<device>/ (benchmark tables, JSON, plots, and copies of the
# text files). Restore with: tar -xzf results_<device>.tar.gz -C bench/results
# Without $OUT the files go to bench/results/_scratch/. Exit status 0 only when every step passed.
#
# Dry run of everything but CUDA on a CPU machine (tiny sizes; reinstalls the package, non-editable, into
# $PYTHON's environment; results under bench/results/_scratch/):
#   PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZES="256 512" bash bench/gpu_check.sh
# GPU_CHECK_SKIP="install pytest ..." skips the named steps (install versions pytest launches profile
# benchmark); tests/test_bench.py uses it to check the $OUT layout in seconds.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
case "$PYTHON" in  # a relative path must survive the cd into the staging folder below
    */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;
esac
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SIZES="${GPU_CHECK_SIZES:-1024 4096 16384 65536}"
SKIP=" ${GPU_CHECK_SKIP:-} "
DEST="${OUT:-$REPO/bench/results/_scratch}"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
SUMMARY="$DEST/gpu_check_summary.txt"
: > "$LOG"
: > "$SUMMARY"
exec > >(tee -a "$LOG") 2>&1

status=0
wanted() { [[ "$SKIP" != *" $1 "* ]]; }
step() {  # step <name> <cap seconds> [--to FILE] <command...>: runs the command under a time cap, records
          # the outcome; --to also writes its output to FILE in $DEST
    local name="$1" cap="$2" file=/dev/null
    shift 2
    if [ "$1" = "--to" ]; then file="$DEST/$2"; shift 2; fi
    echo "=== $name (cap ${cap}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$file"
    local rc=${PIPESTATUS[0]}
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
    # Build only for this GPU's architecture (much faster than the default list).
    TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
    export TORCH_CUDA_ARCH_LIST
    PROFILE_ARGS=()                      # the defaults: n = 16k, b = 8, h = 16, p = 64, m = 128, bf16
    LAUNCH_ARGS=()
    BENCH_ARGS=(--batch 8 --heads 16 --p 64 --m 128 --dtype bf16)
else  # CPU dry run: the interpreter and bf16 on CPU are slow, so tiny shapes (torch backend for the profile)
    PROFILE_ARGS=(--backend torch --n 256 --batch 1 --heads 2 --m 16)
    LAUNCH_ARGS=(--n-q 64 --n-k 64 --batch 1 --heads 2 --kv-heads 2 --p 16 --m 8)
    BENCH_ARGS=(--batch 1 --heads 2 --p 64 --m 16 --dtype fp32)
fi
MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MAX_JOBS

wanted install && step "install (CUDA build)" 150 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-input .

# Run from a staging folder that holds bench/ and tests/ but not the source tree's skyformer_ext, so that
# the installed package (with its compiled extension) is the one imported.
STAGE="$(mktemp -d)"
ln -s "$REPO/bench" "$STAGE/bench"
ln -s "$REPO/tests" "$STAGE/tests"
cd "$STAGE"

VERSIONS_PY="$(cat <<'EOF'
import pathlib, platform, subprocess, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA (torch)", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton: not importable:", error)
if sys.argv[1] == "cuda":
    print("GPU", torch.cuda.get_device_name(0), "| capability %d.%d" % torch.cuda.get_device_capability(0))
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True)
    print("nvidia-smi:", smi.stdout.strip() or smi.stderr.strip())
import skyformer_ext, skyformer_ext.api as api
package = pathlib.Path(skyformer_ext.__file__).parent
print("skyformer_ext from", package, "| backends", api.BACKENDS, "| build", skyformer_ext.build_info())
print("compiled modules:", sorted(p.name for p in package.rglob("*.so")) or "none")
EOF
)"
wanted versions && step "versions" 20 --to versions.txt "$PYTHON" -c "$VERSIONS_PY" "$DEVICE"

CUDA_TESTS=(tests/test_solve_cuda.py tests/test_cuda_graphs.py)
if wanted pytest; then
    step "pytest, CUDA-only files" 50 "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider "${CUDA_TESTS[@]}"
    step "pytest, the rest" 110 "$PYTHON" -m pytest -q -rfE -p no:cacheprovider tests \
        "${CUDA_TESTS[@]/#/--ignore=}"
fi
wanted launches && step "launch counts" 30 --to launches.txt "$PYTHON" -m bench.launches --device "$DEVICE" \
    --by-kernel "${LAUNCH_ARGS[@]}"
wanted profile && step "kernel profile" 30 --to kernel_profile.txt "$PYTHON" -m bench.kernel_profile \
    --device "$DEVICE" "${PROFILE_ARGS[@]}"

DEVICE_NAME="$("$PYTHON" -c "import torch; from bench.throughput import device_name; print(device_name(torch.device('$DEVICE')))")"
if [ "$DEVICE" = "cuda" ]; then
    RESULTS="$REPO/bench/results/$DEVICE_NAME"
else
    RESULTS="$REPO/bench/results/_scratch/gpu_check_$DEVICE_NAME"
fi
# shellcheck disable=SC2086  # SIZES is a list of numbers
wanted benchmark && step "benchmark" 80 "$PYTHON" -m bench --device "$DEVICE" "${BENCH_ARGS[@]}" --n $SIZES \
    --modes fwd fwd+bwd --budget-s 60 --cap-s 20 --out "$RESULTS"

cd "$REPO"
rm -rf "$STAGE"
echo "--- summary"
cat "$SUMMARY"
# Pack: the text files go into the results folder too (so the tarball is what gets committed), then one
# tarball of it lies next to them in $DEST.
mkdir -p "$RESULTS"
for file in versions.txt launches.txt kernel_profile.txt gpu_check_summary.txt; do
    [ -f "$DEST/$file" ] && cp "$DEST/$file" "$RESULTS/"
done
cp "$LOG" "$RESULTS/gpu_check.log"
tar -czf "$DEST/results_$DEVICE_NAME.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
exit $status
