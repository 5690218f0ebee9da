"""Landmark solve stage: Y = W Z with W = (M + ridge I)^-1 or its Newton-Schulz approximation.

M is (batch, heads, m, m) and Z (batch, heads, m, p_v), both in the compute dtype (float32 or float64).
This module is the single entry point the backends call; it is differentiable in M and Z.
"""

from __future__ import annotations

import torch

from . import reference


def landmark_solve(gram: torch.Tensor, summary: torch.Tensor, ridge: float, inverse: str,
                   ns_iters: int) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    regularized = gram + ridge * eye
    if inverse == "cholesky":
        factor = torch.linalg.cholesky(regularized)
        return torch.cholesky_solve(summary, factor)
    return reference.newton_schulz_inverse(regularized, ns_iters) @ summary
