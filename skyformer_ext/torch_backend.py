"""The fast PyTorch path (backend="torch"): what CPU users run and the baseline the fused kernels must beat.

Everything is built on one tiled primitive, ``gaussian_attention(queries, keys, values)`` =
kappa(queries, keys) @ values with padded keys dropped. Its forward streams (query tile x key tile) blocks
and its backward recomputes them, so nothing larger than one tile is ever stored. Because kappa is
symmetric, every Skyformer stage is an instance of it:

- key summary   Z = kappa(K, L)^T V = gaussian_attention(L, K, V, key_mask)   (tiles over keys)
- query apply   O = kappa(Q, L) Y   = gaussian_attention(Q, L, Y)             (tiles over queries)
- kernelized attention itself      = gaussian_attention(Q, K, V, key_mask)

Within a tile the exponent scale * (q.k - |q|^2/2 - |k|^2/2) comes out of a single bmm of augmented
operands log2(e) [q, -scale|q|^2/2, 1] . [scale k, 1, -scale|k|^2/2] (no bias pass over the tile), then exp2_
runs in place while the tile is in cache (base 2 because ATen's CPU exp2 is ~1.6x faster than exp).
kappa <= 1, so no running max is needed. GQA is handled by stacking the query heads of a group against
their shared key head (no copies of k or v).
"""

from __future__ import annotations

import torch

from . import _checks, reference, solve
from .landmarks import gather_landmarks

# One (query tile x key tile) block, summed over batch*kv_heads, holds at most TILE_ELEMENTS values (2 MiB
# of fp32) and at most MAX_KEY_TILE keys: small enough that exp2_ and the second matmul read it from cache,
# large enough that every bmm stays efficient (measured on a 2-core EPYC: ~1.4x faster than 8 MiB tiles).
TILE_ELEMENTS = 1 << 19
MAX_KEY_TILE = 512


def _tile_sizes(batch_heads: int, n_rows: int, n_cols: int) -> tuple[int, int]:
    """(row tile, column tile), each at least 16 (or the whole axis when shorter)."""
    budget = max(TILE_ELEMENTS // max(batch_heads, 1), 256)
    col_tile = max(min(n_cols, MAX_KEY_TILE, budget // max(min(n_rows, 256), 1)), min(n_cols, 16), 1)
    row_tile = max(min(n_rows, budget // col_tile), min(n_rows, 16), 1)
    return row_tile, col_tile


def _grouped(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, H, r, d) -> (b*kv_heads, g*r, d): the g query heads of a group stacked along rows."""
    b, heads, rows, d = t.shape
    return t.reshape(b, kv_heads, heads // kv_heads, rows, d).reshape(b * kv_heads, (heads // kv_heads) * rows, d)


def _ungrouped(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Inverse of _grouped."""
    bk, grows, d = t.shape
    return t.reshape(batch, heads, grows * bk // (batch * heads), d)


# Folded into the query operand so that exp2 of the tile product is kappa.
LOG2E = 1.4426950408889634


def _scratch(buffer: torch.Tensor | None, shape, like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``shape`` on the front of a flat reusable ``buffer`` (fresh when None): tiles
    written into the same memory stay in cache, and the allocator is not asked for megabytes per tile."""
    if buffer is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    numel = 1
    for size in shape:
        numel *= size
    return buffer[:numel].view(shape)


def _half_squared_norms(x: torch.Tensor, factor: float, out: torch.Tensor) -> None:
    """out = factor * |x|^2 per row, without an x-sized temporary (vector_norm reduces in one pass).

    In-place writes into views rather than out= arguments: dynamo rejects non-contiguous out= tensors."""
    out.copy_(torch.linalg.vector_norm(x, dim=-1)).square_().mul_(factor)


def _augmented_queries(q: torch.Tensor, scale: float, buffer=None) -> torch.Tensor:
    """log2(e) [q, -scale/2 |q|^2, 1]: paired with _augmented_keys, one bmm yields the base-2 exponent."""
    out = _scratch(buffer, (*q.shape[:-1], q.shape[-1] + 2), q)
    out[..., :-2].copy_(q).mul_(LOG2E)
    _half_squared_norms(q, -0.5 * scale * LOG2E, out[..., -2])
    out[..., -1] = LOG2E
    return out


def _augmented_keys(k: torch.Tensor, scale: float, buffer=None) -> torch.Tensor:
    """[scale k, 1, -scale/2 |k|^2]."""
    out = _scratch(buffer, (*k.shape[:-1], k.shape[-1] + 2), k)
    out[..., :-2].copy_(k).mul_(scale)
    out[..., -2] = 1.0
    _half_squared_norms(k, -0.5 * scale, out[..., -1])
    return out


def _kernel_tile(q_aug, k_aug, key_keep, buffer=None):
    """kappa as a (bk, rows, cols) tile: 2^(log2(e) scale (q.k - |q|^2/2 - |k|^2/2)); masked keys -> 0."""
    out = _scratch(buffer, (q_aug.shape[0], q_aug.shape[1], k_aug.shape[1]), q_aug)
    tile = torch.bmm(q_aug, k_aug.transpose(1, 2), out=out).exp2_()
    if key_keep is not None:
        tile.masked_fill_(~key_keep, 0.0)
    return tile


def _key_blocks(keys, values, key_mask, cdtype, scale, col_tile, buffer=None):
    """Yields (start, stop, k, k_aug, v, keep) per key tile, upcast to the compute dtype; padded v rows
    are zeroed so that NaN/inf there cannot leak into the output. k_aug lives in ``buffer`` when given
    (then it is valid until the next tile)."""
    n_cols = keys.shape[1]
    for start in range(0, n_cols, col_tile):
        stop = min(start + col_tile, n_cols)
        k = keys[:, start:stop].to(cdtype)
        v = values[:, start:stop].to(cdtype)
        keep = None
        if key_mask is not None:
            keep = key_mask[:, start:stop].unsqueeze(1)
            v = v.masked_fill(~keep.transpose(1, 2), 0.0)
        yield start, stop, k, _augmented_keys(k, scale, buffer), v, keep


class _GaussianAttention(torch.autograd.Function):
    """kappa(queries, keys) @ values on 3-D (bk, rows, d) operands; key_mask (bk, n_k) bool or None."""

    @staticmethod
    def forward(ctx, queries, keys, values, key_mask, scale, out_dtype):
        cdtype = _checks.compute_dtype(queries.dtype)
        bk, n_rows, _ = queries.shape
        row_tile, col_tile = _tile_sizes(bk, n_rows, keys.shape[1])
        out = torch.empty(bk, n_rows, values.shape[-1], dtype=out_dtype, device=queries.device)
        scratch = dict(dtype=cdtype, device=queries.device)
        tile_buffer = torch.empty(bk * row_tile * col_tile, **scratch)
        query_buffer = torch.empty(bk * row_tile * (queries.shape[-1] + 2), **scratch)
        key_buffer = torch.empty(bk * col_tile * (keys.shape[-1] + 2), **scratch)
        # With all keys in one block (the query apply: keys are the m landmarks) it is built once.
        one_block = None
        if keys.shape[1] <= col_tile:
            one_block = next(_key_blocks(keys, values, key_mask, cdtype, scale, col_tile, key_buffer), None)
        for r0 in range(0, n_rows, row_tile):
            q_aug = _augmented_queries(queries[:, r0:r0 + row_tile].to(cdtype), scale, query_buffer)
            if one_block is not None:
                _, _, _, k_aug, v, keep = one_block
                out[:, r0:r0 + row_tile] = torch.bmm(_kernel_tile(q_aug, k_aug, keep, tile_buffer), v)
                continue
            acc = torch.zeros(bk, q_aug.shape[1], values.shape[-1], **scratch)
            for _, _, _, k_aug, v, keep in _key_blocks(keys, values, key_mask, cdtype, scale, col_tile, key_buffer):
                acc.baddbmm_(_kernel_tile(q_aug, k_aug, keep, tile_buffer), v)
            out[:, r0:r0 + row_tile] = acc
        ctx.save_for_backward(queries, keys, values, key_mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        queries, keys, values, key_mask = ctx.saved_tensors
        scale = ctx.scale
        cdtype = _checks.compute_dtype(queries.dtype)
        bk, n_rows, _ = queries.shape
        row_tile, col_tile = _tile_sizes(bk, n_rows, keys.shape[1])
        grad_q = torch.empty(queries.shape, dtype=cdtype, device=queries.device)
        grad_k = torch.zeros(keys.shape, dtype=cdtype, device=keys.device)
        grad_v = torch.zeros(values.shape, dtype=cdtype, device=values.device)
        for r0 in range(0, n_rows, row_tile):
            q = queries[:, r0:r0 + row_tile].to(cdtype)
            q_aug = _augmented_queries(q, scale)
            d_out = grad_out[:, r0:r0 + row_tile].to(cdtype)
            dq = torch.zeros_like(q)
            dq_rowsum = torch.zeros(bk, q.shape[1], 1, dtype=cdtype, device=q.device)
            for c0, c1, k, k_aug, v, keep in _key_blocks(keys, values, key_mask, cdtype, scale, col_tile):
                kernel = _kernel_tile(q_aug, k_aug, keep)
                # The column slices of grad_k/grad_v are strided across the batch, where an in-place
                # baddbmm_ falls back to one matmul per batch entry: multiply batched, then add.
                grad_v[:, c0:c1] += torch.bmm(kernel.transpose(1, 2), d_out)
                # dS = (dO V^T) * kappa, then the Gaussian's chain rule on both sides.
                d_score = torch.bmm(d_out, v.transpose(1, 2)).mul_(kernel)
                dq.baddbmm_(d_score, k)
                dq_rowsum += d_score.sum(-1, keepdim=True)
                grad_k[:, c0:c1] += torch.bmm(d_score.transpose(1, 2), q).sub_(k * d_score.sum(1).unsqueeze(-1))
            grad_q[:, r0:r0 + row_tile] = scale * (dq - q * dq_rowsum)
        grad_k.mul_(scale)
        return (grad_q.to(queries.dtype), grad_k.to(keys.dtype), grad_v.to(values.dtype), None, None, None)


def gaussian_attention(queries, keys, values, key_mask, scale: float, out_dtype=None) -> torch.Tensor:
    """kappa(queries, keys) @ values per head; (b, H, r, p), (b, Hk, n, p), (b, Hk, n, pv) -> (b, H, r, pv).

    H must be a multiple of Hk (grouped heads share keys); key_mask (b, n) bool, True = key counts.
    """
    batch, heads = queries.shape[:2]
    kv_heads = keys.shape[1]
    mask3 = None
    if key_mask is not None:
        mask3 = key_mask.repeat_interleave(kv_heads, dim=0) if kv_heads > 1 else key_mask
    out = _GaussianAttention.apply(
        _grouped(queries, kv_heads), keys.reshape(batch * kv_heads, keys.shape[2], keys.shape[3]),
        values.reshape(batch * kv_heads, values.shape[2], values.shape[3]), mask3, scale,
        out_dtype or queries.dtype)
    return _ungrouped(out, batch, heads)


def kernelized_attention(q, k, v, attn_mask, scale: float) -> torch.Tensor:
    return gaussian_attention(q, k, v, attn_mask, scale)


def skyformer_attention(q, k, v, landmark_indices, attn_mask, ridge, inverse, ns_iters, scale) -> torch.Tensor:
    """Landmarks -> Gram -> landmark solve -> key summary -> query apply, evaluated right to left."""
    cdtype = _checks.compute_dtype(q.dtype)
    landmarks = gather_landmarks(q, k, landmark_indices).to(cdtype)
    gram = reference.landmark_gram(landmarks, scale)
    summary = gaussian_attention(landmarks, k, v, attn_mask, scale, out_dtype=cdtype)
    landmark_values = solve.landmark_solve(gram, summary, ridge, inverse, ns_iters)
    return gaussian_attention(q, landmarks, landmark_values, None, scale, out_dtype=q.dtype)
