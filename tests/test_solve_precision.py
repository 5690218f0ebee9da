"""Where the fused Newton-Schulz solve may iterate in plain TF32: bfloat16 inputs only, never float16 or
float32 ones (triton_kernels.landmark_solve.solve_precision must respect it).

On a GPU, TF32 dots round their operands to 10 mantissa bits; the interpreter computes in full float32 and
cannot show it. So this test emulates that rounding in the iteration (every product's operands rounded to
nearest TF32) and measures the attention output's error against the float64 truth, beside the error of the
plain PyTorch path computed in the input dtype (the yardstick of the 2x rule). The n x m work stays in
float64 here: only the solve's rounding is measured.
"""

import pytest
import torch

from skyformer_ext import reference, sample_landmarks
from triton_kernels.landmark_solve import solve_precision

TF32_DROPPED_BITS = 13  # float32 keeps 23 mantissa bits, TF32 10


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32)
    half_ulp = 1 << (TF32_DROPPED_BITS - 1)
    return ((bits + half_ulp) & ~((1 << TF32_DROPPED_BITS) - 1)).view(torch.float32)


def _newton_schulz_inverse_in_tf32(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """reference.newton_schulz_inverse with every matrix product's operands rounded to TF32."""
    def product(a, b):
        return _round_to_tf32(a) @ _round_to_tf32(b)

    d = matrix.sum(-1).rsqrt()
    normalized = d[..., :, None] * matrix * d[..., None, :]
    eye = torch.eye(matrix.shape[-1])
    approx = normalized.transpose(-1, -2) / normalized.sum(-2).amax(-1)[..., None, None]
    for _ in range(iterations):
        nv = product(normalized, approx)
        approx = 0.25 * product(approx, 13 * eye - product(nv, 15 * eye - product(nv, 7 * eye - nv)))
    return d[..., :, None] * approx * d[..., None, :]


def _output_errors(dtype):
    """(error of the PyTorch path in dtype, error added by a TF32 solve) at n = 512, m = 128, p = 64."""
    batch, heads, n, p, m, ridge = 2, 2, 512, 64, 128, 0.1
    q, k = ((0.8 * torch.randn(batch, heads, n, p)).to(dtype) for _ in range(2))
    v = torch.randn(batch, heads, n, p).to(dtype)
    idx = sample_landmarks(batch, n, n, m)
    scale = p ** -0.5
    q64, k64, v64 = q.double(), k.double(), v.double()
    landmarks = torch.cat([q64, k64], 2).gather(2, idx[:, None, :, None].expand(-1, heads, -1, p))
    regularized = reference.landmark_gram(landmarks, scale) + ridge * torch.eye(m, dtype=torch.float64)
    summary = reference.key_summary(k64, v64, landmarks, None, scale)
    truth = reference.query_apply(q64, landmarks, reference.newton_schulz_inverse(regularized, 6) @ summary, scale)
    tf32_solve = _newton_schulz_inverse_in_tf32(regularized.float(), 6).double() @ summary
    with_tf32 = reference.query_apply(q64, landmarks, tf32_solve, scale)
    same_dtype = reference.skyformer_attention(q, k, v, idx, ridge=ridge).double()
    return (same_dtype - truth).abs().max().item(), (with_tf32 - truth).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tf32_solve_only_where_its_error_hides_under_the_input_rounding(dtype):
    base_error, tf32_error = _output_errors(dtype)
    if dtype == torch.bfloat16:
        # The TF32 solve adds under a quarter of what bfloat16 rounding already costs: admissible.
        assert tf32_error <= 0.25 * base_error, (tf32_error, base_error)
    else:
        # It would eat most of (or exceed) the 2x budget: the kernel must not choose it.
        assert tf32_error > 0.5 * base_error, (tf32_error, base_error)
        assert solve_precision(dtype) != "tf32"
