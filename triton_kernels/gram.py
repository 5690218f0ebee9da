"""Stage 1, landmark Gram: M = kappa(L, L) in float32 (reference: skyformer_ext.reference.landmark_gram).

L is (batch, heads, m, p), raw landmark rows in the input dtype; M is (batch, heads, m, m). Backward:
dL = scale * (H L - L * rowsum(H)) with H = (dM + dM^T) * M, recomputing the kappa tiles.
"""

from __future__ import annotations

import torch

from .gaussian_tiles import landmark_gram_bwd, landmark_gram_fwd


def forward(landmarks: torch.Tensor, scale: float) -> torch.Tensor:
    return landmark_gram_fwd(landmarks, scale)


def backward(grad_gram: torch.Tensor, landmarks: torch.Tensor, scale: float) -> torch.Tensor:
    return landmark_gram_bwd(grad_gram, landmarks, scale)
