"""The materialising Skyformer baseline: Skyformer computed the way the paper's official code computes it.

Our own transcription of the computation in the official implementation (pkuzengqi/Skyformer,
src/models/attention_skyformer.py), for the benchmark's "naive" column:

1. scale q and k by s = sqrt(scale) and concatenate the rows, X = [q^; k^]  (batch, heads, n_q + n_k, p);
2. gather the landmark rows L = X[idx];
3. build the whole kernel block kappa(X, L) = exp(X L^T - |X|^2/2 - |L|^2/2) by broadcasting the two norm
   terms against the product, (batch, heads, n_q + n_k, m);
4. slice it into A = kappa(Q^, L) and B = kappa(K^, L); take the Gram matrix M = kappa(L, L) from the
   block's landmark rows;
5. M + 0.1 I, D-normalise (D = diag(rowsum)^-1/2), Newton-Schulz inverse (6 iterations, initialised per
   matrix), then B D W D, zero the rows of padded keys;
6. context = (B D W D)^T v, out = A context.

Differences from the official code, all in the baseline's favour or neutral: its landmark block carries an
"accumulation" axis of size 1 that is summed against a tensor of ones (a no-op pass over the block, left
out here); its Newton-Schulz start uses one maximum over the whole batch (here per matrix, as in our
implementation, so that the two agree to rounding); the m x m solve runs in at least float32 (half-precision
Newton-Schulz is unusable). Everything of size n x m is computed in the input dtype, like the original.
"""

from __future__ import annotations

import torch


def _newton_schulz(normalized: torch.Tensor, iterations: int) -> torch.Tensor:
    eye = torch.eye(normalized.shape[-1], dtype=normalized.dtype, device=normalized.device)
    approx = normalized.transpose(-1, -2) / normalized.sum(-2).amax(-1)[..., None, None]
    for _ in range(iterations):
        product = normalized @ approx
        approx = 0.25 * approx @ (13 * eye - product @ (15 * eye - product @ (7 * eye - product)))
    return approx


def naive_skyformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmark_indices: torch.Tensor,
                              *, attn_mask: torch.Tensor | None = None, ridge: float = 0.1, ns_iters: int = 6,
                              scale: float | None = None) -> torch.Tensor:
    """Skyformer with explicit landmarks, materialising the (batch, heads, n_q + n_k, m) kernel block.

    Same conventions as ``skyformer_ext.skyformer_attention``: q (b, H, n_q, p), k/v (b, Hk, n_k, p/p_v),
    landmark_indices (b, m) rows of [q; k], attn_mask (b, n_k) bool with True = key takes part, ``scale``
    with the SDPA meaning (default p^-1/2). Returns (b, H, n_q, p_v) in q's dtype.
    """
    batch, heads, n_q, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    group = heads // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    root_scale = scale ** 0.5
    rows = torch.cat([q * root_scale, k * root_scale], dim=2)
    num_landmarks = landmark_indices.shape[1]
    row_index = landmark_indices.long()[:, None, :, None]
    landmarks = rows.gather(2, row_index.expand(batch, heads, num_landmarks, head_dim))

    half_sq_rows = 0.5 * (rows * rows).sum(-1)
    half_sq_landmarks = 0.5 * (landmarks * landmarks).sum(-1)
    block = torch.exp(rows @ landmarks.transpose(-1, -2) - half_sq_rows[..., :, None]
                      - half_sq_landmarks[..., None, :])
    query_block, key_block = block[:, :, :n_q], block[:, :, n_q:]

    solve_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    gram = block.gather(2, row_index.expand(batch, heads, num_landmarks, num_landmarks)).to(solve_dtype)
    gram = gram + ridge * torch.eye(num_landmarks, dtype=solve_dtype, device=q.device)
    d = gram.sum(-1).rsqrt()
    inverse = _newton_schulz(d[..., :, None] * gram * d[..., None, :], ns_iters)

    d_block = d.to(block.dtype)[..., None, :]
    key_weights = ((key_block * d_block) @ inverse.to(block.dtype)) * d_block
    if attn_mask is not None:
        key_weights = key_weights * attn_mask[:, None, :, None].to(key_weights.dtype)
    context = key_weights.transpose(-1, -2) @ v
    return query_block @ context
