"""Exact Kernelized Attention KA(Q, K, V) = kappa(Q, K) V, FlashAttention-style, O(n) memory
(reference: skyformer_ext.reference.kernelized_attention).

KA = GA(Q, K, V, key_mask): each program owns a query tile and streams key/value tiles; kappa <= 1, so the
accumulator needs no running max or rescaling. Backward recomputes the kappa tiles: dQ in a program per query
tile, dK and dV in a program per key tile that visits every query head of its GQA group. Packed sequences
(query_seqs, key_seqs): q (total_q, H, p), k, v (total_k, Hk, p / pv); query sequence s attends to key
sequence s only.
"""

from __future__ import annotations

from .gaussian_tiles import Sequences, gaussian_attention_bwd, gaussian_attention_fwd, reduce_splits


def forward(q, k, v, key_mask, scale: float, query_seqs: Sequences | None = None,
            key_seqs: Sequences | None = None):
    return gaussian_attention_fwd(q, k, v, key_mask, scale, q.dtype, x_seqs=query_seqs, y_seqs=key_seqs)[0]


def backward(grad_out, q, k, v, key_mask, scale: float, deterministic: bool = True,
             query_seqs: Sequences | None = None, key_seqs: Sequences | None = None):
    """(dq, dk, dv); dk and dv split over the query rows when the key tiles alone are too few programs."""
    grad_q, grad_k, grad_v = gaussian_attention_bwd(grad_out, q, k, v, key_mask, scale,
                                                    deterministic=deterministic, x_seqs=query_seqs,
                                                    y_seqs=key_seqs)
    return grad_q[0], reduce_splits(grad_k, k.dtype), reduce_splits(grad_v, v.dtype)
