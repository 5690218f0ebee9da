"""Stage 2, key summary: Z = kappa(K, L)^T V over valid keys (reference: skyformer_ext.reference.key_summary).

By symmetry of kappa, Z = GA(L, K, V, key_mask): the m landmark rows are the "queries" and the n keys are
streamed. m rows give few programs, so the key axis is split; the float32 partial sums are returned as they
are and the landmark solve adds them on load in a fixed order (deterministic=False: the splits add
atomically into one slice). k, v: (b, Hk, n, p / pv) shared by the heads // Hk landmark heads of a GQA group
(head indexing, no copies); L: (b, H, m, p). Packed sequences (key_seqs): k, v (total_k, Hk, p / pv), batch
row s of L pairs with sequence s, no key mask.
"""

from __future__ import annotations

import torch

from .gaussian_tiles import Sequences, gaussian_attention_bwd, gaussian_attention_fwd


def forward(k, v, landmarks, key_mask, scale: float, deterministic: bool = True,
            key_seqs: Sequences | None = None) -> torch.Tensor:
    """(splits, b, H, m, pv) float32 partial sums of Z."""
    return gaussian_attention_fwd(landmarks, k, v, key_mask, scale, torch.float32, split_keys=True,
                                  deterministic=deterministic, y_seqs=key_seqs)


def backward(grad_summary_scaled, grad_summary_factor, k, v, landmarks, key_mask, scale: float,
             deterministic: bool = True, key_seqs: Sequences | None = None):
    """(dk, dv, dL partials). dZ arrives as dZ / f in the input dtype with f (b, H) float32 powers of two
    (dZ can exceed fp16's range); the kernels multiply f back. dk, dv: the m landmark rows are never split,
    so they are written once in k's and v's dtype; dL: (splits, b, H, m, p) float32 partials over key ranges."""
    grad_landmarks, grad_k, grad_v = gaussian_attention_bwd(
        grad_summary_scaled, landmarks, k, v, key_mask, scale, split_keys=True, split_rows=False,
        deterministic=deterministic, grad_factor=grad_summary_factor, y_seqs=key_seqs)
    return grad_k[0], grad_v[0], grad_landmarks
