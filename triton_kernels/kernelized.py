"""Exact Kernelized Attention KA(Q, K, V) = kappa(Q, K) V, FlashAttention-style, O(n) memory
(reference: skyformer_ext.reference.kernelized_attention).

KA = GA(Q, K, V, key_mask): each program owns a query tile and streams key/value tiles; kappa <= 1, so the
accumulator needs no running max or rescaling. Backward recomputes the kappa tiles: dQ in a program per query
tile, dK and dV in a program per key tile that visits every query head of its GQA group.
"""

from __future__ import annotations

from .gaussian_tiles import gaussian_attention_bwd, gaussian_attention_fwd, reduce_splits


def forward(q, k, v, key_mask, scale: float):
    return gaussian_attention_fwd(q, k, v, key_mask, scale, q.dtype)[0]


def backward(grad_out, q, k, v, key_mask, scale: float, deterministic: bool = True):
    """(dq, dk, dv); dk and dv split over the query rows when the key tiles alone are too few programs."""
    grad_q, grad_k, grad_v = gaussian_attention_bwd(grad_out, q, k, v, key_mask, scale,
                                                    deterministic=deterministic)
    return grad_q[0], reduce_splits(grad_k, k.dtype), reduce_splits(grad_v, v.dtype)
