"""The launch counter of ``python -m bench.launches`` counts by issue 12's rule (the budget test builds on it)."""

import torch
import triton
import triton.language as tl

from bench.launches import count_launches
from skyformer_ext._stages import stage


@triton.jit
def _double_kernel(X, OUT, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    keep = offsets < n
    tl.store(OUT + offsets, 2 * tl.load(X + offsets, mask=keep), mask=keep)


def test_counts_compute_ops_kernels_and_syncs_not_views_or_allocations():
    x = torch.randn(8, 4)

    def work():
        with stage("prepare"):
            y = x.t().reshape(-1).contiguous()     # transpose + reshape: one copy_
            z = torch.zeros(32)                    # zeros -> zero_ -> fill_: one launch
            torch.empty(5)                         # allocation only
        with stage("kernel"):
            _double_kernel[(1,)](y, z, 32, BLOCK=32)   # the interpreter's own work inside does not count
        return (z.sum() + 1).item()                # sum, add, and a host sync

    count = count_launches(work)
    assert count.by_stage == {"prepare": 2, "kernel": 1, "(unlabelled)": 3}, count
    assert count.total == 6 and count.syncs == 1
    assert count.by_kernel["triton::_double_kernel"] == 1
    assert count.sync_ops == {"aten::_local_scalar_dense": 1}
