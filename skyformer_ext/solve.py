"""Landmark solve stage: Y = W Z with W = (M + ridge I)^-1 or its Newton-Schulz approximation.

M is (batch, heads, m, m) and Z (batch, heads, m, p_v), both in the compute dtype (float32 or float64).
This module is the single entry point the backends call; it is differentiable in M and Z. It runs the
compiled operators (torch.ops.skyformer.*, see _extension.py) when they are built, else a PyTorch
implementation with identical semantics (warned once).

inverse="cholesky" solves with sym(M) + ridge I, sym(M) = (M + M^T)/2, and never forms an inverse.
Failure policy (identical in every implementation):
- a landmark matrix that is not positive definite in working precision (a Cholesky pivot <= tau, e.g.
  duplicate landmarks with ridge=0) is retried with ridge + tau * 10^s, s = 1, 2, 3, tau = m * eps(dtype) * max_i |M_ii|; the first
  escalation in a process emits one RuntimeWarning;
- if it still fails, torch.linalg.LinAlgError is raised (nothing silently wrong reaches training);
- a gram holding NaN/Inf gives NaN for that matrix's Y (NaN in -> NaN out), without warning or error.
inverse="newton_schulz" is the paper's iteration (reference.newton_schulz_inverse); its gradient is the
exact derivative of the iteration. It has no positive-definiteness check: like the reference, a
non-positive row sum of M + ridge I yields NaN.
"""

from __future__ import annotations

import warnings

import torch

from . import _extension, reference

NON_FINITE = -1
MAX_JITTER_STEPS = 3
NOT_POSITIVE_DEFINITE = MAX_JITTER_STEPS + 1
JITTER_GROWTH = 10.0

_jitter_warned = False


def landmark_solve(gram: torch.Tensor, summary: torch.Tensor, ridge: float, inverse: str,
                   ns_iters: int) -> torch.Tensor:
    if inverse == "cholesky":
        if _extension.available():
            solution, _, status = torch.ops.skyformer.cholesky_solve(gram, summary, float(ridge))
        else:
            _extension.warn_fallback_once()
            solution, status = fallback_cholesky_solve(gram, summary, float(ridge))
        check_cholesky_status(status, ridge)
        return solution
    if _extension.available():
        return torch.ops.skyformer.newton_schulz_solve(gram, summary, float(ridge), int(ns_iters))
    _extension.warn_fallback_once()
    return fallback_newton_schulz_solve(gram, summary, float(ridge), int(ns_iters))


def check_cholesky_status(status: torch.Tensor, ridge: float) -> None:
    """Applies the failure policy to the per-matrix status of a Cholesky solve (one host sync)."""
    global _jitter_warned
    worst = int(status.max()) if status.numel() else 0
    if worst >= NOT_POSITIVE_DEFINITE:
        failed = int((status == NOT_POSITIVE_DEFINITE).sum())
        raise torch.linalg.LinAlgError(
            f"landmark_solve: M + ridge*I (ridge={ridge}) is not positive definite for {failed} of "
            f"{status.numel()} landmark matrices, even after adding jitter up to 10^{MAX_JITTER_STEPS} x "
            f"m * eps * max|diag M|. This happens with duplicate landmarks and ridge=0, or an indefinite gram; "
            f"use ridge > 0 (the paper uses 0.1) or distinct landmarks.")
    if worst > 0 and not _jitter_warned:
        _jitter_warned = True
        escalated = int((status > 0).sum())
        warnings.warn(
            f"landmark_solve: M + ridge*I (ridge={ridge}) was not positive definite in working precision for "
            f"{escalated} of {status.numel()} landmark matrices; solved them with extra diagonal jitter "
            f"(up to 10^{worst} x m * eps * max|diag M|). Duplicate landmarks with ridge=0 cause this; "
            f"this warning is shown once.", RuntimeWarning, stacklevel=3)


# ---- PyTorch implementation (used when the extension is not built; tests compare it to the ops) ----------

def _factor_with_jitter(gram: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor, status) for gram (B, m, m): the failure policy of csrc/landmark_solve.h in torch ops."""
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    non_finite = ~torch.isfinite(gram).flatten(1).all(1)
    diag_scale = gram.diagonal(0, -2, -1).abs().amax(-1)
    diag_scale = torch.where(diag_scale == 0, torch.ones_like(diag_scale), diag_scale)
    tau = m * torch.finfo(gram.dtype).eps * diag_scale
    # Non-finite matrices are factored as the identity; their results become NaN below.
    base = torch.where(non_finite[:, None, None], eye, 0.5 * (gram + gram.transpose(-1, -2)))

    def factor_failed(lower, info):  # a pivot L_jj^2 <= tau counts as a failure, as in the kernels
        return (info != 0) | (lower.diagonal(0, -2, -1).square() <= tau[:, None]).any(-1)

    factor, info = torch.linalg.cholesky_ex(base + ridge * eye)
    status = torch.zeros(gram.shape[0], dtype=torch.int32, device=gram.device)
    failed = factor_failed(factor, info) & ~non_finite
    jitter = 1.0
    for step in range(1, MAX_JITTER_STEPS + 1):
        if not bool(failed.any()):
            break
        jitter *= JITTER_GROWTH
        retry, retry_info = torch.linalg.cholesky_ex(base + (ridge + jitter * tau)[:, None, None] * eye)
        factor = torch.where(failed[:, None, None], retry, factor)
        status = torch.where(failed, torch.full_like(status, step), status)
        failed = failed & factor_failed(retry, retry_info)
    status = torch.where(failed, torch.full_like(status, NOT_POSITIVE_DEFINITE), status)
    status = torch.where(non_finite, torch.full_like(status, NON_FINITE), status)
    factor = torch.where((failed | non_finite)[:, None, None], torch.full_like(factor, float("nan")), factor)
    return factor, status


class _FallbackCholeskySolve(torch.autograd.Function):
    """Y = (sym(M) + ridge I)^-1 Z; backward dZ = (L L^T)^-1 dY with the saved factor, dM = -sym(dZ Y^T)."""

    @staticmethod
    def forward(ctx, gram, summary, ridge):
        m, p = gram.shape[-1], summary.shape[-1]
        factor, status = _factor_with_jitter(gram.reshape(-1, m, m), ridge)
        solution = torch.cholesky_solve(summary.reshape(factor.shape[0], m, p), factor).reshape(summary.shape)
        ctx.save_for_backward(factor, solution)
        ctx.mark_non_differentiable(status)
        return solution, status.reshape(gram.shape[:-2])

    @staticmethod
    def backward(ctx, grad_solution, _grad_status):
        factor, solution = ctx.saved_tensors
        m, p = factor.shape[-1], grad_solution.shape[-1]
        grad_summary = torch.cholesky_solve(grad_solution.reshape(factor.shape[0], m, p), factor)
        grad_summary = grad_summary.reshape(solution.shape)
        outer = grad_summary @ solution.transpose(-1, -2)
        return -0.5 * (outer + outer.transpose(-1, -2)), grad_summary, None


def fallback_cholesky_solve(gram: torch.Tensor, summary: torch.Tensor,
                            ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(solution, status) with the semantics of torch.ops.skyformer.cholesky_solve, in PyTorch."""
    return _FallbackCholeskySolve.apply(gram, summary, ridge)


def fallback_newton_schulz_solve(gram: torch.Tensor, summary: torch.Tensor, ridge: float,
                                 ns_iters: int) -> torch.Tensor:
    """The semantics of torch.ops.skyformer.newton_schulz_solve: autograd through the iteration."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return reference.newton_schulz_inverse(gram + ridge * eye, ns_iters) @ summary
