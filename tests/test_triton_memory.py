"""No allocation of the fused path (forward + backward) scales with n*m or n^2.

PeakMemory (skyformer_ext/_memory.py) records every tensor storage created inside the block, on any device,
including the buffers the Triton stages' custom ops allocate inside their bodies, so the interpreter run on
CPU counts what the host code would allocate on a GPU (the kernels' tiles live in registers / shared memory
there) plus the interpreter's own copies of the inputs. Allowed: (n x p) gradients, outputs and input
copies, (m x m) for the landmark solve, (m x p), and per-split partial sums (a few (n x p) for the
kernelized key gradients). With m = 4p one (n x m) buffer is larger than any of those at every n tested,
and an (n x n) one by far.
"""

from collections import Counter

import pytest
import torch

from skyformer_ext import kernelized_attention, reference, sample_landmarks, skyformer_attention
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
            # One Newton-Schulz iteration: the solve's workspace is (m x m)-sized whatever the count (its
            # iterates are n-independent, exempt below), and the interpreter spends most of a call iterating.
            out = skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="triton", ns_iters=1)
        else:
            out = kernelized_attention(q, k, v, attn_mask=mask, backend="triton")
        out.backward(grad)
    return pm


@pytest.mark.parametrize("kind,n_small", [("skyformer", 128), ("kernelized", 64)])
def test_fused_path_memory_is_linear_in_n_and_free_of_n_by_m_buffers(kind, n_small):
    n_large = 4 * n_small
    small, large = _measure(kind, n_small), _measure(kind, n_large)
    # Buffers of the same size at both lengths do not depend on n (the m x m landmark solve's workspace,
    # O(m * p) landmark buffers) and are exempt; every other one must stay below one (n x m) / (n x n)
    # float32 buffer, and grow at most ~4x (linear) for 4x the sequence, far below the 16x of anything
    # quadratic.
    n_independent = Counter(small.allocations) & Counter(large.allocations)
    growing = {n: sorted((Counter(pm.allocations) - n_independent).elements())
               for n, pm in ((n_small, small), (n_large, large))}
    assert growing[n_small] and growing[n_large], "nothing grows with n: the measurement missed the n-sized buffers"
    for n, sizes in growing.items():
        forbidden = HEADS * n * (M if kind == "skyformer" else n) * 4
        assert sizes[-1] < forbidden, (n, sizes[-1], forbidden)
    assert growing[n_large][-1] <= 4 * growing[n_small][-1], growing
    assert large.peak_bytes <= 4.5 * small.peak_bytes, (small.peak_bytes, large.peak_bytes)


def test_deterministic_false_needs_no_per_split_partial_buffers(monkeypatch):
    """The key summary streams n keys for m landmark rows: deterministic=True writes (splits x m x p) float32
    partials, deterministic=False one (m x p) buffer that the splits add into atomically. Measured on the
    stage's host wrapper, whose split plan the test records; the interpreter's own copies of the inputs are
    the same in both runs."""
    from triton_kernels import gaussian_tiles, key_summary

    buffers = []
    real_buffer = gaussian_tiles._buffer

    def recording(*args):
        buffers.append(real_buffer(*args))
        return buffers[-1]

    monkeypatch.setattr(gaussian_tiles, "_buffer", recording)
    n, m = 512, 16
    k = 0.5 * torch.randn(1, 1, n, P)
    v = torch.randn(1, 1, n, P)
    landmarks = 0.5 * torch.randn(1, HEADS, m, P)
    mask = torch.rand(1, n) > 0.2
    summary_bytes = HEADS * m * P * 4
    peak, splits = {}, {}
    for deterministic in (True, False):
        with PeakMemory() as pm:
            summary_partials = key_summary.forward(k, v, landmarks, mask, 0.25, deterministic)
        peak[deterministic], splits[deterministic] = pm.peak_bytes, buffers.pop().shape[0]
        torch.testing.assert_close(summary_partials.sum(0), reference.key_summary(k, v, landmarks, mask, 0.25))
    assert splits[True] >= 2 and splits[False] == 1, splits  # the interpreter's split plan cuts n into ranges
    # the (splits x m x p) partials (the solve adds them on load), against one (m x p) buffer
    assert peak[True] - peak[False] == (splits[True] - 1) * summary_bytes, (peak, splits)
