"""Every kernel in every launch configuration the wrappers can pick compiles for sm_80 and sm_90 (no GPU
needed) without register spills and within the architecture's shared memory.

Runs ``python -m triton_kernels.compile_check`` in a subprocess without TRITON_INTERPRET (conftest sets it
for the interpreter tests; interpreted kernels cannot be compiled) and checks its rows independently of the
module's own verdict. The full set (every dtype, head-dim bucket, landmark bucket and autotune candidate)
takes over half an hour on two cores, so it is marked slow (`make test-slow`); CI compiles every kernel in
the buckets of the benchmark shape (head dim 64, m = 128) for every dtype.
"""

import json
import os
import subprocess
import sys

import pytest

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
CI_SUBSET = ["--head-dim", "64", "--m-pad", "128"]


def _check_compiles(tmp_path, subset):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows_file = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "triton_kernels.compile_check", *subset, "--json",
                             str(rows_file)], env=env, capture_output=True, text=True, timeout=3600)
    assert rows_file.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["spills"] == 0, f"register spill: {r}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"shared memory over the sm_{r['arch']} limit: {r}"
        assert 0 < r["registers"] <= 255, r
    assert result.returncode == 0, result.stdout[-3000:]
    return rows


def test_every_kernel_compiles_without_spills_in_the_benchmark_buckets(tmp_path):
    rows = _check_compiles(tmp_path, CI_SUBSET)
    kernels = {r["kernel"] for r in rows}
    for kernel in ("gaussian_attention_fwd_kernel", "gaussian_attention_bwd_rows_kernel",
                   "gaussian_attention_bwd_keys_kernel", "newton_schulz_fwd_kernel", "newton_schulz_bwd_kernel",
                   "cholesky_fwd_kernel", "cholesky_bwd_kernel", "landmark_rows_kernel",
                   "landmark_grad_scatter_kernel", "lloyd_assign_kernel", "lloyd_update_kernel", "lloyd_grad_kernel"):
        assert kernel in kernels, (kernel, sorted(kernels))
    # The packed (varlen) variants of issue 14: every generic kernel with packed rows (query apply), packed
    # keys (key summary) and both (kernelized), the landmark kernels with packed q and k.
    for kernel in ("gaussian_attention_fwd_kernel", "gaussian_attention_bwd_rows_kernel",
                   "gaussian_attention_bwd_keys_kernel"):
        configs = [r["config"] for r in rows if r["kernel"] == kernel]
        for flags in ("packed-x", "packed-y", "packed-x packed-y"):
            assert any(flags in c and ("packed-y" in c) == ("packed-y" in flags) for c in configs), (kernel, flags)
    for kernel in ("landmark_rows_kernel", "landmark_grad_scatter_kernel", "lloyd_assign_kernel",
                   "lloyd_update_kernel", "lloyd_grad_kernel"):
        assert any(" packed" in r["config"] for r in rows if r["kernel"] == kernel), kernel
    # Context parallel (issue 15): the solve's backward writes the scaled dZ in float32 for 16-bit inputs too.
    for kernel in ("newton_schulz_bwd_kernel", "cholesky_bwd_kernel"):
        for dtype in ("fp16", "bf16"):
            assert any(r["config"].startswith(dtype) and "GRAD_Z:fp32" in r["config"] for r in rows
                       if r["kernel"] == kernel), (kernel, dtype)


@pytest.mark.slow
def test_every_launch_configuration_compiles_without_spills_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    count = subprocess.run([sys.executable, "-c", "from triton_kernels import compile_check as c; "
                            "print(len(c.launches()))"], env=env, capture_output=True, text=True, check=True)
    rows = _check_compiles(tmp_path, [])
    assert len(rows) == 2 * int(count.stdout) > 0  # every launch, both architectures
