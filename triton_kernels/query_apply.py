"""Stage 4, query apply: O = kappa(Q, L) Y (reference: skyformer_ext.reference.query_apply).

O = GA(Q, L, Y): one pass over query tiles, each streaming the m landmarks; Y (the solved landmark values)
comes from the landmark solve in q's dtype, O is in q's dtype. Backward: dQ from the row kernel (a program
per query tile), dL and dY from the key kernel (a program per landmark tile, the n queries split into ranges)
as float32 partial sums that their consumers add on load: dY in the landmark solve's backward, dL in the
landmark gradient scatter (deterministic=False: the splits add atomically into one slice). Packed sequences
(query_seqs): q and O (total_q, H, p / pv), batch row s of L and Y pairing with sequence s.
"""

from __future__ import annotations

from .gaussian_tiles import Sequences, gaussian_attention_bwd, gaussian_attention_fwd


def forward(q, landmarks, landmark_values, scale: float, query_seqs: Sequences | None = None):
    return gaussian_attention_fwd(q, landmarks, landmark_values, None, scale, q.dtype, x_seqs=query_seqs)[0]


def backward(grad_out, q, landmarks, landmark_values, scale: float, deterministic: bool = True,
             query_seqs: Sequences | None = None):
    """(dq, dL partials, dY partials)."""
    grad_q, grad_landmarks, grad_values = gaussian_attention_bwd(grad_out, q, landmarks, landmark_values, None,
                                                                 scale, deterministic=deterministic,
                                                                 x_seqs=query_seqs)
    return grad_q[0], grad_landmarks, grad_values
