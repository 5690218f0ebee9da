"""Stage 3, query apply: O = kappa(Q, L) Y (reference: skyformer_ext.reference.query_apply).

O = GA(Q, L, Y): one pass over query tiles, each streaming the m landmarks. Y (the solved landmark values,
float32) is read in float32 and multiplied in q's dtype; O is in q's dtype. Backward: dQ from the row kernel
(a program per query tile), dL and dY from the key kernel (a program per landmark tile, the n queries split
into ranges with a fixed-order reduction of the partial sums, or atomic adds when deterministic=False).
"""

from __future__ import annotations

from .gaussian_tiles import gaussian_attention_bwd, gaussian_attention_fwd


def forward(q, landmarks, landmark_values, scale: float):
    return gaussian_attention_fwd(q, landmarks, landmark_values, None, scale, q.dtype)


def backward(grad_out, q, landmarks, landmark_values, scale: float, deterministic: bool = True):
    """(dq, dL, dY); dY has landmark_values' dtype."""
    return gaussian_attention_bwd(grad_out, q, landmarks, landmark_values, None, scale,
                                  deterministic=deterministic)
