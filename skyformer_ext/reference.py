"""Plain, readable PyTorch versions of Kernelized Attention and Skyformer.

This is the yardstick every fast path is tested against. It materialises whatever it needs (the n_q x n_k
score matrix for kernelized attention, the n x m kernel blocks for Skyformer), computes in the dtype of its
inputs (use float64 for ground truth) and is autograd-differentiable. Only the m x m landmark solve runs
in at least float32, because torch.linalg has no half-precision solvers.

Notation (see shared/skyformer-math.md): scale has the SDPA meaning, the kernel is
kappa(a, b) = exp(-scale * |a - b|^2 / 2) on raw (unscaled) rows, i.e. exp(-|a^ - b^|^2 / 2) with
a^ = sqrt(scale) * a.
"""

from __future__ import annotations

import torch

from . import _checks

__all__ = [
    "gaussian_kernel", "kernelized_attention", "landmark_gram", "key_summary", "query_apply",
    "newton_schulz_inverse", "landmark_solve", "refine_landmarks", "skyformer_attention",
]


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """kappa(a_i, b_j) for all pairs: (..., n, p) x (..., m, p) -> (..., n, m)."""
    squared_distance = ((a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :]
                        - 2 * a @ b.transpose(-1, -2))
    return torch.exp(-0.5 * scale * squared_distance.clamp_min(0))


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // t.shape[1]
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def _drop_padded_keys(attn_mask, *tensors):
    """k, v (batch, heads, n_k, d) with padded rows set to 0 (not multiplied by 0: NaN or Inf stored under
    padding must not reach any output or gradient)."""
    if attn_mask is None:
        return tensors
    padded = ~attn_mask[:, None, :, None]
    return tuple(t.masked_fill(padded, 0.0) for t in tensors)


def kernelized_attention(q, k, v, *, attn_mask=None, scale=None) -> torch.Tensor:
    """Exact KA(Q, K, V) = kappa(Q, K) V with padded keys contributing nothing. O(n_q * n_k) memory."""
    _checks.check_qkv(q, k, v)
    _checks.check_key_mask(attn_mask, q.shape[0], k.shape[2], q.device)
    _checks.check_scale(scale)
    scale = _checks.default_scale(scale, q.shape[-1])
    k, v = _drop_padded_keys(attn_mask, _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1]))
    scores = gaussian_kernel(q, k, scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask[:, None, None, :], 0.0)
    return scores @ v


# ---- Skyformer, one function per stage -------------------------------------------------------------------

def landmark_points(q, k, attn_mask=None):
    """(points, valid): the rows of X = [Q; K] per q-head, (batch, heads, n_q + n_k, p), and which of them
    take part in landmark refinement, (batch, n_q + n_k) bool: valid keys; queries too, except padded ones in
    self-attention with a mask (n_q == n_k, as the sampler treats them); none in a batch row with no valid key
    (its landmarks stay zero rows). Excluded rows are set to 0 (not multiplied: padding may hold NaN)."""
    batch, heads, n_q, _ = q.shape
    points = torch.cat([q, _repeat_kv(k, heads)], dim=2)
    if attn_mask is None:
        return points, torch.ones(batch, points.shape[2], dtype=torch.bool, device=q.device)
    query_valid = attn_mask if n_q == k.shape[2] else torch.ones(batch, n_q, dtype=torch.bool, device=q.device)
    valid = torch.cat([query_valid, attn_mask], dim=1) & attn_mask.any(1, keepdim=True)
    return points.masked_fill(~valid[:, None, :, None], 0.0), valid


def refine_landmarks(q, k, landmarks, steps: int, attn_mask=None) -> torch.Tensor:
    """``steps`` Lloyd (k-means) steps from the seed landmarks (batch, heads, m, p), per (batch, q-head).

    A step assigns every valid row of [Q; K] (see landmark_points) to its nearest landmark (squared Euclidean
    distance, computed pair by pair; ties go to the lower landmark index) and moves each landmark to the mean
    of its rows; a landmark with no rows stays where it is. Nearest in the raw rows is nearest in the kernel's
    scaled space (one common factor), and means commute with the scaling, so no scale is needed. Gradients
    flow through the means (each row gets dL_j / count_j of its landmark j) and through landmarks that did not
    move; the assignment is piecewise constant. A NaN or Inf in a valid row reaches every landmark of its
    (batch, head): the sums below are one-hot products (0 * NaN = NaN), as in every backend.
    """
    points, valid = landmark_points(q, k, attn_mask)
    membership_mask = valid[:, None, :, None].to(points.dtype)
    for _ in range(steps):
        wide = _checks.compute_dtype(points.dtype)
        distance = torch.cdist(points.detach().to(wide), landmarks.detach().to(wide),
                               compute_mode="donot_use_mm_for_euclid_dist")
        # The first minimum: ties go to the lower index; NaN (a seed or row holding NaN) counts as +inf.
        nearest = torch.where(distance.isnan(), torch.inf, distance).argmin(-1)
        membership = torch.nn.functional.one_hot(nearest, landmarks.shape[2]).to(points.dtype) * membership_mask
        counts = membership.sum(2)[..., None]
        means = membership.transpose(-1, -2) @ points / counts.clamp_min(1)
        landmarks = torch.where(counts > 0, means, landmarks)
    return landmarks


def landmark_gram(landmarks: torch.Tensor, scale: float) -> torch.Tensor:
    """M = kappa(L, L): (batch, heads, m, p) -> (batch, heads, m, m)."""
    return gaussian_kernel(landmarks, landmarks, scale)


def key_summary(k, v, landmarks, attn_mask, scale: float) -> torch.Tensor:
    """Z = kappa(K, L)^T V over valid keys: (batch, heads, m, p_v). k, v may have fewer (kv) heads."""
    heads = landmarks.shape[1]
    k, v = _drop_padded_keys(attn_mask, _repeat_kv(k, heads), _repeat_kv(v, heads))
    key_block = gaussian_kernel(k, landmarks, scale)
    if attn_mask is not None:
        key_block = key_block.masked_fill(~attn_mask[:, None, :, None], 0.0)
    return key_block.transpose(-1, -2) @ v


def query_apply(q, landmarks, landmark_values, scale: float) -> torch.Tensor:
    """O = kappa(Q, L) Y: (batch, heads, n_q, p_v)."""
    return gaussian_kernel(q, landmarks, scale) @ landmark_values


def newton_schulz_inverse(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """The paper's approximate inverse of an SPD matrix (per matrix of a batch).

    D = diag(rowsum)^-1/2, N = D M D, V0 = N^T / max_j colsum_j(N), then
    V <- V (13I - NV(15I - NV(7I - NV))) / 4, and W = D V D.
    """
    d = matrix.sum(-1).rsqrt()
    normalized = d[..., :, None] * matrix * d[..., None, :]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    approx = normalized.transpose(-1, -2) / normalized.sum(-2).amax(-1)[..., None, None]
    for _ in range(iterations):
        nv = normalized @ approx
        approx = 0.25 * approx @ (13 * eye - nv @ (15 * eye - nv @ (7 * eye - nv)))
    return d[..., :, None] * approx * d[..., None, :]


def landmark_solve(gram, summary, ridge: float, inverse: str, ns_iters: int) -> torch.Tensor:
    """Y = W Z with W = (M + ridge I)^-1 (exact, "cholesky") or its Newton-Schulz approximation."""
    solve_dtype = _checks.compute_dtype(gram.dtype)
    regularized = gram.to(solve_dtype) + ridge * torch.eye(gram.shape[-1], dtype=solve_dtype, device=gram.device)
    summary = summary.to(solve_dtype)
    if inverse == "cholesky":
        result = torch.linalg.solve(regularized, summary)
    else:
        result = newton_schulz_inverse(regularized, ns_iters) @ summary
    return result.to(gram.dtype)


def skyformer_attention(q, k, v, landmark_indices, *, attn_mask=None, ridge=0.1, inverse="newton_schulz",
                        ns_iters=6, scale=None, landmark_refine=0) -> torch.Tensor:
    """Skyformer with explicit landmarks: O = A W B^T V, A = kappa(Q, L), B = kappa(K, L) (padded rows 0).
    The seeds L = X[landmark_indices] move by ``landmark_refine`` Lloyd steps first (refine_landmarks)."""
    _checks.check_qkv(q, k, v)
    _checks.check_key_mask(attn_mask, q.shape[0], k.shape[2], q.device)
    _checks.check_landmark_indices(landmark_indices, q.shape[0], q.shape[2] + k.shape[2], q.device)
    _checks.check_ridge(ridge)
    _checks.check_choice("inverse", inverse, _checks.INVERSES)
    _checks.check_positive_int("ns_iters", ns_iters, 1)
    _checks.check_scale(scale)
    _checks.check_positive_int("landmark_refine", landmark_refine, 0)
    scale = _checks.default_scale(scale, q.shape[-1])

    heads = q.shape[1]
    rows = torch.cat([q, _repeat_kv(k, heads)], dim=2)  # X = [Q; K] per q-head
    index = landmark_indices.long()[:, None, :, None].expand(-1, heads, -1, q.shape[-1])
    landmarks = rows.gather(2, index)
    if attn_mask is not None:  # a batch row with no valid key: zero landmarks (its output is zero anyway)
        landmarks = landmarks.masked_fill(~attn_mask.any(1)[:, None, None, None], 0.0)
    landmarks = refine_landmarks(q, k, landmarks, landmark_refine, attn_mask)

    gram = landmark_gram(landmarks, scale)
    summary = key_summary(k, v, landmarks, attn_mask, scale)
    values = landmark_solve(gram, summary, ridge, inverse, ns_iters)
    return query_apply(q, landmarks, values, scale)
