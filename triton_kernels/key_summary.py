"""Stage 2, key summary: Z = kappa(K, L)^T V over valid keys (reference: skyformer_ext.reference.key_summary).

By symmetry of kappa, Z = GA(L, K, V, key_mask): the m landmark rows are the "queries" and the n keys are
streamed. m rows give few programs, so the key axis is split and the float32 partial sums are added in a
fixed order (deterministic=False: atomically, into one buffer). Z comes back in float32 for the landmark
solve. k, v: (b, Hk, n, p / pv) shared by the heads // Hk landmark heads of a GQA group (head indexing, no
copies); L: (b, H, m, p).
"""

from __future__ import annotations

import torch

from .gaussian_tiles import gaussian_attention_bwd, gaussian_attention_fwd


def forward(k, v, landmarks, key_mask, scale: float, deterministic: bool = True) -> torch.Tensor:
    return gaussian_attention_fwd(landmarks, k, v, key_mask, scale, torch.float32, split_keys=True,
                                  deterministic=deterministic)


def backward(grad_summary, k, v, landmarks, key_mask, scale: float, deterministic: bool = True):
    """(dk, dv, dL). grad_summary (dZ) stays float32 inside the kernels (it may exceed fp16's range)."""
    grad_landmarks, grad_k, grad_v = gaussian_attention_bwd(grad_summary, landmarks, k, v, key_mask, scale,
                                                            split_keys=True, deterministic=deterministic)
    return grad_k, grad_v, grad_landmarks
