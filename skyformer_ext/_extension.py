"""Loads the compiled landmark-solve extension ``skyformer_ext._C`` and completes its operators.

Importing ``_C`` registers ``torch.ops.skyformer.*`` (CPU and, in CUDA builds, CUDA kernels). This module
adds what torch.compile and autograd need, from Python: fake (meta) kernels and the backward formulas.
When the extension is missing the package still imports; :func:`warn_fallback_once` tells the user, and
``skyformer_ext.solve`` runs its PyTorch implementation with the same semantics.

Operators (gram (..., m, m), summary/rhs (..., m, p), float32 or float64, equal leading dims):
    cholesky_solve(gram, summary, ridge) -> (solution, factor, status)
        Y = (sym(M) + ridge I)^-1 Z, sym(M) = (M + M^T) / 2, by Cholesky; factor = the lower factor of the
        matrix actually solved; status int32 per matrix: 0..3 jitter escalations used, 4 = not positive
        definite even so, -1 = non-finite gram (solution NaN). Differentiable in gram and summary:
        dZ = (L L^T)^-1 dY with the saved factor, dM = -sym(dZ Y^T) (the exact derivative of the op, which
        reads only sym(M); for symmetric M it equals -dZ Y^T projected on symmetric matrices).
    cholesky_solve_generic(...)  the same on ATen's LAPACK/cuSOLVER Cholesky (CUDA path for m > 256)
    cholesky_solve_factored(factor, rhs) -> (L L^T)^-1 rhs
    newton_schulz_solve(gram, summary, ridge, iters) -> W Z with the paper's iteration; its backward
        differentiates through the iteration exactly (newton_schulz_solve_backward), so gradients equal
        autograd of reference.newton_schulz_inverse even when the iteration has not converged.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from ._amp import without_autocast
from ._autograd import first_order_only

try:
    _C = importlib.import_module(f"{__package__}._C")
    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"

_fallback_warned = False


def available() -> bool:
    """True when the compiled operators are registered."""
    return _C is not None


def warn_fallback_once() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"skyformer_ext: the compiled landmark-solve extension is not available ({LOAD_ERROR}); "
                      "using the PyTorch implementation (same results, slower). Reinstall with "
                      "`pip install --no-build-isolation .` to build it.", RuntimeWarning, stacklevel=3)


def _arch_names(arch_list: str) -> list[str]:
    """nvcc's __CUDA_ARCH_LIST__ ("800,900") -> ["8.0", "9.0"]."""
    names = []
    for token in arch_list.split(","):
        token = token.strip()
        if token.isdigit():
            value = int(token)
            names.append(f"{value // 100}.{value % 100 // 10}")
    return names


def build_info() -> dict:
    """How the landmark-solve extension was built.

    Returns a dict: ``extension_loaded`` (bool), ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs``
    (e.g. ["8.0", "9.0"], from nvcc's own arch list), ``cuda_version`` (e.g. "13.0" or None), and
    ``load_error`` (why the extension is missing, or None).
    """
    if _C is None:
        return {"extension_loaded": False, "cuda": False, "cuda_archs": [], "cuda_version": None,
                "load_error": LOAD_ERROR}
    raw = _C.build_info()
    version = raw["cuda_version"]
    return {"extension_loaded": True, "cuda": bool(raw["cuda"]), "cuda_archs": _arch_names(raw["cuda_archs"]),
            "cuda_version": f"{version // 1000}.{version % 1000 // 10}" if version else None, "load_error": None}


# ---- fake kernels and autograd -----------------------------------------------------------------------------
# The backwards run without autocast (skyformer_ext._amp) and have no derivative of their own (_autograd).

def _fake_cholesky_solve(gram, summary, ridge):
    return (summary.new_empty(summary.shape), gram.new_empty(gram.shape),
            gram.new_empty(gram.shape[:-2], dtype=torch.int32))


def _setup_cholesky_solve(ctx, inputs, output):
    solution, factor, status = output
    ctx.save_for_backward(factor, solution)
    ctx.mark_non_differentiable(factor, status)


def _backward_cholesky_solve(ctx, grad_solution, _grad_factor, _grad_status):
    factor, solution = ctx.saved_tensors
    with torch.no_grad(), without_autocast(grad_solution.device):
        grad_summary = torch.ops.skyformer.cholesky_solve_factored(factor, grad_solution)
        outer = grad_summary @ solution.transpose(-1, -2)
        grads = (-0.5 * (outer + outer.transpose(-1, -2)), grad_summary)
    return *first_order_only("torch", grads, (grad_solution, *ctx.saved_tensors)), None


def _fake_cholesky_solve_factored(factor, rhs):
    return rhs.new_empty(rhs.shape)


def _fake_newton_schulz_solve(gram, summary, ridge, iters):
    return summary.new_empty(summary.shape)


def _setup_newton_schulz_solve(ctx, inputs, output):
    gram, summary, ridge, iters = inputs
    ctx.save_for_backward(gram, summary)
    ctx.ridge, ctx.iters = ridge, iters


def _backward_newton_schulz_solve(ctx, grad_solution):
    gram, summary = ctx.saved_tensors
    with torch.no_grad(), without_autocast(grad_solution.device):
        grads = torch.ops.skyformer.newton_schulz_solve_backward(grad_solution, gram, summary, ctx.ridge, ctx.iters)
    return *first_order_only("torch", grads, (grad_solution, gram, summary)), None, None


def _fake_newton_schulz_solve_backward(grad_solution, gram, summary, ridge, iters):
    return gram.new_empty(gram.shape), summary.new_empty(summary.shape)


if _C is not None:
    for _name in ("skyformer::cholesky_solve", "skyformer::cholesky_solve_generic"):
        torch.library.register_fake(_name)(_fake_cholesky_solve)
        torch.library.register_autograd(_name, _backward_cholesky_solve, setup_context=_setup_cholesky_solve)
    torch.library.register_fake("skyformer::cholesky_solve_factored")(_fake_cholesky_solve_factored)
    torch.library.register_fake("skyformer::newton_schulz_solve")(_fake_newton_schulz_solve)
    torch.library.register_autograd("skyformer::newton_schulz_solve", _backward_newton_schulz_solve,
                                    setup_context=_setup_newton_schulz_solve)
    torch.library.register_fake("skyformer::newton_schulz_solve_backward")(_fake_newton_schulz_solve_backward)
