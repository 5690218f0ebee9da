"""The landmark solve (torch.ops.skyformer.* and its PyTorch fallback) against torch.linalg and the reference.

Three implementations of the Cholesky solve share one failure policy and are all tested: the compiled CPU
kernel ("op"), the ATen/LAPACK path the CUDA op uses for m > 256 ("generic"), and the pure-PyTorch fallback
("fallback"). Newton-Schulz: the compiled op and the fallback against reference.newton_schulz_inverse.
"""

import warnings

import pytest
import torch

from skyformer_ext import _extension, reference, solve

from conftest import max_error

RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _op(gram, summary, ridge):
    solution, _, status = torch.ops.skyformer.cholesky_solve(gram, summary, ridge)
    return solution, status


def _generic(gram, summary, ridge):
    solution, _, status = torch.ops.skyformer.cholesky_solve_generic(gram, summary, ridge)
    return solution, status


CHOLESKY = {"op": _op, "generic": _generic, "fallback": solve.fallback_cholesky_solve}


def _ns_op(gram, summary, ridge, iters):
    return torch.ops.skyformer.newton_schulz_solve(gram, summary, ridge, iters)


NEWTON_SCHULZ = {"op": _ns_op, "fallback": solve.fallback_newton_schulz_solve}


def gaussian_gram(batch_shape, m, dtype, *, head_dim=16, scale=None):
    """kappa(L, L) of random landmarks; the default scale keeps off-diagonals ~0.05 (well conditioned)."""
    landmarks = torch.randn(*batch_shape, m, head_dim, dtype=torch.float64)
    scale = 3.0 / head_dim if scale is None else scale
    return reference.landmark_gram(landmarks, scale).to(dtype)


def relative_error(actual, expected):
    return max_error(actual, expected) / max(expected.abs().max().item(), 1e-300)


def exact_solution(gram, summary, shift):
    """(sym(M) + shift I)^-1 Z in float64 from the very values the implementation saw."""
    g = gram.double()
    eye = torch.eye(g.shape[-1], dtype=torch.float64)
    shift = torch.as_tensor(shift, dtype=torch.float64)
    while shift.dim() < g.dim():
        shift = shift.unsqueeze(-1)
    return torch.linalg.solve(0.5 * (g + g.transpose(-1, -2)) + shift * eye, summary.double())


def jitter_tau(gram):
    m = gram.shape[-1]
    scale = gram.diagonal(0, -2, -1).abs().amax(-1).double()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return m * torch.finfo(gram.dtype).eps * scale


# ---- accuracy ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", list(CHOLESKY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 17, 64, 257])
def test_cholesky_matches_linalg(impl, dtype, m):
    gram = gaussian_gram((2, 3), m, dtype)
    summary = torch.randn(2, 3, m, 9, dtype=dtype)
    solution, status = CHOLESKY[impl](gram, summary, 0.1)
    assert solution.dtype == dtype and solution.shape == summary.shape
    assert status.shape == (2, 3) and status.dtype == torch.int32 and (status == 0).all()
    assert relative_error(solution, exact_solution(gram, summary, 0.1)) <= RELATIVE_TOLERANCE[dtype]


@pytest.mark.parametrize("impl", list(NEWTON_SCHULZ))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 17, 64, 257])
def test_newton_schulz_matches_reference_iteration(impl, dtype, m):
    gram = gaussian_gram((2, 3), m, dtype)
    summary = torch.randn(2, 3, m, 9, dtype=dtype)
    eye = torch.eye(m, dtype=torch.float64)
    expected = reference.newton_schulz_inverse(gram.double() + 0.1 * eye, 6) @ summary.double()
    actual = NEWTON_SCHULZ[impl](gram, summary, 0.1, 6)
    assert actual.dtype == dtype
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE[dtype]


@pytest.mark.parametrize("impl", list(NEWTON_SCHULZ))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_schulz_converges_to_linalg(impl, dtype):
    """On a well-conditioned M the iteration (cubic convergence) reaches the exact solve."""
    gram = gaussian_gram((4,), 64, dtype)
    summary = torch.randn(4, 64, 5, dtype=dtype)
    actual = NEWTON_SCHULZ[impl](gram, summary, 0.1, 12)
    expected = torch.linalg.solve(gram.double() + 0.1 * torch.eye(64, dtype=torch.float64), summary.double())
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE[dtype]


def _near_duplicate_gram(dtype, m=64, offset=1e-4, ridge=1e-3):
    landmarks = torch.randn(m, 16, dtype=torch.float64)
    landmarks[1::4] = landmarks[0::4] + offset * torch.randn(m // 4, 16, dtype=torch.float64)
    landmarks[2::4] = landmarks[0::4]  # exact duplicates
    return reference.landmark_gram(landmarks, 1.0 / 16).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ridge", [1e-1, 1e-3])
def test_ill_conditioned_report(dtype, ridge):
    """Duplicate / near-duplicate landmarks make M + ridge I ill conditioned. Cholesky is backward stable:
    its relative residual stays at rounding level whatever the condition number, and its forward error is
    bounded by ~cond * eps. The numbers are printed (pytest -s) as the report."""
    gram = _near_duplicate_gram(dtype)
    summary = torch.randn(64, 8, dtype=dtype)
    regularized = gram.double() + ridge * torch.eye(64, dtype=torch.float64)
    cond = torch.linalg.cond(regularized).item()
    truth = torch.linalg.solve(regularized, summary.double())
    eps = torch.finfo(dtype).eps
    lines = [f"ill-conditioned M (m=64, dtype={dtype}, ridge={ridge}): cond={cond:.2e}"]
    for name, impl in CHOLESKY.items():
        solution, status = impl(gram, summary, ridge)
        assert (status == 0).all()
        residual = (regularized @ solution.double() - summary.double()).abs().max().item()
        relative_residual = residual / (regularized.abs().sum(-1).max().item() * solution.abs().max().item())
        error = relative_error(solution, truth)
        lines.append(f"  cholesky[{name}]: relative error {error:.2e}, relative residual {relative_residual:.2e}")
        assert relative_residual <= 64 * eps
        assert error <= 64 * cond * eps
    for name, impl in NEWTON_SCHULZ.items():
        error = relative_error(impl(gram, summary, ridge, 6), truth)
        lines.append(f"  newton_schulz[{name}] (6 iterations): relative error {error:.2e}")
    print("\n" + "\n".join(lines))


# ---- gradients ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", list(CHOLESKY))
def test_cholesky_gradcheck(impl):
    gram = gaussian_gram((2,), 5, torch.float64).requires_grad_()
    summary = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, z: CHOLESKY[impl](g, z, 0.1)[0], (gram, summary))


@pytest.mark.parametrize("impl", list(NEWTON_SCHULZ))
def test_newton_schulz_gradcheck(impl):
    gram = gaussian_gram((2,), 5, torch.float64, scale=1.0 / 16).requires_grad_()
    summary = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, z: NEWTON_SCHULZ[impl](g, z, 0.1, 3), (gram, summary))


def _reference_and_actual_grads(inverse, impl, m=12, iters=6):
    gram = gaussian_gram((2, 3), m, torch.float64, scale=1.0 / 16)
    summary = torch.randn(2, 3, m, 5, dtype=torch.float64)
    upstream = torch.randn(2, 3, m, 5, dtype=torch.float64)
    grads = []
    for fn in (lambda g, z: reference.landmark_solve(g, z, 0.1, inverse, iters), impl):
        g, z = gram.clone().requires_grad_(), summary.clone().requires_grad_()
        (fn(g, z) * upstream).sum().backward()
        grads.append((g.grad, z.grad))
    return grads


@pytest.mark.parametrize("impl", list(NEWTON_SCHULZ))
def test_newton_schulz_backward_is_autograd_of_reference(impl):
    """The backward differentiates through the iteration exactly: equal to autograd of the reference,
    including when 2 iterations are far from converged."""
    for iters in (2, 6):
        (ref_gram, ref_summary), (gram_grad, summary_grad) = _reference_and_actual_grads(
            "newton_schulz", lambda g, z: NEWTON_SCHULZ[impl](g, z, 0.1, iters), iters=iters)
        assert max_error(gram_grad, ref_gram) <= 1e-10 * ref_gram.abs().max().item()
        assert max_error(summary_grad, ref_summary) <= 1e-10 * ref_summary.abs().max().item()


@pytest.mark.parametrize("impl", list(CHOLESKY))
def test_cholesky_backward_matches_reference_on_symmetric_matrices(impl):
    """dZ equals autograd of torch.linalg.solve; dM is its symmetric part (the op reads sym(M))."""
    (ref_gram, ref_summary), (gram_grad, summary_grad) = _reference_and_actual_grads(
        "cholesky", lambda g, z: CHOLESKY[impl](g, z, 0.1)[0])
    assert max_error(summary_grad, ref_summary) <= 1e-10 * ref_summary.abs().max().item()
    symmetric_ref = 0.5 * (ref_gram + ref_gram.transpose(-1, -2))
    assert max_error(gram_grad, symmetric_ref) <= 1e-10 * symmetric_ref.abs().max().item()


@pytest.mark.parametrize("inverse", ["cholesky", "newton_schulz"])
def test_landmark_gradients_match_reference(inverse):
    """Through M = kappa(L, L): the landmark gradient is the same whichever convention dM uses."""
    landmarks = torch.randn(2, 3, 10, 6, dtype=torch.float64)
    summary = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    grads = []
    for fn in (reference.landmark_solve, solve.landmark_solve):
        lm, z = landmarks.clone().requires_grad_(), summary.clone().requires_grad_()
        out = fn(reference.landmark_gram(lm, 0.2), z, 0.1, inverse, 6)
        out.square().sum().backward()
        grads.append((lm.grad, z.grad))
    (ref_l, ref_z), (l_grad, z_grad) = grads
    assert max_error(l_grad, ref_l) <= 1e-10 * ref_l.abs().max().item()
    assert max_error(z_grad, ref_z) <= 1e-10 * ref_z.abs().max().item()


# ---- torch.library registration ------------------------------------------------------------------------------

def _opcheck_cases():
    gram = gaussian_gram((2, 3), 6, torch.float64)
    summary = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    factor = torch.linalg.cholesky(gram + 0.1 * torch.eye(6, dtype=torch.float64))
    grad = torch.randn_like(summary)

    def fresh(*tensors, requires_grad=False):
        return tuple(t.clone().requires_grad_(requires_grad) for t in tensors)

    ops = torch.ops.skyformer
    for requires_grad in (False, True):
        yield "cholesky_solve", ops.cholesky_solve.default, (*fresh(gram, summary, requires_grad=requires_grad), 0.1)
        yield ("cholesky_solve_generic", ops.cholesky_solve_generic.default,
               (*fresh(gram, summary, requires_grad=requires_grad), 0.1))
        yield ("newton_schulz_solve", ops.newton_schulz_solve.default,
               (*fresh(gram, summary, requires_grad=requires_grad), 0.1, 6))
    yield "cholesky_solve_factored", ops.cholesky_solve_factored.default, fresh(factor, summary)
    yield ("newton_schulz_solve_backward", ops.newton_schulz_solve_backward.default,
           (*fresh(grad, gram, summary), 0.1, 6))


@pytest.mark.parametrize("name, op, args", list(_opcheck_cases()),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_ops_reject_bad_arguments():
    gram = gaussian_gram((2,), 4, torch.float64)
    with pytest.raises(RuntimeError, match="summary must have shape"):
        torch.ops.skyformer.cholesky_solve(gram, torch.randn(2, 5, 3, dtype=torch.float64), 0.1)
    with pytest.raises(RuntimeError, match="gram must have shape"):
        torch.ops.skyformer.cholesky_solve(gram[..., :3], torch.randn(2, 4, 3, dtype=torch.float64), 0.1)
    with pytest.raises(RuntimeError, match="must equal gram.dtype"):
        torch.ops.skyformer.cholesky_solve(gram, torch.randn(2, 4, 3), 0.1)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.skyformer.newton_schulz_solve(gram.half(), torch.randn(2, 4, 3).half(), 0.1, 6)
    with pytest.raises(RuntimeError, match="ns_iters must be >= 1"):
        torch.ops.skyformer.newton_schulz_solve(gram, torch.randn(2, 4, 3, dtype=torch.float64), 0.1, 0)


# ---- shapes and strides ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3), (0,), (2, 0)])
def test_batch_shapes(batch_shape):
    gram = gaussian_gram(batch_shape, 7, torch.float64)
    summary = torch.randn(*batch_shape, 7, 3, dtype=torch.float64)
    expected = exact_solution(gram, summary, 0.1)
    for impl in CHOLESKY.values():
        solution, status = impl(gram, summary, 0.1)
        assert solution.shape == summary.shape and status.shape == batch_shape
        assert max_error(solution, expected) <= 1e-12
    for impl in NEWTON_SCHULZ.values():
        assert impl(gram, summary, 0.1, 6).shape == summary.shape


def test_empty_right_hand_side():
    gram = gaussian_gram((3,), 5, torch.float64)
    for impl in CHOLESKY.values():
        solution, status = impl(gram, torch.empty(3, 5, 0, dtype=torch.float64), 0.1)
        assert solution.shape == (3, 5, 0) and (status == 0).all()


@pytest.mark.parametrize("m", [2, 33, 257])
def test_non_contiguous_inputs(m):
    """Strided, transposed and broadcast (stride-0) inputs give exactly the contiguous results."""
    big = gaussian_gram((4,), 2 * m, torch.float64)
    gram = big[:, ::2, ::2]  # strided, and a valid Gram matrix of every other landmark
    summary = torch.randn(4, 6, m, dtype=torch.float64).transpose(-1, -2)  # (4, m, 6), transposed
    assert not gram.is_contiguous() and not summary.is_contiguous()
    for impl in CHOLESKY.values():
        expected, _ = impl(gram.contiguous(), summary.contiguous(), 0.1)
        actual, _ = impl(gram, summary, 0.1)
        assert torch.equal(actual, expected)
    assert torch.equal(_ns_op(gram, summary, 0.1, 6), _ns_op(gram.contiguous(), summary.contiguous(), 0.1, 6))
    # The PyTorch fallback multiplies the strided operands directly, so BLAS may round differently.
    fallback = solve.fallback_newton_schulz_solve(gram, summary, 0.1, 6)
    assert max_error(fallback, _ns_op(gram, summary, 0.1, 6)) <= 1e-12 * fallback.abs().max().item()
    broadcast_gram = gram[:1].expand(4, m, m)
    for impl in CHOLESKY.values():
        actual, _ = impl(broadcast_gram, summary, 0.1)
        expected, _ = impl(broadcast_gram.contiguous(), summary.contiguous(), 0.1)
        assert torch.equal(actual, expected)


def test_asymmetric_input_uses_symmetric_part():
    gram = gaussian_gram((3,), 9, torch.float64)
    skew = torch.randn(3, 9, 9, dtype=torch.float64)
    summary = torch.randn(3, 9, 2, dtype=torch.float64)
    for impl in CHOLESKY.values():
        solution, _ = impl(gram + 0.01 * (skew - skew.transpose(-1, -2)), summary, 0.1)
        assert max_error(solution, exact_solution(gram, summary, 0.1)) <= 1e-12


# ---- failure policy --------------------------------------------------------------------------------------------

def _duplicate_landmark_gram(dtype, m=12):
    landmarks = torch.randn(3, m, 8, dtype=torch.float64)
    landmarks[:, 1] = landmarks[:, 0]
    landmarks[0, 5] = landmarks[0, 4]
    return reference.landmark_gram(landmarks, 0.25).to(dtype)


@pytest.mark.parametrize("impl", list(CHOLESKY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicate_landmarks_without_ridge_escalate_jitter(impl, dtype):
    """Singular M (duplicate landmarks, ridge 0): solved with the jitter the status reports."""
    gram = _duplicate_landmark_gram(dtype)
    summary = torch.randn(3, 12, 4, dtype=dtype)
    solution, status = CHOLESKY[impl](gram, summary, 0.0)
    assert ((status >= 1) & (status <= solve.MAX_JITTER_STEPS)).all()
    assert torch.isfinite(solution).all()
    # It solved exactly the jittered system the status names: the residual of sym(M) + shift I is at
    # rounding level relative to |A| |Y| (Cholesky is backward stable; the system itself has cond ~ 1/tau).
    shift = jitter_tau(gram) * solve.JITTER_GROWTH ** status.double()
    g = gram.double()
    regularized = 0.5 * (g + g.transpose(-1, -2)) + shift[:, None, None] * torch.eye(12, dtype=torch.float64)
    residual = (regularized @ solution.double() - summary.double()).abs().amax((-1, -2))
    scale = regularized.abs().sum(-1).amax(-1) * solution.double().abs().amax((-1, -2))
    assert (residual <= 12 * torch.finfo(dtype).eps * scale).all()


def test_all_implementations_agree_on_status():
    gram = _duplicate_landmark_gram(torch.float64)
    gram[2, 3, 3] = float("nan")
    summary = torch.randn(3, 12, 4, dtype=torch.float64)
    statuses = [impl(gram, summary, 0.0)[1] for impl in CHOLESKY.values()]
    assert statuses[0].tolist()[2] == solve.NON_FINITE
    for status in statuses[1:]:
        assert torch.equal(status, statuses[0])


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(solve, "_jitter_warned", False)


@pytest.mark.parametrize("extension", [True, False])
def test_landmark_solve_warns_once_on_jitter(extension, fresh_warnings, monkeypatch):
    if not extension:
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "_fallback_warned", True)
    gram = _duplicate_landmark_gram(torch.float64)[None]
    summary = torch.randn(1, 3, 12, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="not positive definite in working precision") as record:
        first = solve.landmark_solve(gram, summary, 0.0, "cholesky", 6)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = solve.landmark_solve(gram, summary, 0.0, "cholesky", 6)
    assert torch.isfinite(first).all() and torch.equal(first, second)


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_indefinite_gram_raises(extension, dtype, fresh_warnings, monkeypatch):
    if not extension:
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "_fallback_warned", True)
    gram = gaussian_gram((1, 2), 6, dtype)
    gram[0, 1] -= 2 * torch.eye(6, dtype=dtype)  # eigenvalues below -0.9: no small jitter can fix this
    summary = torch.randn(1, 2, 6, 3, dtype=dtype)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite for 1 of 2 landmark matrices"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            solve.landmark_solve(gram, summary, 0.1, "cholesky", 6)


@pytest.mark.parametrize("impl", list(CHOLESKY))
def test_indefinite_gram_status(impl):
    gram = -torch.eye(4, dtype=torch.float64).expand(2, 4, 4).clone()
    gram[0] = torch.eye(4, dtype=torch.float64)
    solution, status = CHOLESKY[impl](gram, torch.ones(2, 4, 1, dtype=torch.float64), 0.0)
    assert status.tolist() == [0, solve.NOT_POSITIVE_DEFINITE]
    assert torch.equal(solution[0], torch.ones(4, 1, dtype=torch.float64)) and solution[1].isnan().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("inverse", ["cholesky", "newton_schulz"])
@pytest.mark.parametrize("extension", [True, False])
def test_non_finite_gram_gives_nan_without_error(bad, inverse, extension, fresh_warnings, monkeypatch):
    if not extension:
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "_fallback_warned", True)
    gram = gaussian_gram((1, 3), 8, torch.float64)
    gram[0, 1, 2, 5] = bad
    summary = torch.randn(1, 3, 8, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solution = solve.landmark_solve(gram, summary, 0.1, inverse, 6)
    assert solution[0, 1].isnan().all()
    expected = reference.landmark_solve(gram[:, [0, 2]], summary[:, [0, 2]], 0.1, inverse, 6)
    assert max_error(solution[:, [0, 2]], expected) <= 1e-10


@pytest.mark.parametrize("inverse", ["cholesky", "newton_schulz"])
def test_non_finite_summary_propagates(inverse):
    gram = gaussian_gram((2,), 5, torch.float64)
    summary = torch.randn(2, 5, 3, dtype=torch.float64)
    summary[1, 2, 0] = float("nan")
    solution = solve.landmark_solve(gram, summary, 0.1, inverse, 6)
    assert solution[1, :, 0].isnan().all() and torch.isfinite(solution[0]).all()


# ---- the PyTorch fallback -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("inverse", ["cholesky", "newton_schulz"])
def test_fallback_matches_extension_with_gradients(inverse, monkeypatch):
    gram = gaussian_gram((2, 2), 9, torch.float64)
    summary = torch.randn(2, 2, 9, 4, dtype=torch.float64)
    monkeypatch.setattr(_extension, "_fallback_warned", True)
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setattr(_extension, "_C", None)
        g, z = gram.clone().requires_grad_(), summary.clone().requires_grad_()
        out = solve.landmark_solve(g, z, 0.1, inverse, 6)
        out.sin().sum().backward()
        results.append((out, g.grad, z.grad))
    for ext_value, fallback_value in zip(*results):
        assert max_error(ext_value, fallback_value) <= 1e-12 * max(ext_value.abs().max().item(), 1.0)


def test_missing_extension_warns_once(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_extension, "_fallback_warned", False)
    gram = gaussian_gram((1, 1), 4, torch.float64)
    summary = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="extension is not available .*simulated") as record:
        solve.landmark_solve(gram, summary, 0.1, "cholesky", 6)
        solve.landmark_solve(gram, summary, 0.1, "newton_schulz", 6)
    assert len(record) == 1
    info = _extension.build_info()
    assert info["extension_loaded"] is False and info["load_error"] == "ImportError: simulated"


@pytest.mark.parametrize("inverse", ["cholesky", "newton_schulz"])
def test_ops_trace_under_torch_compile(inverse):
    """fullgraph compile (aot_eager: fake kernels + registered autograd) of each op, forward and backward."""
    def solve_op(gram, summary):
        if inverse == "cholesky":
            return torch.ops.skyformer.cholesky_solve(gram, summary, 0.1)[0]
        return torch.ops.skyformer.newton_schulz_solve(gram, summary, 0.1, 6)

    gram = gaussian_gram((2, 3), 8, torch.float64)
    summary = torch.randn(2, 3, 8, 4, dtype=torch.float64)
    compiled = torch.compile(solve_op, backend="aot_eager", fullgraph=True)
    outputs = []
    for fn in (solve_op, compiled):
        g, z = gram.clone().requires_grad_(), summary.clone().requires_grad_()
        out = fn(g, z)
        out.square().sum().backward()
        outputs.append((out, g.grad, z.grad))
    for eager, traced in zip(*outputs):
        assert torch.equal(eager, traced)
