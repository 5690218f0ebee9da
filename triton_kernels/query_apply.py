"""Stage 4, query apply: O = kappa(Q, L) Y (reference: skyformer_ext.reference.query_apply).

O = GA(Q, L, Y): one pass over query tiles, each streaming the m landmarks; Y (the solved landmark values)
comes from the landmark solve in q's dtype, O is in q's dtype. Backward: dQ from the row kernel (a program
per query tile), dL and dY from the key kernel (a program per landmark tile, the n queries split into ranges)
as float32 partial sums that their consumers add on load: dY in the landmark solve's backward, dL in the
landmark gradient scatter (deterministic=False: the splits add atomically into one slice).
"""

from __future__ import annotations

from .gaussian_tiles import gaussian_attention_bwd, gaussian_attention_fwd


def forward(q, landmarks, landmark_values, scale: float):
    return gaussian_attention_fwd(q, landmarks, landmark_values, None, scale, q.dtype)[0]


def backward(grad_out, q, landmarks, landmark_values, scale: float, deterministic: bool = True):
    """(dq, dL partials, dY partials)."""
    grad_q, grad_landmarks, grad_values = gaussian_attention_bwd(grad_out, q, landmarks, landmark_values, None,
                                                                 scale, deterministic=deterministic)
    return grad_q[0], grad_landmarks, grad_values
