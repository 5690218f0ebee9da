"""The CUDA kernels (one block per matrix, shared memory; ATen/cuSOLVER beyond m = 256) against the CPU op.

Runs only where a CUDA device is visible; on the CPU-only CI the CUDA code is compile-checked by the build
(tests/test_extension_build.py).
"""

import pytest
import torch

from skyformer_ext import reference, solve

from conftest import max_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_OPS = ("cholesky_solve", "cholesky_solve_generic")


def _gram(batch, m, dtype, device, scale=3.0 / 16):
    landmarks = torch.randn(batch, m, 16, dtype=torch.float64)
    return reference.landmark_gram(landmarks, scale).to(dtype=dtype, device=device)


def _poison_cached_blocks(*like):
    """Frees NaN-filled blocks of the outputs' sizes so the caching allocator hands them to the op next:
    an element the kernel forgets to write then shows up as NaN."""
    blocks = [torch.full_like(t, float("nan")) for t in like]
    del blocks


@pytest.mark.parametrize("op_name", CUDA_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 31, 64, 128, 200, 256, 257])
@pytest.mark.parametrize("p", [1, 64, 200])
def test_cuda_cholesky_matches_cpu(op_name, dtype, m, p):
    op = getattr(torch.ops.skyformer, op_name)
    gram = _gram(6, m, dtype, "cpu")
    summary = torch.randn(6, m, p, dtype=dtype)
    expected, expected_factor, expected_status = torch.ops.skyformer.cholesky_solve(gram, summary, 0.1)
    gram_cuda, summary_cuda = gram.cuda(), summary.cuda()
    _poison_cached_blocks(summary_cuda, gram_cuda)
    solution, factor, status = op(gram_cuda, summary_cuda, 0.1)
    torch.cuda.synchronize()
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.equal(status.cpu(), expected_status)
    assert max_error(solution.cpu(), expected) <= tolerance * expected.abs().max().item()
    assert max_error(factor.cpu(), expected_factor) <= tolerance
    assert (factor.cpu().triu(1) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [5, 128, 256, 300])
def test_cuda_factored_solve_and_gradients(dtype, m):
    gram = _gram(3, m, dtype, "cuda")
    summary = torch.randn(3, m, 40, dtype=dtype, device="cuda")
    upstream = torch.randn_like(summary)
    grads = []
    for device in ("cuda", "cpu"):
        g = gram.to(device).clone().requires_grad_()
        z = summary.to(device).clone().requires_grad_()
        (torch.ops.skyformer.cholesky_solve(g, z, 0.1)[0] * upstream.to(device)).sum().backward()
        grads.append((g.grad.cpu(), z.grad.cpu()))
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    for cuda_grad, cpu_grad in zip(*grads):
        assert max_error(cuda_grad, cpu_grad) <= tolerance * cpu_grad.abs().max().item()


def test_cuda_failure_policy_and_nan():
    landmarks = torch.randn(4, 12, 8, dtype=torch.float64)
    landmarks[:, 1] = landmarks[:, 0]
    gram = reference.landmark_gram(landmarks, 0.25)
    gram[2, 3, 3] = float("nan")
    gram[3] = -torch.eye(12, dtype=torch.float64)
    summary = torch.randn(4, 12, 3, dtype=torch.float64)
    cpu_status = torch.ops.skyformer.cholesky_solve(gram, summary, 0.0)[2]
    assert cpu_status.tolist() == [1, 1, solve.NON_FINITE, solve.NOT_POSITIVE_DEFINITE]
    for op_name in CUDA_OPS:
        solution, _, status = getattr(torch.ops.skyformer, op_name)(gram.cuda(), summary.cuda(), 0.0)
        solution, status = solution.cpu(), status.cpu()
        assert torch.equal(status, cpu_status)
        assert solution[2:].isnan().all() and torch.isfinite(solution[:2]).all()
        # The jittered systems have cond ~ 1/tau, so compare residuals, not solutions.
        eps = torch.finfo(torch.float64).eps
        regularized = gram[:2] + 12 * eps * solve.JITTER_GROWTH * torch.eye(12, dtype=torch.float64)
        residual = (regularized @ solution[:2] - summary[:2]).abs().max().item()
        assert residual <= 12 * eps * regularized.abs().sum(-1).max().item() * solution[:2].abs().max().item()


def test_cuda_non_contiguous_and_current_stream():
    m = 96
    big = _gram(4, 2 * m, torch.float32, "cuda")
    gram = big[:, ::2, ::2]
    summary = torch.randn(4, 33, m, device="cuda").transpose(-1, -2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        solution, _, _ = torch.ops.skyformer.cholesky_solve(gram, summary, 0.1)
        expected, _, _ = torch.ops.skyformer.cholesky_solve(gram.contiguous(), summary.contiguous(), 0.1)
    stream.synchronize()
    assert torch.equal(solution, expected)


@pytest.mark.parametrize("inverse", ["cholesky", "newton_schulz"])
def test_cuda_landmark_solve_matches_reference(inverse):
    gram = _gram(8, 128, torch.float64, "cuda", scale=1.0 / 16).view(2, 4, 128, 128)
    summary = torch.randn(2, 4, 128, 64, dtype=torch.float64, device="cuda")
    expected = reference.landmark_solve(gram, summary, 0.1, inverse, 6)
    actual = solve.landmark_solve(gram, summary, 0.1, inverse, 6)
    assert max_error(actual, expected) <= 1e-9 * expected.abs().max().item()


def test_cuda_opcheck():
    gram = _gram(3, 8, torch.float32, "cuda").requires_grad_()
    summary = torch.randn(3, 8, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.skyformer.cholesky_solve.default, (gram, summary, 0.1))
    torch.library.opcheck(torch.ops.skyformer.newton_schulz_solve.default, (gram, summary, 0.1, 6))
    factor = torch.linalg.cholesky(gram.detach() + 0.1 * torch.eye(8, device="cuda"))
    torch.library.opcheck(torch.ops.skyformer.cholesky_solve_factored.default, (factor, summary.detach()))
