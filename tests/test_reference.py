"""The reference against independent float64 transcriptions: the paper's formulas, the official code's
evaluation order, and exact kernelized attention when every row is a landmark."""

import numpy as np
import pytest
import torch

import skyformer_ext as sx
from skyformer_ext import reference


def _gauss_numpy(a, b):
    """exp(-|a_i - b_j|^2 / 2) from explicit differences (no norm expansion)."""
    diff = a[:, None, :] - b[None, :, :]
    return np.exp(-0.5 * (diff * diff).sum(-1))


def _newton_schulz_numpy(m_reg, iterations):
    d = 1.0 / np.sqrt(m_reg.sum(1))
    n = d[:, None] * m_reg * d[None, :]
    v = n.T / n.sum(0).max()
    eye = np.eye(len(n))
    for _ in range(iterations):
        kv = n @ v
        v = 0.25 * v @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    return d[:, None] * v * d[None, :]


def paper_skyformer_numpy(q, k, v, idx, mask, ridge, inverse, iterations, scale):
    """Section 4 of the paper, per (batch, head), in numpy float64."""
    q, k, v = q.numpy(), k.numpy(), v.numpy()
    idx = idx.numpy()
    batch, heads, n_q, _ = q.shape
    group = heads // k.shape[1]
    s = np.sqrt(scale)
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(batch):
        for h in range(heads):
            q_hat, k_hat = s * q[b, h], s * k[b, h // group]
            landmarks = np.concatenate([q_hat, k_hat])[idx[b]]
            a = _gauss_numpy(q_hat, landmarks)
            key_block = _gauss_numpy(k_hat, landmarks)
            if mask is not None:
                key_block[~mask[b].numpy()] = 0.0
            m_reg = _gauss_numpy(landmarks, landmarks) + ridge * np.eye(len(landmarks))
            w = np.linalg.inv(m_reg) if inverse == "cholesky" else _newton_schulz_numpy(m_reg, iterations)
            out[b, h] = a @ w @ key_block.T @ v[b, h // group]
    return torch.from_numpy(out)


@pytest.mark.parametrize("inverse", ["newton_schulz", "cholesky"])
@pytest.mark.parametrize("n_q,n_k,heads,kv_heads", [(97, 97, 2, 2), (33, 51, 4, 2), (1, 17, 3, 1)])
def test_reference_matches_paper_formulas(inverse, n_q, n_k, heads, kv_heads):
    p, p_v, m = 80, 24, 16
    q = torch.randn(2, heads, n_q, p, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n_k, p, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n_k, p_v, dtype=torch.float64)
    mask = torch.rand(2, n_k) > 0.25
    mask[:, 0] = True
    idx = sx.sample_landmarks(2, n_q, n_k, m, attn_mask=mask)
    expected = paper_skyformer_numpy(q, k, v, idx, mask, 0.1, inverse, 6, p ** -0.5)
    actual = reference.skyformer_attention(q, k, v, idx, attn_mask=mask, inverse=inverse)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def official_skyformer_order(q, k, v, mask, idx, iterations=6):
    """How pkuzengqi/Skyformer evaluates it (self-attention, padding at the end of each row): zero padded
    q/k/v rows, scale by p^-1/4, kernel block of all 2n rows against the landmarks, Gram taken from that
    block's landmark rows, D-normalised Newton-Schulz with the per-matrix initialisation, then
    A ((B D) V_ns D)^T v with padded key rows zeroed. Written independently, in float64."""
    n, p = q.shape[2], q.shape[3]
    keep = mask[:, None, :, None].double()
    q_hat, k_hat, v = q * keep * p ** -0.25, k * keep * p ** -0.25, v * keep
    rows = torch.cat([q_hat, k_hat], dim=2)
    landmarks = torch.stack([rows[b][:, idx[b]] for b in range(rows.shape[0])])
    sq_rows = 0.5 * (rows * rows).sum(-1)[..., :, None]
    sq_landmarks = 0.5 * (landmarks * landmarks).sum(-1)[..., None, :]
    block = torch.exp(rows @ landmarks.transpose(-1, -2) - sq_rows - sq_landmarks)
    a, key_block = block[:, :, :n], block[:, :, n:]
    gram = torch.stack([block[b][:, idx[b]] for b in range(block.shape[0])])
    gram = gram + 0.1 * torch.eye(gram.shape[-1], dtype=gram.dtype)
    d = gram.sum(-1).rsqrt()
    normalized = d[..., :, None] * gram * d[..., None, :]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    approx = normalized.transpose(-1, -2) / normalized.sum(-2).amax(-1)[..., None, None]
    for _ in range(iterations):
        kv = normalized @ approx
        approx = (0.25 * approx) @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    key_side = (key_block * d[..., None, :]) @ approx
    key_side = key_side * d[..., None, :] * mask[:, None, :, None]
    return a @ (key_side.transpose(-1, -2) @ v)


def test_matches_official_implementation_order():
    batch, heads, n, p, m = 2, 2, 96, 32, 32
    q, k, v = (torch.randn(batch, heads, n, p, dtype=torch.float64) for _ in range(3))
    valid_lengths = torch.tensor([96, 70])
    mask = torch.arange(n)[None, :] < valid_lengths[:, None]
    # The official sampler: floor(u * n_valid), first half among queries, second half among keys.
    u = torch.rand(m, dtype=torch.float64)
    idx = (valid_lengths[:, None] * u[None, :]).long()
    idx[:, m // 2:] += n
    expected = official_skyformer_order(q, k, v, mask, idx)
    actual = sx.skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="torch")
    for b in range(batch):
        rows = mask[b]
        torch.testing.assert_close(actual[b][:, rows], expected[b][:, rows], rtol=1e-9, atol=1e-12)


def test_all_rows_as_landmarks_is_exact_kernelized_attention():
    # With every row of [Q; K] a landmark and no ridge, A M^-1 B^T = kappa(Q, K) exactly (the Nystrom
    # reconstruction of the lifted PSD matrix is exact); a large scale keeps kappa(X, X) well conditioned.
    n_q, n_k, p = 5, 7, 16
    q = torch.randn(1, 2, n_q, p, dtype=torch.float64)
    k = torch.randn(1, 2, n_k, p, dtype=torch.float64)
    v = torch.randn(1, 2, n_k, 3, dtype=torch.float64)
    idx = torch.arange(n_q + n_k)[None, :]
    scale = 0.25
    exact = reference.kernelized_attention(q, k, v, scale=scale)
    for backend in ("reference", "torch"):
        approx = sx.skyformer_attention(q, k, v, landmark_indices=idx, ridge=1e-12, inverse="cholesky",
                                        scale=scale, backend=backend)
        torch.testing.assert_close(approx, exact, rtol=1e-8, atol=1e-10)


def test_kernelized_reference_matches_explicit_formula():
    q = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    k = torch.randn(2, 3, 11, 5, dtype=torch.float64)
    v = torch.randn(2, 3, 11, 4, dtype=torch.float64)
    mask = torch.rand(2, 11) > 0.5
    scale = 0.3
    expected = torch.zeros(2, 3, 9, 4, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            scores = torch.from_numpy(_gauss_numpy(q[b, h].numpy() * scale ** 0.5, k[b, h].numpy() * scale ** 0.5))
            expected[b, h] = (scores * mask[b]) @ v[b, h]
    torch.testing.assert_close(reference.kernelized_attention(q, k, v, attn_mask=mask, scale=scale), expected)
