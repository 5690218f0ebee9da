"""No allocation of the fused path (forward + backward) scales with n*m or n^2.

PeakMemory (skyformer_ext/_memory.py) records every tensor storage created inside the block, on any device,
so the interpreter run on CPU counts exactly what the host code would allocate on a GPU (the kernels' tiles
live in registers / shared memory there). Allowed: (n x p) inputs' gradients and outputs, (m x m) for the
landmark solve, (m x p) and split partials. With m = 4p an (n x m) buffer exceeds that bound at every n
tested, and an (n x n) one by far.
"""

import pytest
import torch

from skyformer_ext import kernelized_attention, sample_landmarks, skyformer_attention
from skyformer_ext._memory import PeakMemory

P, M, HEADS = 16, 64, 2


def _measure(kind: str, n: int) -> PeakMemory:
    q = (0.5 * torch.randn(1, HEADS, n, P)).requires_grad_()
    k = (0.5 * torch.randn(1, 1, n, P)).requires_grad_()
    v = torch.randn(1, 1, n, P).requires_grad_()
    mask = torch.rand(1, n) > 0.2
    grad = torch.randn(1, HEADS, n, P)
    idx = sample_landmarks(1, n, n, M, attn_mask=mask)
    with PeakMemory() as pm:
        if kind == "skyformer":
            out = skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="triton")
        else:
            out = kernelized_attention(q, k, v, attn_mask=mask, backend="triton")
        out.backward(grad)
    return pm


@pytest.mark.parametrize("kind,n_small", [("skyformer", 128), ("kernelized", 64)])
def test_fused_path_memory_is_linear_in_n_and_free_of_n_by_m_buffers(kind, n_small):
    n_large = 4 * n_small
    small, large = _measure(kind, n_small), _measure(kind, n_large)
    for n, pm in ((n_small, small), (n_large, large)):
        # float32 (heads x n x p) gradients / outputs, and for Skyformer the (heads x m x m) landmark solve
        allowed = HEADS * max(n * P, M * M if kind == "skyformer" else 0) * 4
        forbidden = HEADS * n * (M if kind == "skyformer" else n) * 4  # one (n x m) or (n x n) float32 buffer
        assert forbidden > allowed  # so the bound below would catch it
        assert pm.largest_bytes <= allowed, (n, pm.largest_bytes, allowed)
    # 4x the sequence: peak grows at most ~4x (linear), far below the 16x of anything quadratic.
    assert large.peak_bytes <= 4.5 * small.peak_bytes, (small.peak_bytes, large.peak_bytes)
