"""The fast PyTorch path (backend="torch"): what CPU users run and the baseline the fused kernels must beat.

Everything is built on one tiled primitive, ``gaussian_attention(queries, keys, values)`` =
kappa(queries, keys) @ values with padded keys dropped. Its forward streams (query tile x key tile) blocks
and its backward recomputes them, so nothing larger than one tile is ever stored. Because kappa is
symmetric, every Skyformer stage is an instance of it:

- key summary   Z = kappa(K, L)^T V = gaussian_attention(L, K, V, key_mask)   (tiles over keys)
- query apply   O = kappa(Q, L) Y   = gaussian_attention(Q, L, Y)             (tiles over queries)
- kernelized attention itself      = gaussian_attention(Q, K, V, key_mask)

Within a tile the exponent is built in one piece, log2(e) scale (q.k - |q|^2/2 - |k|^2/2): the two norm
terms are broadcast into the tile buffer, then one baddbmm_ adds log2(e) scale q.k reading q and k in place
(no scaled or augmented copies), then exp2_ runs while the tile is in cache (base 2: ATen's CPU exp2 is
~1.6x faster than exp). Factoring the norms out as exp(q.k) * exp(-|q|^2/2) would overflow for large rows.
kappa <= 1, so no running max is needed. GQA is handled by stacking the query heads of a group against
their shared key head (no copies of k or v).
"""

from __future__ import annotations

import math

import torch

from typing import Optional

from torch import Tensor

from . import _checks, reference, solve
from ._amp import without_autocast
from ._autograd import backward_without_graph, first_order_only
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


# kappa = 2^(LOG2E * exponent): exp2 is the faster primitive.
LOG2E = 1.4426950408889634


def _scratch(buffer: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous tensor of ``shape`` on the front of a flat reusable ``buffer``: tiles written into the
    same memory stay in cache, and the allocator is not asked for megabytes per tile."""
    return buffer[:math.prod(shape)].view(shape)


def _norm_bias(x: torch.Tensor, scale: float, cdtype) -> torch.Tensor:
    """-log2(e) scale |x|^2 / 2 per row, (bk, r), in the compute dtype. One call for a whole operand: O(rows)
    memory, one streaming reduction (vector_norm upcasts on the fly: no x-sized temporary)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=cdtype).square_().mul_(-0.5 * scale * LOG2E)


def _kernel_tile(rows, row_bias, cols, col_bias, key_keep, scale: float, buffer: torch.Tensor):
    """kappa(rows, cols) as a (bk, r, c) tile, 2^(row_bias + col_bias + log2(e) scale rows.cols); masked
    keys -> 0. ``buffer``: reusable scratch (see _scratch), valid until the next tile."""
    out = _scratch(buffer, (rows.shape[0], rows.shape[1], cols.shape[1]))
    tile = torch.add(row_bias.unsqueeze(-1), col_bias.unsqueeze(-2), out=out)
    tile.baddbmm_(rows, cols.transpose(1, 2), alpha=scale * LOG2E).exp2_()
    if key_keep is not None:
        tile.masked_fill_(~key_keep, 0.0)
    return tile


def _key_blocks(keys, key_bias, values, key_mask, cdtype, col_tile):
    """Yields (start, stop, k, k_bias, v, keep) per key tile, upcast to the compute dtype; padded k and v
    rows are zeroed so that NaN/inf there cannot leak into the output or a gradient (0 * NaN is NaN)."""
    n_cols = keys.shape[1]
    for start in range(0, n_cols, col_tile):
        stop = min(start + col_tile, n_cols)
        k = keys[:, start:stop].to(cdtype)
        v = values[:, start:stop].to(cdtype)
        keep = None
        if key_mask is not None:
            keep = key_mask[:, start:stop].unsqueeze(1)
            padded_rows = ~keep.transpose(1, 2)
            k, v = k.masked_fill(padded_rows, 0.0), v.masked_fill(padded_rows, 0.0)
        yield start, stop, k, key_bias[:, start:stop], v, keep


# kappa(queries, keys) @ values as a custom op pair: torch.compile keeps each pass one graph node whatever the
# shapes (its tile loops step through Python ranges of the sizes, which cannot be traced for symbolic sizes),
# and runs exactly the eager code.

@torch.library.custom_op("skyformer_ext::gaussian_attention_tiled", mutates_args=())
def _gaussian_attention_op(queries: Tensor, keys: Tensor, values: Tensor, key_mask: Optional[Tensor], scale: float,
                           out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(out, query_bias, key_bias) on 3-D (bk, rows, d) operands; key_mask (bk, n_k) bool or None. The row-norm
    biases are kept for the backward."""
    cdtype = _checks.compute_dtype(queries.dtype)
    bk, n_rows, _ = queries.shape
    row_tile, col_tile = _tile_sizes(bk, n_rows, keys.shape[1])
    query_bias, key_bias = _norm_bias(queries, scale, cdtype), _norm_bias(keys, scale, cdtype)
    out = torch.empty(bk, n_rows, values.shape[-1], dtype=out_dtype, device=queries.device)
    scratch = dict(dtype=cdtype, device=queries.device)
    tile_buffer = torch.empty(bk * row_tile * col_tile, **scratch)
    # With all keys in one block (the query apply: keys are the m landmarks) it is prepared once.
    one_block = None
    if keys.shape[1] <= col_tile:
        one_block = next(_key_blocks(keys, key_bias, values, key_mask, cdtype, col_tile), None)
    for r0 in range(0, n_rows, row_tile):
        q = queries[:, r0:r0 + row_tile].to(cdtype)
        q_bias = query_bias[:, r0:r0 + row_tile]
        if one_block is not None:
            _, _, k, k_bias, v, keep = one_block
            out[:, r0:r0 + row_tile] = torch.bmm(_kernel_tile(q, q_bias, k, k_bias, keep, scale, tile_buffer), v)
            continue
        acc = torch.zeros(bk, q.shape[1], values.shape[-1], **scratch)
        for _, _, k, k_bias, v, keep in _key_blocks(keys, key_bias, values, key_mask, cdtype, col_tile):
            acc.baddbmm_(_kernel_tile(q, q_bias, k, k_bias, keep, scale, tile_buffer), v)
        out[:, r0:r0 + row_tile] = acc
    return out, query_bias, key_bias


@_gaussian_attention_op.register_fake
def _(queries, keys, values, key_mask, scale, out_dtype):
    cdtype = _checks.compute_dtype(queries.dtype)
    return (queries.new_empty(*queries.shape[:2], values.shape[-1], dtype=out_dtype),
            queries.new_empty(queries.shape[:2], dtype=cdtype), keys.new_empty(keys.shape[:2], dtype=cdtype))


@torch.library.custom_op("skyformer_ext::gaussian_attention_tiled_backward", mutates_args=())
def _gaussian_attention_backward_op(grad_out: Tensor, queries: Tensor, keys: Tensor, values: Tensor,
                                    key_mask: Optional[Tensor], query_bias: Tensor, key_bias: Tensor,
                                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    cdtype = _checks.compute_dtype(queries.dtype)
    bk, n_rows, _ = queries.shape
    row_tile, col_tile = _tile_sizes(bk, n_rows, keys.shape[1])
    tile_buffer = torch.empty(bk * row_tile * col_tile, dtype=cdtype, device=queries.device)
    grad_q = torch.empty(queries.shape, dtype=cdtype, device=queries.device)
    grad_k = torch.zeros(keys.shape, dtype=cdtype, device=keys.device)
    grad_v = torch.zeros(values.shape, dtype=cdtype, device=values.device)
    for r0 in range(0, n_rows, row_tile):
        q = queries[:, r0:r0 + row_tile].to(cdtype)
        q_bias = query_bias[:, r0:r0 + row_tile]
        d_out = grad_out[:, r0:r0 + row_tile].to(cdtype)
        dq = torch.zeros_like(q)
        dq_rowsum = torch.zeros(bk, q.shape[1], 1, dtype=cdtype, device=q.device)
        for c0, c1, k, k_bias, v, keep in _key_blocks(keys, key_bias, values, key_mask, cdtype, col_tile):
            kernel = _kernel_tile(q, q_bias, k, k_bias, keep, scale, tile_buffer)
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
    return grad_q.to(queries.dtype), grad_k.to(keys.dtype), grad_v.to(values.dtype)


@_gaussian_attention_backward_op.register_fake
def _(grad_out, queries, keys, values, key_mask, query_bias, key_bias, scale):
    return torch.empty_like(queries), torch.empty_like(keys), torch.empty_like(values)


def _gaussian_attention_setup(ctx, inputs, output):
    queries, keys, values, key_mask, scale, _ = inputs
    _, query_bias, key_bias = output
    ctx.save_for_backward(queries, keys, values, key_mask, query_bias, key_bias)
    ctx.scale = scale
    ctx.mark_non_differentiable(query_bias, key_bias)


def _gaussian_attention_backward(ctx, grad_out, *_unused_grads):
    with torch.no_grad(), without_autocast(grad_out.device):
        grads = _gaussian_attention_backward_op(grad_out, *ctx.saved_tensors, ctx.scale)
    return *first_order_only("torch", grads, (grad_out, *ctx.saved_tensors)), None, None, None


_gaussian_attention_op.register_autograd(_gaussian_attention_backward, setup_context=_gaussian_attention_setup)


class _LandmarkGram(torch.autograd.Function):
    """M = kappa(L, L), (b, H, m, m), with its closed-form backward (skyformer-math.md): H = (dM + dM^T) * M,
    dL = scale (H L - L * rowsum(H)); a node of its own so that, like every node of this path, its backward
    runs without autocast and refuses double backward."""

    @staticmethod
    def forward(ctx, landmarks, scale):
        gram = reference.landmark_gram(landmarks, scale)
        ctx.save_for_backward(landmarks, gram)
        ctx.scale = scale
        return gram

    @staticmethod
    @backward_without_graph("torch")
    def backward(ctx, grad_gram):
        landmarks, gram = ctx.saved_tensors
        weights = (grad_gram + grad_gram.transpose(-1, -2)) * gram
        return ctx.scale * (weights @ landmarks - landmarks * weights.sum(-1, keepdim=True)), None


# ---- landmark refinement: one Lloyd (k-means) step, tiled -------------------------------------------------

def _point_validity(key_mask: Optional[Tensor], batch: int, n_q: int, n_k: int, device):
    """(query rows, key rows) taking part, (batch, n_q) and (batch, n_k) bool: reference.landmark_points' rule."""
    if key_mask is None:
        return (torch.ones(batch, n_q, dtype=torch.bool, device=device),
                torch.ones(batch, n_k, dtype=torch.bool, device=device))
    has_key = key_mask.any(1, keepdim=True)
    query_valid = key_mask if n_q == n_k else torch.ones(batch, n_q, dtype=torch.bool, device=device)
    return query_valid & has_key, key_mask & has_key


def _shadowed(landmarks: Tensor) -> Tensor:
    """(..., m) bool: the slot holds exactly the row of a lower slot (duplicate seeds). Ties go to the lower
    index, and a BLAS matmul need not give identical columns identical bits, so duplicates are found from
    the coordinates: rows sorted by torch.unique, the lowest slot of each group of equal rows kept. No sync."""
    *lead, m, dim = landmarks.shape
    flat = landmarks.reshape(-1, m, dim)
    owner = torch.arange(flat.shape[0], device=landmarks.device, dtype=landmarks.dtype).repeat_interleave(m)
    _, group = torch.unique(torch.cat([owner[:, None], flat.reshape(-1, dim)], dim=1), dim=0, return_inverse=True)
    slot = torch.arange(m, device=landmarks.device).repeat(flat.shape[0])
    lowest = torch.full_like(slot, m).scatter_reduce_(0, group, slot, "amin")
    return (lowest[group] != slot).reshape(*lead, m)


def landmark_half_norms(grouped: Tensor) -> Tensor:
    """|l|^2 / 2 of landmarks (..., m, p) as (..., 1, m); +inf on duplicates of a lower slot (never picked)."""
    return grouped.square().sum(-1).mul_(0.5).masked_fill_(_shadowed(grouped), torch.inf)[..., None, :]


def assign_and_add(x: Tensor, keep: Optional[Tensor], grouped: Tensor, half_norm: Tensor, sums: Tensor,
                   counts: Tensor) -> Tensor:
    """One tile of a Lloyd step: each row's nearest landmark, and the rows added into their landmark's sum.

    x (B, g', t, p) rows in the compute dtype (g' = 1 broadcasts over the GQA group), keep (B, 1, t) bool or
    None (all rows take part), grouped (B, g, m, p) landmarks and their landmark_half_norms. Returns nearest
    (B, g, t), m where a row takes no part; sums (B, g, m + 1, p) and counts (B, g, m + 1) get the rows, the
    extra slot m collecting what is dropped. Distances are |l|^2/2 - x.l (the |x|^2 term is common to a row),
    NaN counts as +inf, ties go to the lower index. Rows are added with index_add_ on the CPU (sequential:
    deterministic, O(rows x p)); on CUDA, where index_add_ adds atomically, with one-hot products."""
    m = grouped.shape[-2]
    if keep is not None:
        x = x.masked_fill(~keep[..., None], 0.0)  # padding may hold NaN
    score = torch.matmul(x, grouped.transpose(-1, -2)).neg_().add_(half_norm)
    nearest = torch.nan_to_num_(score, nan=torch.inf, posinf=torch.inf, neginf=-torch.inf).argmin(-1)
    if keep is not None:
        nearest.masked_fill_(~keep, m)
    if x.device.type == "cuda":
        member = (nearest[..., None] == torch.arange(m + 1, device=x.device)).to(x.dtype)
        sums += torch.matmul(member.transpose(-1, -2), x)
        counts += member.sum(2)
    else:
        slot_base = torch.arange(nearest.shape[0] * nearest.shape[1], device=x.device).view(*nearest.shape[:2], 1)
        slots = (slot_base * (m + 1) + nearest).flatten()
        dim = x.shape[-1]
        sums.view(-1, dim).index_add_(0, slots, x.expand(*nearest.shape, dim).reshape(-1, dim))
        counts.view(-1).index_add_(0, slots, torch.ones((), dtype=x.dtype, device=x.device).expand(len(slots)))
    return nearest


def moved_landmarks(sums: Tensor, counts: Tensor, landmarks: Tensor) -> tuple[Tensor, Tensor]:
    """(new landmarks, counts) from sums (..., m [+ 1], p) and counts (..., m [+ 1]) (a slot m of dropped rows
    is ignored): the mean of each landmark's rows, the old position where it got none."""
    m = landmarks.shape[-2]
    sums, counts = sums[..., :m, :], counts[..., :m].contiguous()
    new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], landmarks)
    return new.contiguous(), counts


def cluster_sums(q: Tensor, k: Tensor, landmarks: Tensor, query_valid: Optional[Tensor],
                 key_valid: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The assignment half of a Lloyd step over these rows: (sums (b, H, m, p), counts (b, H, m) of the rows
    nearest each landmark, assignment (b, H, n_q + n_k) int32, -1 where a row takes no part). query_valid /
    key_valid: (batch, n) bool rows that take part, None for all. assign_and_add over tiles of the query rows,
    then of the key rows: the distance tile (and on CUDA the one-hot tile) are the only (rows x m) buffers,
    TILE_ELEMENTS at most."""
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group, m = heads // kv_heads, landmarks.shape[2]
    cdtype, device = landmarks.dtype, q.device
    grouped = landmarks.reshape(batch * kv_heads, group, m, dim)
    half_norm = landmark_half_norms(grouped)
    sums = torch.zeros(batch * kv_heads, group, m + 1, dim, dtype=cdtype, device=device)
    counts = torch.zeros(batch * kv_heads, group, m + 1, dtype=cdtype, device=device)
    assignment = torch.empty(batch * kv_heads, group, n_q + n_k, dtype=torch.int32, device=device)
    tile = max(TILE_ELEMENTS // max(batch * heads * m, 1), 16)
    parts = ((q.reshape(batch * kv_heads, group, n_q, dim), query_valid, 0),
             (k.reshape(batch * kv_heads, 1, n_k, dim), key_valid, n_q))
    for rows, valid, offset in parts:
        valid = None if valid is None else valid.repeat_interleave(kv_heads, dim=0)
        for r0 in range(0, rows.shape[2], tile):
            keep = None if valid is None else valid[:, None, r0:r0 + tile]
            nearest = assign_and_add(rows[:, :, r0:r0 + tile].to(cdtype), keep, grouped, half_norm, sums, counts)
            assignment[:, :, offset + r0:offset + r0 + nearest.shape[2]] = nearest.masked_fill(nearest == m, -1)
    return (sums[:, :, :m].reshape(batch, heads, m, dim), counts[:, :, :m].reshape(batch, heads, m),
            assignment.reshape(batch, heads, n_q + n_k))


@torch.library.custom_op("skyformer_ext::lloyd_step_tiled", mutates_args=())
def _lloyd_step_op(q: Tensor, k: Tensor, landmarks: Tensor, key_mask: Optional[Tensor]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(new landmarks, counts (b, H, m), assignment (b, H, n_q + n_k) int32, -1 where a row takes no part)."""
    validity = (None, None) if key_mask is None else _point_validity(key_mask, q.shape[0], q.shape[2], k.shape[2],
                                                                     q.device)
    sums, counts, assignment = cluster_sums(q, k, landmarks, *validity)
    new, counts = moved_landmarks(sums, counts, landmarks)
    return new, counts, assignment


@_lloyd_step_op.register_fake
def _(q, k, landmarks, key_mask):
    batch, heads, m, _ = landmarks.shape
    return (landmarks.new_empty(landmarks.shape), landmarks.new_empty(batch, heads, m),
            q.new_empty(batch, heads, q.shape[2] + k.shape[2], dtype=torch.int32))


def cluster_shares(grad_new: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of a Lloyd step per landmark: (dL_j / count_j, what each row of its cluster receives; dL_j
    where the landmark got no row, passed on to its previous position), both (..., m, p)."""
    empty = counts[..., None] == 0
    return torch.where(empty, 0.0, grad_new / counts.clamp_min(1)[..., None]), torch.where(empty, grad_new, 0.0)


@torch.library.custom_op("skyformer_ext::lloyd_step_tiled_backward", mutates_args=())
def _lloyd_step_backward_op(grad_new: Tensor, counts: Tensor, assignment: Tensor, q: Tensor, k: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, d seeds): a row gets dL_j / count_j of its landmark j; landmarks that kept no row pass dL_j
    to their previous position. Gathers of (rows x p): no (rows x m) buffer."""
    share, passed_on = cluster_shares(grad_new, counts)
    return *cluster_row_grads(share, assignment, q, k), passed_on


def cluster_row_grads(share: Tensor, assignment: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """(dq, dk): every row that took part gets the share (b, H, m, p) of its landmark (key rows summed over
    their GQA group). Gathers of (rows x p): no (rows x m) buffer."""
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]

    def gathered(rows: Tensor) -> Tensor:  # (b, H, r) landmark ids, -1 = none -> (b, H, r, p)
        picked = share.gather(2, rows.clamp_min(0).long()[..., None].expand(-1, -1, -1, dim))
        return picked.masked_fill((rows < 0)[..., None], 0.0)

    grad_q = gathered(assignment[:, :, :n_q])
    grad_k = gathered(assignment[:, :, n_q:]).reshape(batch, kv_heads, heads // kv_heads, n_k, dim).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype)


@_lloyd_step_backward_op.register_fake
def _(grad_new, counts, assignment, q, k):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(grad_new)


def _lloyd_step_setup(ctx, inputs, output):
    q, k, landmarks, key_mask = inputs
    _, counts, assignment = output
    ctx.save_for_backward(counts, assignment, q, k)
    ctx.mark_non_differentiable(counts, assignment)


def _lloyd_step_backward(ctx, grad_new, *_unused_grads):
    with torch.no_grad(), without_autocast(grad_new.device):
        grads = _lloyd_step_backward_op(grad_new, *ctx.saved_tensors)
    return *first_order_only("torch", grads, (grad_new, *ctx.saved_tensors)), None


_lloyd_step_op.register_autograd(_lloyd_step_backward, setup_context=_lloyd_step_setup)


def refine_landmarks(q, k, landmarks, steps: int, key_mask) -> torch.Tensor:
    """``steps`` Lloyd steps (reference.refine_landmarks' semantics) on landmarks in the compute dtype."""
    for _ in range(steps):
        landmarks = _lloyd_step_op(q, k, landmarks, key_mask)[0]
    return landmarks


def gaussian_attention(queries, keys, values, key_mask, scale: float, out_dtype=None) -> torch.Tensor:
    """kappa(queries, keys) @ values per head; (b, H, r, p), (b, Hk, n, p), (b, Hk, n, pv) -> (b, H, r, pv).

    H must be a multiple of Hk (grouped heads share keys); key_mask (b, n) bool, True = key counts.
    """
    batch, heads = queries.shape[:2]
    kv_heads = keys.shape[1]
    mask3 = None
    if key_mask is not None:
        mask3 = key_mask.repeat_interleave(kv_heads, dim=0) if kv_heads > 1 else key_mask
    out, _, _ = _gaussian_attention_op(
        _grouped(queries, kv_heads), keys.reshape(batch * kv_heads, keys.shape[2], keys.shape[3]),
        values.reshape(batch * kv_heads, values.shape[2], values.shape[3]), mask3, float(scale),
        out_dtype or queries.dtype)
    return _ungrouped(out, batch, heads)


def kernelized_attention(q, k, v, attn_mask, scale: float) -> torch.Tensor:
    return gaussian_attention(q, k, v, attn_mask, scale)


def skyformer_attention(q, k, v, landmark_indices, attn_mask, ridge, inverse, ns_iters, scale,
                        landmark_refine: int = 0) -> torch.Tensor:
    """Landmarks (-> Lloyd steps) -> Gram -> landmark solve -> key summary -> query apply, evaluated right to
    left."""
    cdtype = _checks.compute_dtype(q.dtype)
    landmarks = gather_landmarks(q, k, landmark_indices, attn_mask).to(cdtype)
    landmarks = refine_landmarks(q, k, landmarks, landmark_refine, attn_mask)
    gram = _LandmarkGram.apply(landmarks, scale)
    summary = gaussian_attention(landmarks, k, v, attn_mask, scale, out_dtype=cdtype)
    landmark_values = solve.landmark_solve(gram, summary, ridge, inverse, ns_iters)
    return gaussian_attention(q, landmarks, landmark_values, None, scale, out_dtype=q.dtype)

