"""The fused landmark-solve kernels (triton_kernels.landmark_solve) against the float64 reference.

Truth: skyformer_ext.reference.landmark_gram and newton_schulz_inverse in float64 on the same (rounded)
landmarks and the same summed partials, autograd for the backward through the Gram and the iteration; for
the Cholesky kernels torch.linalg.solve with sym(M) + ridge I, and skyformer_ext.solve's failure policy.
Every tensor allocated with torch.empty (outputs and the kernels' workspace) is pre-filled with NaN, so an
element a kernel forgets to write, or reads before writing, fails. The solve runs in float32 whatever the
input dtype, so every dtype meets a float32 tolerance; only outputs stored in half precision add that
dtype's rounding.
"""

import pytest
import torch

from skyformer_ext import reference, solve
from triton_kernels import landmark_solve
from conftest import max_error

FLOAT32_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("nan_poisoned_empty")  # unwritten outputs and gradients cannot pass


def _problem(batch, heads, m, p, p_v, splits, dtype):
    """Landmarks of norm ~p^(1/4), so that kappa with scale p^-1/2 spans (0, 1]; each (batch, head) its own."""
    landmarks = (0.6 * p ** -0.25 * torch.randn(batch, heads, m, p, dtype=torch.float64)).to(dtype)
    partials = torch.randn(splits, batch, heads, m, p_v, dtype=torch.float32)
    grad_partials = torch.randn(splits, batch, heads, m, p_v, dtype=torch.float32)
    return landmarks, partials, grad_partials


def _truth(landmarks, partials, grad_partials, scale, ridge, ns_iters):
    """(Y, dZ, dL) in float64 by autograd through the reference Gram and iteration."""
    rows = landmarks.double().requires_grad_()
    summary = partials.double().sum(0).requires_grad_()
    gram = reference.landmark_gram(rows, scale)
    eye = torch.eye(gram.shape[-1], dtype=torch.float64)
    values = reference.newton_schulz_inverse(gram + ridge * eye, ns_iters) @ summary
    values.backward(grad_partials.double().sum(0))
    return values.detach(), summary.grad, rows.grad


def _assert_close(got, truth, name, stored_dtype=torch.float32):
    """Within FLOAT32_TOL of max|truth|, plus the rounding of a half-precision store."""
    assert not got.isnan().any(), f"{name}: NaN (an element was never written)"
    rounding = 0.0 if stored_dtype == torch.float32 else torch.finfo(stored_dtype).eps
    bound = FLOAT32_TOL * truth.abs().max().item() + rounding * truth.abs()
    err = (got.double() - truth).abs()
    assert (err <= bound).all(), f"{name}: worst error {err.max().item():.3e} vs max|truth| {truth.abs().max():.3e}"


# (dtype, batch, heads, m, p, p_v, splits, ns_iters, ridge): every axis covered, not the full product.
# m = 33 spans two of the 32-wide tiles, m = 97 four; p = 256 is the widest Gram tile.
CASES = [
    (torch.float32, 1, 2, 2, 19, 7, 1, 6, 0.1),
    (torch.float32, 2, 1, 5, 80, 48, 3, 1, 1.0),
    (torch.float32, 1, 2, 33, 64, 19, 3, 3, 0.1),
    (torch.float32, 1, 1, 97, 19, 80, 1, 2, 0.1),
    (torch.float16, 1, 2, 33, 80, 32, 1, 2, 1.0),
    (torch.float16, 1, 1, 1, 16, 16, 3, 1, 0.1),
    (torch.bfloat16, 1, 1, 33, 19, 64, 3, 6, 0.1),
    (torch.bfloat16, 1, 1, 5, 256, 256, 1, 6, 0.1),
]


@pytest.mark.parametrize("dtype,batch,heads,m,p,p_v,splits,ns_iters,ridge", CASES)
def test_solve_matches_reference(dtype, batch, heads, m, p, p_v, splits, ns_iters, ridge):
    scale = p ** -0.5
    landmarks, partials, grad_partials = _problem(batch, heads, m, p, p_v, splits, dtype)
    values, summary = landmark_solve.solve_forward(landmarks, partials, scale, ridge, ns_iters, dtype)
    grad_scaled, factor, grad_landmarks = landmark_solve.solve_backward(grad_partials, landmarks, summary, scale,
                                                                        ridge, ns_iters, dtype)
    truth_values, truth_grad_summary, truth_grad_landmarks = _truth(landmarks, partials, grad_partials, scale,
                                                                    ridge, ns_iters)
    assert values.dtype == dtype and summary.dtype == torch.float32
    assert grad_scaled.dtype == dtype and factor.shape == (batch, heads) and grad_landmarks.dtype == torch.float32
    assert torch.equal(summary, partials.sum(0) if splits == 1 else partials[0] + partials[1] + partials[2])
    _assert_close(values, truth_values, "Y", dtype)
    _assert_close(grad_scaled.double() * factor.double()[..., None, None], truth_grad_summary, "dZ", dtype)
    _assert_close(grad_landmarks, truth_grad_landmarks, "dL")
    # f: a power of two with max|dZ / f| <= 1 (and > 1/2: the smallest such).
    mantissa, _ = torch.frexp(factor)
    assert (mantissa == 0.5).all()
    per_matrix_max = grad_scaled.double().abs().amax((-1, -2))
    assert (per_matrix_max <= 1).all() and (per_matrix_max > 0.5).all()


def test_large_gradient_is_scaled_into_half_range_and_zero_gradient_gives_factor_one():
    landmarks, partials, grad_partials = _problem(1, 2, 5, 16, 16, 1, torch.float16)
    grad_partials[:, :, 0] *= 1e6  # dZ ~1e6 overflows float16 unless scaled
    grad_partials[:, :, 1] = 0
    values, summary = landmark_solve.solve_forward(landmarks, partials, 0.25, 0.1, 3, torch.float16)
    grad_scaled, factor, grad_landmarks = landmark_solve.solve_backward(grad_partials, landmarks, summary, 0.25,
                                                                        0.1, 3, torch.float16)
    _, truth_grad_summary, _ = _truth(landmarks, partials, grad_partials, 0.25, 0.1, 3)
    assert factor[0, 0] >= 2 ** 19 and factor[0, 1] == 1
    assert torch.isfinite(grad_scaled).all() and (grad_scaled[0, 1] == 0).all() and (grad_landmarks[0, 1] == 0).all()
    _assert_close(grad_scaled[0, 0].double() * factor[0, 0].double(), truth_grad_summary[0, 0], "dZ",
                  torch.float16)


def test_strided_inputs():
    """Landmarks and partials as non-contiguous views: the kernels take any strides. One iteration: strides
    only meet the loads and stores around it (the iterates live in the kernels' own workspace)."""
    landmarks, partials, grad_partials = _problem(2, 2, 17, 32, 24, 2, torch.float32)
    landmarks_t = landmarks.transpose(1, 2).contiguous().transpose(1, 2)  # head stride < row stride
    partials_t = partials.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major matrices
    values, summary = landmark_solve.solve_forward(landmarks_t, partials_t, 0.2, 0.1, 1, torch.float32)
    grad_scaled, factor, grad_landmarks = landmark_solve.solve_backward(
        grad_partials.transpose(-1, -2).contiguous().transpose(-1, -2), landmarks_t, summary.transpose(-1, -2)
        .contiguous().transpose(-1, -2), 0.2, 0.1, 1, torch.float32)
    truth_values, truth_grad_summary, truth_grad_landmarks = _truth(landmarks, partials, grad_partials, 0.2, 0.1, 1)
    _assert_close(values, truth_values, "Y")
    _assert_close(grad_scaled.double() * factor.double()[..., None, None], truth_grad_summary, "dZ")
    _assert_close(grad_landmarks, truth_grad_landmarks, "dL")


def test_rejects_sizes_the_kernels_do_not_cover():
    with pytest.raises(ValueError):
        landmark_solve.solve_forward(torch.zeros(1, 1, 257, 16), torch.zeros(1, 1, 1, 257, 16), 1.0, 0.1, 1,
                                     torch.float32)
    with pytest.raises(ValueError):
        landmark_solve.solve_forward(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 1, 4, 16), 1.0, 0.1, 0,
                                     torch.float32)
    with pytest.raises(ValueError):
        landmark_solve.cholesky_forward(torch.zeros(1, 1, 257, 16), torch.zeros(1, 1, 1, 257, 16), 1.0, 0.1,
                                        torch.float32)


# ---- Cholesky -------------------------------------------------------------------------------------------

def _cholesky_truth(landmarks, partials, grad_partials, scale, ridge):
    """(Y, dZ, dL) in float64 by autograd through the reference Gram, sym and torch.linalg.solve."""
    rows = landmarks.double().requires_grad_()
    summary = partials.double().sum(0).requires_grad_()
    gram = reference.landmark_gram(rows, scale)
    regularized = 0.5 * (gram + gram.transpose(-1, -2)) + ridge * torch.eye(gram.shape[-1], dtype=torch.float64)
    values = torch.linalg.solve(regularized, summary)
    values.backward(grad_partials.double().sum(0))
    return values.detach(), summary.grad, rows.grad


def _cholesky_run(landmarks, partials, grad_partials, scale, ridge, dtype):
    values, summary, status = landmark_solve.cholesky_forward(landmarks, partials, scale, ridge, dtype)
    grad_scaled, factor, grad_landmarks = landmark_solve.cholesky_backward(grad_partials, landmarks, summary, scale,
                                                                           ridge, dtype)
    return values, summary, status, grad_scaled.double() * factor.double()[..., None, None], grad_landmarks


# (dtype, batch, heads, m, p, p_v, splits): the factor's blocks are 16 wide: m = 33 ends in a 1-row block, m = 97
# has seven.
CHOLESKY_CASES = [
    (torch.float32, 1, 2, 1, 19, 7, 3),
    (torch.float32, 2, 1, 2, 33, 48, 1),
    (torch.float32, 1, 2, 33, 64, 19, 3),
    (torch.float32, 1, 1, 97, 19, 80, 1),
    (torch.float16, 1, 2, 33, 21, 32, 3),
    (torch.bfloat16, 1, 1, 97, 17, 24, 1),
    (torch.bfloat16, 1, 1, 5, 256, 256, 3),
]


@pytest.mark.parametrize("dtype,batch,heads,m,p,p_v,splits", CHOLESKY_CASES)
def test_cholesky_matches_reference(dtype, batch, heads, m, p, p_v, splits):
    """M + 0.1 I has condition number <= (m + 0.1) / 0.1, so float32 Cholesky meets FLOAT32_TOL here."""
    scale = p ** -0.5
    landmarks, partials, grad_partials = _problem(batch, heads, m, p, p_v, splits, dtype)
    values, summary, status, grad_summary, grad_landmarks = _cholesky_run(landmarks, partials, grad_partials, scale,
                                                                          0.1, dtype)
    truth_values, truth_grad_summary, truth_grad_landmarks = _cholesky_truth(landmarks, partials, grad_partials,
                                                                             scale, 0.1)
    assert values.dtype == dtype and status.dtype == torch.int32 and (status == 0).all()
    assert torch.equal(summary, partials.sum(0) if splits == 1 else partials[0] + partials[1] + partials[2])
    _assert_close(values, truth_values, "Y", dtype)
    _assert_close(grad_summary, truth_grad_summary, "dZ", dtype)
    _assert_close(grad_landmarks, truth_grad_landmarks, "dL")


def test_cholesky_policy_constants_are_those_of_solve():
    assert (landmark_solve.MAX_JITTER_STEPS, landmark_solve.JITTER_GROWTH, landmark_solve.NOT_POSITIVE_DEFINITE,
            landmark_solve.NON_FINITE) == (solve.MAX_JITTER_STEPS, solve.JITTER_GROWTH, solve.NOT_POSITIVE_DEFINITE,
                                           solve.NON_FINITE)


def _duplicate_landmarks(m, duplicates):
    """Three matrices of m landmarks (kappa off-diagonals ~0.1 at scale 0.25); matrices 0 and 2 repeat rows:
    their Gram is singular."""
    landmarks = torch.randn(1, 3, m, 8, dtype=torch.float64)
    for source, copy in duplicates:
        landmarks[0, 0, copy] = landmarks[0, 0, source]
    landmarks[0, 2, 5] = landmarks[0, 2, 4]
    return landmarks.float()


@pytest.mark.parametrize("m,duplicates", [(12, [(0, 1)]), (40, [(3, 35), (10, 11)])])
def test_cholesky_singular_gram_is_solved_with_the_jitter_of_the_fallback(m, duplicates):
    """ridge = 0 and duplicate landmarks: the same status as solve.fallback_cholesky_solve, and Y solves the
    jittered system the status names to rounding (Cholesky is backward stable; the system's condition number
    is ~1 / (10 tau) ~ 1e5, so Y itself agrees with the fallback only to ~1e-3)."""
    landmarks = _duplicate_landmarks(m, duplicates)
    partials = torch.randn(1, 1, 3, m, 4)
    values, summary, status = landmark_solve.cholesky_forward(landmarks, partials, 0.25, 0.0, torch.float32)
    gram = reference.landmark_gram(landmarks.double(), 0.25)
    fallback_values, fallback_status = solve.fallback_cholesky_solve(gram.float(), summary, 0.0)
    assert status.tolist() == fallback_status.tolist() == [[1, 0, 1]]
    assert torch.isfinite(values).all()
    relative = (values - fallback_values).abs().amax((-1, -2)) / fallback_values.abs().amax((-1, -2))
    assert (relative <= 1e-2).all(), relative
    tau = m * torch.finfo(torch.float32).eps  # max |M_ii| = 1
    shift = tau * solve.JITTER_GROWTH ** status.double() * (status > 0)
    regularized = gram + shift[..., None, None] * torch.eye(m, dtype=torch.float64)
    residual = (regularized @ values.double() - summary.double()).abs().amax((-1, -2))
    bound = m * torch.finfo(torch.float32).eps * regularized.abs().sum(-1).amax(-1) * values.abs().amax((-1, -2))
    assert (residual <= bound).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, under the interpreter, on NaN arithmetic
def test_cholesky_hopeless_matrix_gets_nan_and_status_4_alone():
    """ridge = -0.01: the singular Gram (matrix 0) stays indefinite after the largest jitter (1e3 tau ~ 1e-3),
    the others (smallest eigenvalue > 0.05) are solved as usual, forward and backward."""
    m = 12
    landmarks = _duplicate_landmarks(m, [(0, 1)])
    landmarks[0, 2] = torch.randn(m, 8)  # matrix 2 regular again
    partials, grad_partials = torch.randn(2, 1, 1, 3, m, 4).unbind(0)
    values, _, status, grad_summary, grad_landmarks = _cholesky_run(landmarks, partials, grad_partials, 0.25, -0.01,
                                                                    torch.float32)
    assert status.tolist() == [[solve.NOT_POSITIVE_DEFINITE, 0, 0]]
    for got in (values, grad_summary, grad_landmarks):
        assert got[0, 0].isnan().all()
    truth = _cholesky_truth(landmarks[:, 1:], partials[:, :, 1:], grad_partials[:, :, 1:], 0.25, -0.01)
    for got, expected, name in zip((values, grad_summary, grad_landmarks), truth, ("Y", "dZ", "dL")):
        _assert_close(got[:, 1:], expected, name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, under the interpreter, on NaN arithmetic
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cholesky_non_finite_landmarks_give_status_minus_1_and_nan(bad):
    landmarks, partials, grad_partials = _problem(1, 3, 9, 16, 8, 1, torch.float32)
    landmarks[0, 1, 4, 7] = bad
    values, _, status, grad_summary, grad_landmarks = _cholesky_run(landmarks, partials, grad_partials, 0.25, 0.1,
                                                                    torch.float32)
    assert status.tolist() == [[0, solve.NON_FINITE, 0]]
    for got in (values, grad_summary, grad_landmarks):
        assert got[0, 1].isnan().all()
    keep = [0, 2]
    truth = _cholesky_truth(landmarks[:, keep], partials[:, :, keep], grad_partials[:, :, keep], 0.25, 0.1)
    for got, expected, name in zip((values, grad_summary, grad_landmarks), truth, ("Y", "dZ", "dL")):
        _assert_close(got[:, keep], expected, name)


def test_cholesky_strided_inputs():
    landmarks, partials, grad_partials = _problem(2, 2, 17, 32, 24, 2, torch.float32)
    landmarks_t = landmarks.transpose(1, 2).contiguous().transpose(1, 2)
    partials_t = partials.transpose(-1, -2).contiguous().transpose(-1, -2)
    values, summary, status = landmark_solve.cholesky_forward(landmarks_t, partials_t, 0.2, 0.1, torch.float32)
    grad_scaled, factor, grad_landmarks = landmark_solve.cholesky_backward(
        grad_partials.transpose(-1, -2).contiguous().transpose(-1, -2), landmarks_t,
        summary.transpose(-1, -2).contiguous().transpose(-1, -2), 0.2, 0.1, torch.float32)
    truth_values, truth_grad_summary, truth_grad_landmarks = _cholesky_truth(landmarks, partials, grad_partials, 0.2,
                                                                             0.1)
    _assert_close(values, truth_values, "Y")
    _assert_close(grad_scaled.double() * factor.double()[..., None, None], truth_grad_summary, "dZ")
    _assert_close(grad_landmarks, truth_grad_landmarks, "dL")
