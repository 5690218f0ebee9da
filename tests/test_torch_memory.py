"""The tiled torch path never allocates anything that scales with n*m or n^2, forward or backward."""

import torch

import skyformer_ext as sx
from skyformer_ext import torch_backend
from skyformer_ext._memory import PeakMemory

HEADS, P, M = 2, 16, 32


def _peak_and_largest(n, fn):
    q, k, v = (torch.randn(1, HEADS, n, P, requires_grad=True) for _ in range(3))
    idx = sx.sample_landmarks(1, n, n, M)
    with PeakMemory() as pm:
        out = fn(q, k, v, idx)
        out.backward(torch.ones_like(out))
    return pm.peak_bytes, pm.largest_bytes


def _check_linear(fn, small, large, monkeypatch):
    monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", 1 << 14)
    growth = large / small
    peak_small, _ = _peak_and_largest(small, fn)
    peak_large, largest_large = _peak_and_largest(large, fn)
    sequence_tensor = HEADS * large * P * 4  # one (heads, n, p) float32 tensor: q, k, v, out, their grads
    # The largest single allocation is (n, p)-sized (a gradient, the output), never (n, m) or (n, n).
    assert largest_large <= sequence_tensor, (largest_large, sequence_tensor)
    # Peak grows linearly in n (n^2 would grow by growth^2).
    assert peak_large <= 1.1 * growth * peak_small, (peak_small, peak_large)
    assert peak_large <= 16 * sequence_tensor, (peak_large, sequence_tensor)


def test_skyformer_torch_memory_is_linear(monkeypatch):
    _check_linear(lambda q, k, v, idx: sx.skyformer_attention(q, k, v, landmark_indices=idx, backend="torch"),
                  1024, 8192, monkeypatch)


def test_kernelized_torch_memory_has_no_n_squared(monkeypatch):
    _check_linear(lambda q, k, v, idx: sx.kernelized_attention(q, k, v, backend="torch"), 256, 1024,
                  monkeypatch)
