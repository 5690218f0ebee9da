"""No allocation of the fused path (forward + backward) scales with n*m or n^2.

PeakMemory (skyformer_ext/_memory.py) records every tensor storage created inside the block, on any device,
so the interpreter run on CPU counts exactly what the host code would allocate on a GPU (the kernels' tiles
live in registers / shared memory there). With m = 4p, an (n x m) buffer would be 4x larger than the
largest (n x p) one allowed here, and an (n x n) one 64x.
"""

import pytest
import torch

from skyformer_ext import kernelized_attention, sample_landmarks, skyformer_attention
from skyformer_ext._memory import PeakMemory

P, M = 16, 64


def _measure(kind: str, n: int) -> PeakMemory:
    q = (0.5 * torch.randn(1, 2, n, P)).requires_grad_()
    k = (0.5 * torch.randn(1, 1, n, P)).requires_grad_()
    v = torch.randn(1, 1, n, P).requires_grad_()
    mask = torch.rand(1, n) > 0.2
    grad = torch.randn(1, 2, n, P)
    idx = sample_landmarks(1, n, n, M, attn_mask=mask)
    with PeakMemory() as pm:
        if kind == "skyformer":
            out = skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="triton")
        else:
            out = kernelized_attention(q, k, v, attn_mask=mask, backend="triton")
        out.backward(grad)
    return pm


@pytest.mark.parametrize("kind", ["skyformer", "kernelized"])
def test_fused_path_memory_is_linear_in_n_and_free_of_n_by_m_buffers(kind):
    small, large = _measure(kind, 128), _measure(kind, 512)
    for n, pm in ((128, small), (512, large)):
        # The largest buffers are (heads x n x p) float32 gradients and outputs (two query heads here).
        row_block_bytes = 2 * n * P * 4
        assert pm.largest_bytes <= row_block_bytes, (n, pm.largest_bytes, row_block_bytes)
        assert pm.largest_bytes < n * M * 4, "an (n x m) float32 buffer would be at least this large"
    # 4x the sequence: peak grows ~4x (linear), far below the 16x of anything quadratic.
    assert large.peak_bytes <= 4.5 * small.peak_bytes, (small.peak_bytes, large.peak_bytes)
