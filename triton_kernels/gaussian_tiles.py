"""The one tiled primitive every stage is built on: Gaussian attention out = kappa(X, Y) @ V.

kappa(x, y) = exp(-scale * |x - y|^2 / 2) = exp(scale * (x.y - |x|^2/2 - |y|^2/2)) on raw (unscaled) rows, so
the sqrt(scale) scaling, the norms, the exponent and the key mask all happen inside the kernels and no scaled
copy of any input exists. kappa <= 1: no running max, no rescaling, the accumulators are plain sums.

Because kappa is symmetric, each Skyformer stage is this primitive with a different cast (see the stage
modules): key summary Z = GA(L, K, V, mask), query apply O = GA(Q, L, Y), kernelized attention GA(Q, K, V,
mask); the Gram M = kappa(L, L) uses the same kappa tile.

Kernels (one body each for every dtype and stage):
- ``gaussian_attention_fwd_kernel``: a program per (row tile, split, batch*head) streams the key tiles of its
  split and accumulates kappa(X_tile, Y_tile) @ V_tile.
- ``gaussian_attention_bwd_rows_kernel``: dX = scale * (dS @ Y - X * rowsum(dS)), dS = (dO V^T) * kappa;
  a program per row tile streams key tiles (the same split as the forward).
- ``gaussian_attention_bwd_keys_kernel``: dY = scale * (dS^T X - Y * colsum(dS)) and dV = kappa^T dO; a
  program per key tile streams the row tiles of its split, for every query head of its GQA group.

Packed sequences (flash-attn's varlen layout, issue 14): X, or Y and V, may be (total, heads, d) rows of
sequences given by cu_seqlens, batch row s of the other operands pairing with sequence s. That is addressing
only (``_sequence_rows``): a program takes its sequence's first row and length from cu_seqlens, one kernel
body for both layouts under the X_PACKED / Y_PACKED flags (compile-time, so the dense variants keep exactly
their code); the grid covers the longest sequence and programs past their sequence's end get an empty loop.

Splits: when (row tiles x heads) alone cannot fill the GPU (the key summary has only m rows), the streamed
axis is cut into ``splits`` contiguous ranges. By default each program writes a float32 partial sum to its
own slice of a (splits, ...) buffer and the host adds the slices in a fixed order: deterministic, no
atomics. With deterministic=False (the ``ATOMIC`` constexpr, chosen only for launches that do split) the
programs ``tl.atomic_add`` into one zero-filled float32 buffer instead: no per-split memory, but the float
sum's order, hence its last bits, varies from run to run.

Precision: dots take the input dtype with float32 accumulation; float32 dots use input_precision "tf32x3"
or "ieee" (the PRECISION constexpr, chosen per config): plain tf32 would cancel x.y against the norms,
tf32x3 keeps ~float32 accuracy on tensor cores. The norms come from the same loaded values and the exponent
is clamped to <= 0. Under TRITON_INTERPRET=1 bfloat16
tiles arrive as raw uint16, so ``UPCAST`` (interpreter only) widens every loaded tile to float32 first.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- kernels -----------------------------------------------------------------------------------------

# Sizes, head counts and the mask flag take any value (1 included): not specialised, so that one compiled
# variant serves every call and compile_check sees exactly the signatures launches use.
RUNTIME_INTS = ["n_rows", "n_keys", "heads", "kv_heads", "group", "has_mask", "m", "refine_steps"]


def kernel_with_runtime_ints(runtime_ints):
    """A triton.jit decorator that leaves the kernel's arguments named in runtime_ints unspecialised."""
    def decorate(fn):
        names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        return triton.jit(fn, do_not_specialize=[a for a in runtime_ints if a in names])
    return decorate


_kernel = kernel_with_runtime_ints(RUNTIME_INTS)


@triton.jit
def _load_tile(base, row0, n_rows, stride_row, stride_col, n_cols, BLOCK_ROWS: tl.constexpr,
               BLOCK_COLS: tl.constexpr, UPCAST: tl.constexpr, row_keep=None, col0=0):
    """Rows row0.. and columns col0.. of a strided matrix as a (BLOCK_ROWS, BLOCK_COLS) tile; zero past
    n_rows / n_cols (counted from row 0 / col0) and on rows where row_keep is False."""
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    cols = cols + col0
    if row_keep is not None:
        inside = inside & row_keep[:, None]
    tile = tl.load(base + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col, mask=inside,
                   other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _half_norm_scaled(tile, scale_log2):
    """scale*log2(e) * |row|^2 / 2 in float32, from the same values the dot sees."""
    wide = tile.to(tl.float32)
    return (0.5 * scale_log2) * tl.sum(wide * wide, axis=1)


@triton.jit
def _load_tile_with_half_norm(base, row0, n_rows, stride_row, stride_col, n_cols, scale_log2,
                              BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, UPCAST: tl.constexpr,
                              row_keep=None):
    """(tile, its scaled half row norms): the operand of a kappa tile (rows where row_keep is False load as 0)."""
    tile = _load_tile(base, row0, n_rows, stride_row, stride_col, n_cols, BLOCK_ROWS, BLOCK_COLS, UPCAST, row_keep)
    return tile, _half_norm_scaled(tile, scale_log2)


@triton.jit
def _kappa_tile(a, a_half_norm, b, b_half_norm, scale_log2, PRECISION: tl.constexpr):
    """kappa(a_i, b_j) for a (R, D) and b (C, D) tile: exp2(scale*log2e*(a.b) - norms), clamped to <= 1.
    The clamp keeps NaN (a GPU's plain min() returns the other operand): NaN in a row gives NaN kappa."""
    dots = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    exponent = scale_log2 * dots - a_half_norm[:, None] - b_half_norm[None, :]
    return tl.exp2(tl.minimum(exponent, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _key_keep(mask_base, stride_mask, key0, n_keys, has_mask, BLOCK_KEYS: tl.constexpr):
    """Keys in range and (when has_mask) not padded. has_mask is a runtime flag: the predicated-off mask
    load costs nothing, and one compiled variant serves masked and unmasked calls."""
    keys = key0 + tl.arange(0, BLOCK_KEYS)
    keep = keys < n_keys
    padded = tl.load(mask_base + keys.to(tl.int64) * stride_mask, mask=keep & (has_mask != 0), other=1) == 0
    return keep & ~padded


@triton.jit
def _batch_and_heads(pid_bh, heads, group):
    """(batch, head, kv_head) of a program's batch*heads index, in int64: multiplied by the batch and head
    strides they would overflow int32 pointer offsets for long sequences."""
    batch = (pid_bh // heads).to(tl.int64)
    head = pid_bh % heads
    kv_head = (head // group).to(tl.int64)
    return batch, head.to(tl.int64), kv_head


@triton.jit
def _sequence_rows(CU_SEQLENS, batch, n, PACKED: tl.constexpr):
    """(first, length) of batch row ``batch``'s rows of an operand. Dense: (batch, n), its base is batch times
    the batch stride. Packed (flash-attn's varlen layout, PACKED): its sequence's first packed row and length
    from cu_seqlens; the host passes the row stride as the batch stride, so one body addresses both layouts.
    A compile-time flag: the dense variants compile to exactly the code they had before packing existed."""
    if PACKED:
        first = tl.load(CU_SEQLENS + batch)
        return first.to(tl.int64), tl.load(CU_SEQLENS + batch + 1) - first
    return batch, n


@triton.jit
def _split_range(split, per_split, n):
    """[start, stop) of the streamed items that one split covers."""
    start = split * per_split
    return start, tl.minimum(start + per_split, n)


@triton.jit
def _row_program_start(X, Y, V, MASK, CU_X, CU_Y, sx_b, sx_h, sx_r, sx_d, sy_b, sy_h, sv_b, sv_h, sm_b, n_rows,
                       n_keys, heads, group, dim, scale_log2, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST: tl.constexpr, X_PACKED: tl.constexpr, Y_PACKED: tl.constexpr):
    """What a program of the key-streaming kernels (grid: row tile, split, batch*head) starts from: the first
    row of its X rows (X's layout: where it writes), their count, the key count, head, row0, its X tile with
    half norms, and the bases of its batch's key mask and its kv head's Y, V."""
    batch, head, kv_head = _batch_and_heads(tl.program_id(2), heads, group)
    x_first, n_rows = _sequence_rows(CU_X, batch, n_rows, X_PACKED)
    y_first, n_keys = _sequence_rows(CU_Y, batch, n_keys, Y_PACKED)
    row0 = tl.program_id(0) * BLOCK_R
    x, x_half = _load_tile_with_half_norm(X + x_first * sx_b + head * sx_h, row0, n_rows, sx_r, sx_d, dim,
                                          scale_log2, BLOCK_R, BLOCK_D, UPCAST)
    return (x_first, n_rows, n_keys, head, row0, x, x_half, Y + y_first * sy_b + kv_head * sy_h,
            V + y_first * sv_b + kv_head * sv_h, MASK + batch * sm_b)


@triton.jit
def _key_range(split, keys_per_split, n_keys, row0, n_rows, X_PACKED: tl.constexpr):
    """[key_start, key_stop) of a row program's split; empty for a row tile past its sequence (packed X: the
    grid covers the longest sequence)."""
    key_start, key_stop = _split_range(split, keys_per_split, n_keys)
    if X_PACKED:
        key_stop = tl.where(row0 < n_rows, key_stop, key_start)
    return key_start, key_stop


@triton.jit
def _masked_key_tile(x, x_half, y_base, v_base, mask_base, stride_mask, key0, key_stop, n_keys, sy_r, sy_d,
                     sv_r, sv_d, dim, dim_v, has_mask, scale_log2, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     ZERO_PADDED_KEYS: tl.constexpr = False):
    """(y, kappa(x, y), v) for the key tile at key0 of a row program's key loop: kappa is 0 on keys past
    key_stop or masked out, and those value rows (and, if ZERO_PADDED_KEYS, key rows: the backward multiplies
    them) load as 0 so that NaN/inf stored under padding cannot leak into a sum (0 * NaN is NaN)."""
    keep = _key_keep(mask_base, stride_mask, key0, key_stop, has_mask, BLOCK_K)
    y, y_half = _load_tile_with_half_norm(y_base, key0, n_keys, sy_r, sy_d, dim, scale_log2, BLOCK_K, BLOCK_D,
                                          UPCAST)
    kappa = tl.where(keep[None, :], _kappa_tile(x, x_half, y, y_half, scale_log2, PRECISION), 0.0)
    if ZERO_PADDED_KEYS:
        y = tl.where(keep[:, None], y, 0.0)
    v = _load_tile(v_base, key0, n_keys, sv_r, sv_d, dim_v, BLOCK_K, BLOCK_DV, UPCAST, keep)
    return y, kappa, v


@triton.jit
def _accumulate_score_grad(acc, score_sum, d_score, other, PRECISION: tl.constexpr):
    """Add d_score @ other and the row sums of d_score: the two terms of _kappa_rows_grad."""
    acc = tl.dot(d_score.to(other.dtype), other, acc, input_precision=PRECISION)
    return acc, score_sum + tl.sum(d_score, axis=1)


@triton.jit
def _kappa_rows_grad(acc, rows, score_sum, scale):
    """d/da_i of sum_j dS_ij kappa(a_i, b_j) = scale * (sum_j dS_ij b_j - a_i * sum_j dS_ij)."""
    return scale * (acc - rows.to(tl.float32) * score_sum[:, None])


@triton.jit
def _write_tile(base, values, row0, n_rows, stride_row, stride_col, n_cols, BLOCK_ROWS: tl.constexpr,
                BLOCK_COLS: tl.constexpr, ATOMIC: tl.constexpr, col0=0):
    """Store a tile, cast to base's element type, at rows row0.. and columns col0.. of a strided matrix
    with n_rows rows and n_cols columns, or (ATOMIC, deterministic=False) add it into a zero-initialised
    float32 buffer that every split shares: order-dependent rounding, but no per-split partial buffer."""
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    cols = col0 + tl.arange(0, BLOCK_COLS)
    # Pointers, cast, then bounds: the other order spilled the fp32 head-dim-256 forward on sm_80.
    pointers = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
    values = values.to(base.dtype.element_ty)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if ATOMIC:
        tl.atomic_add(pointers, values, mask=inside, sem="relaxed")
    else:
        tl.store(pointers, values, mask=inside)


@_kernel
def gaussian_attention_fwd_kernel(
        X, Y, V, MASK, CU_X, CU_Y, OUT,
        sx_b, sx_h, sx_r, sx_d, sy_b, sy_h, sy_r, sy_d, sv_b, sv_h, sv_r, sv_d, sm_b, sm_r,
        so_s, so_b, so_h, so_r, so_d,
        n_rows, n_keys, heads, group, keys_per_split, dim, dim_v, has_mask, scale_log2,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr, X_PACKED: tl.constexpr,
        Y_PACKED: tl.constexpr):
    x_first, n_rows, n_keys, head, row0, x, x_half, y_base, v_base, mask_base = _row_program_start(
        X, Y, V, MASK, CU_X, CU_Y, sx_b, sx_h, sx_r, sx_d, sy_b, sy_h, sv_b, sv_h, sm_b, n_rows, n_keys, heads,
        group, dim, scale_log2, BLOCK_R, BLOCK_D, UPCAST, X_PACKED, Y_PACKED)
    split = tl.program_id(1)

    acc = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.float32)
    key_start, key_stop = _key_range(split, keys_per_split, n_keys, row0, n_rows, X_PACKED)
    for key0 in range(key_start, key_stop, BLOCK_K):
        _, kappa, v = _masked_key_tile(x, x_half, y_base, v_base, mask_base, sm_r, key0, key_stop,
                                       n_keys, sy_r, sy_d, sv_r, sv_d, dim, dim_v, has_mask, scale_log2,
                                       BLOCK_K, BLOCK_D, BLOCK_DV, UPCAST, PRECISION)
        acc = tl.dot(kappa.to(v.dtype), v, acc, input_precision=PRECISION)

    out = OUT + split.to(tl.int64) * so_s + x_first * so_b + head * so_h
    _write_tile(out, acc, row0, n_rows, so_r, so_d, dim_v, BLOCK_R, BLOCK_DV, ATOMIC)


@triton.jit
def _grad_factor(GRAD_FACTOR, index, SCALED_GRAD: tl.constexpr):
    """The power of two the output gradient of (batch*heads) index was divided by (1 when not SCALED_GRAD)."""
    if SCALED_GRAD:
        return tl.load(GRAD_FACTOR + index)
    return 1.0


@_kernel
def gaussian_attention_bwd_rows_kernel(
        X, Y, V, MASK, CU_X, CU_Y, GRAD_OUT, GRAD_FACTOR, GRAD_X,
        sx_b, sx_h, sx_r, sx_d, sy_b, sy_h, sy_r, sy_d, sv_b, sv_h, sv_r, sv_d, sm_b, sm_r,
        sg_b, sg_h, sg_r, sg_d, sdx_s, sdx_b, sdx_h, sdx_r, sdx_d,
        n_rows, n_keys, heads, group, keys_per_split, dim, dim_v, has_mask, scale, scale_log2,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr, SCALED_GRAD: tl.constexpr,
        X_PACKED: tl.constexpr, Y_PACKED: tl.constexpr):
    split = tl.program_id(1)
    x_first, n_rows, n_keys, head, row0, x, x_half, y_base, v_base, mask_base = _row_program_start(
        X, Y, V, MASK, CU_X, CU_Y, sx_b, sx_h, sx_r, sx_d, sy_b, sy_h, sv_b, sv_h, sm_b, n_rows, n_keys, heads,
        group, dim, scale_log2, BLOCK_R, BLOCK_D, UPCAST, X_PACKED, Y_PACKED)
    grad_out = _load_tile(GRAD_OUT + x_first * sg_b + head * sg_h, row0, n_rows, sg_r, sg_d, dim_v, BLOCK_R,
                          BLOCK_DV, UPCAST)

    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    key_start, key_stop = _key_range(split, keys_per_split, n_keys, row0, n_rows, X_PACKED)
    for key0 in range(key_start, key_stop, BLOCK_K):
        y, kappa, v = _masked_key_tile(x, x_half, y_base, v_base, mask_base, sm_r, key0, key_stop,
                                       n_keys, sy_r, sy_d, sv_r, sv_d, dim, dim_v, has_mask, scale_log2,
                                       BLOCK_K, BLOCK_D, BLOCK_DV, UPCAST, PRECISION, True)
        d_score = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION) * kappa
        acc, row_sum = _accumulate_score_grad(acc, row_sum, d_score, y, PRECISION)

    out = GRAD_X + split.to(tl.int64) * sdx_s + x_first * sdx_b + head * sdx_h
    grad_x = _kappa_rows_grad(acc, x, row_sum, scale) * _grad_factor(GRAD_FACTOR, tl.program_id(2), SCALED_GRAD)
    _write_tile(out, grad_x, row0, n_rows, sdx_r, sdx_d, dim, BLOCK_R, BLOCK_D, ATOMIC)


@_kernel
def gaussian_attention_bwd_keys_kernel(
        X, Y, V, MASK, CU_X, CU_Y, GRAD_OUT, GRAD_FACTOR, GRAD_Y, GRAD_V,
        sx_b, sx_h, sx_r, sx_d, sy_b, sy_h, sy_r, sy_d, sv_b, sv_h, sv_r, sv_d, sm_b, sm_r,
        sg_b, sg_h, sg_r, sg_d, sdy_s, sdy_b, sdy_h, sdy_r, sdy_d, sdv_s, sdv_b, sdv_h, sdv_r, sdv_d,
        n_rows, n_keys, kv_heads, group, rows_per_split, dim, dim_v, has_mask, scale, scale_log2,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ATOMIC: tl.constexpr, SCALED_GRAD: tl.constexpr,
        X_PACKED: tl.constexpr, Y_PACKED: tl.constexpr):
    pid_k, split, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch = (pid_bh // kv_heads).to(tl.int64)
    kv_head = pid_bh % kv_heads  # int32 here: head indices are formed from it below, then widened
    key0 = pid_k * BLOCK_K
    x_first, n_rows = _sequence_rows(CU_X, batch, n_rows, X_PACKED)
    y_first, n_keys = _sequence_rows(CU_Y, batch, n_keys, Y_PACKED)

    keep = _key_keep(MASK + batch * sm_b, sm_r, key0, n_keys, has_mask, BLOCK_K)
    y, y_half = _load_tile_with_half_norm(Y + y_first * sy_b + kv_head.to(tl.int64) * sy_h, key0, n_keys, sy_r,
                                          sy_d, dim, scale_log2, BLOCK_K, BLOCK_D, UPCAST)
    v = _load_tile(V + y_first * sv_b + kv_head.to(tl.int64) * sv_h, key0, n_keys, sv_r, sv_d, dim_v, BLOCK_K,
                   BLOCK_DV, UPCAST, keep)

    acc_y = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_K, BLOCK_DV), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    row_start, row_stop = _split_range(split, rows_per_split, n_rows)
    if Y_PACKED:  # a key tile past its sequence (the grid covers the longest): no work
        row_stop = tl.where(key0 < n_keys, row_stop, row_start)
    # Scaled output gradients (the key summary's dZ / f_h, one power of two per head): the group's members
    # are brought to their largest factor, exactly, so that one accumulator serves them all.
    group_factor = _grad_factor(GRAD_FACTOR, pid_bh * group, SCALED_GRAD)
    if SCALED_GRAD:
        for member in range(1, group):
            group_factor = tl.maximum(group_factor, tl.load(GRAD_FACTOR + pid_bh * group + member))
    for member in range(0, group):
        head = (kv_head * group + member).to(tl.int64)
        x_base = X + x_first * sx_b + head * sx_h
        g_base = GRAD_OUT + x_first * sg_b + head * sg_h
        member_scale = _grad_factor(GRAD_FACTOR, pid_bh * group + member, SCALED_GRAD) / group_factor
        for row0 in range(row_start, row_stop, BLOCK_R):
            x, x_half = _load_tile_with_half_norm(x_base, row0, row_stop, sx_r, sx_d, dim, scale_log2, BLOCK_R,
                                                  BLOCK_D, UPCAST)
            grad_out = _load_tile(g_base, row0, row_stop, sg_r, sg_d, dim_v, BLOCK_R, BLOCK_DV, UPCAST)
            if SCALED_GRAD:
                grad_out = (grad_out.to(tl.float32) * member_scale).to(grad_out.dtype)
            # kappa is symmetric: the transposed tile kappa(Y, X) comes straight out of the same helper.
            kappa_t = tl.where(keep[:, None], _kappa_tile(y, y_half, x, x_half, scale_log2, PRECISION), 0.0)
            acc_v = tl.dot(kappa_t.to(grad_out.dtype), grad_out, acc_v, input_precision=PRECISION)
            d_score_t = tl.dot(v, tl.trans(grad_out), input_precision=PRECISION) * kappa_t
            acc_y, col_sum = _accumulate_score_grad(acc_y, col_sum, d_score_t, x, PRECISION)

    split_offset = split.to(tl.int64)
    kv_head = kv_head.to(tl.int64)
    # Padded keys get a zero gradient (their kappa is 0), whatever garbage their rows hold (0 * NaN is NaN).
    grad_y = tl.where(keep[:, None], _kappa_rows_grad(acc_y, y, col_sum, scale), 0.0) * group_factor
    _write_tile(GRAD_Y + split_offset * sdy_s + y_first * sdy_b + kv_head * sdy_h, grad_y, key0, n_keys, sdy_r,
                sdy_d, dim, BLOCK_K, BLOCK_D, ATOMIC)
    _write_tile(GRAD_V + split_offset * sdv_s + y_first * sdv_b + kv_head * sdv_h, acc_v * group_factor, key0,
                n_keys, sdv_r, sdv_d, dim_v, BLOCK_K, BLOCK_DV, ATOMIC)


# ---- launch configuration -----------------------------------------------------------------------------

# Programs we aim for before splitting a streamed axis: a few waves on a 108-132 SM GPU. Under the
# interpreter (programs run one after another) a small target still exercises the split path in tests.
TARGET_PROGRAMS = 8 if INTERPRETER else 512
HEAD_DIMS = (16, 32, 64, 128, 256)  # head-dim buckets: next power of two of max(p, p_v), at least 16
KERNEL_ROLES = ("fwd", "rows", "keys")


def head_block(dim: int, dim_v: int) -> int:
    """One bucket for both head dims (p_v != p is rare; one bucket keeps the compiled set small)."""
    return max(16, triton.next_power_of_2(max(dim, dim_v)))


def _config(block_r, block_k, num_warps, num_stages, precision="tf32x3"):
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, PRECISION=precision)


# role -> {(input element bytes, head-dim bucket): candidates}, the default first (the only one under the
# interpreter); on a GPU the autotuner picks among them. Sizes chosen so that nothing spills on sm_80/sm_90
# (python -m triton_kernels.compile_check compiles every candidate). BLOCK_R tiles the rows of X (queries /
# landmarks), BLOCK_K the rows of Y (keys / landmarks). Rules: a candidate's streamed block (BLOCK_K for fwd
# and rows, BLOCK_R for keys) is at most the default's, so the split plan stays today's (plan_blocks), and all
# candidates share the default's PRECISION: the pick changes speed, never the numerics of the dots. "ieee"
# where float32's tf32x3 would spill: at float32 head dim 256 only 16 x 16 ieee tiles fit, and only with 2-3
# stages (one stage spills in the backward kernels). The key summary's scaled-gradient variant of the key
# kernel is the tightest elsewhere (own entries at head dims 16 and 32; one stage for 2-byte inputs at 64),
# and float32 rows at 128 need ieee.
_CONFIGS = {
    "fwd": {(2, 64): [_config(64, 64, 4, 2), _config(64, 32, 4, 3), _config(64, 64, 4, 3)],
            (2, 128): [_config(64, 32, 4, 2), _config(128, 32, 8, 2), _config(32, 32, 4, 2)],
            (2, 256): [_config(64, 32, 8, 1), _config(32, 32, 4, 2), _config(64, 32, 8, 2)],
            (4, 64): [_config(64, 32, 4, 2), _config(128, 32, 8, 2), _config(32, 32, 4, 2)],
            (4, 128): [_config(32, 32, 8, 1), _config(32, 32, 8, 2), _config(32, 16, 4, 2)],
            (4, 256): [_config(16, 16, 8, 2, "ieee"), _config(32, 16, 8, 2, "ieee"), _config(16, 16, 8, 3, "ieee")]},
    "rows": {(2, 64): [_config(32, 32, 4, 2), _config(64, 32, 4, 2), _config(32, 32, 4, 3)],
             (2, 128): [_config(32, 32, 8, 1), _config(64, 32, 8, 1), _config(64, 16, 8, 2)],
             (2, 256): [_config(32, 16, 8, 1), _config(16, 16, 4, 2)],
             (4, 64): [_config(32, 16, 4, 2, "ieee"), _config(32, 16, 4, 3, "ieee"), _config(16, 16, 4, 2, "ieee")],
             (4, 128): [_config(16, 16, 4, 2, "ieee"), _config(32, 16, 4, 2, "ieee"), _config(16, 16, 8, 1, "ieee")],
             (4, 256): [_config(16, 16, 4, 2, "ieee"), _config(16, 16, 4, 3, "ieee")]},
    "keys": {(2, 16): [_config(32, 32, 4, 2), _config(32, 64, 4, 2), _config(16, 32, 4, 2)],
             (2, 32): [_config(32, 32, 4, 1), _config(32, 64, 4, 2), _config(16, 64, 4, 2)],
             (2, 64): [_config(32, 32, 4, 1), _config(16, 64, 8, 2), _config(16, 32, 4, 1)],
             (2, 128): [_config(32, 32, 8, 1), _config(16, 32, 8, 1), _config(32, 64, 8, 1)],
             (2, 256): [_config(16, 32, 8, 1), _config(16, 16, 4, 2), _config(16, 32, 8, 2)],
             (4, 16): [_config(16, 32, 8, 2), _config(16, 32, 4, 2), _config(16, 16, 4, 2)],
             (4, 32): [_config(16, 16, 4, 2), _config(16, 16, 4, 1)],
             (4, 64): [_config(16, 32, 8, 2), _config(16, 32, 8, 1)],
             (4, 128): [_config(16, 16, 8, 1), _config(16, 16, 8, 2)],
             (4, 256): [_config(16, 16, 8, 3, "ieee")]},
}


def block_candidates(role: str, block_d: int, elem_bytes: int) -> list[dict]:
    """The launch configurations (tile sizes, warps, stages, float32 dot precision) of a kernel role for a
    head-dim bucket and an input element size (2: fp16/bf16, 4: fp32): the default first. The autotuner picks
    among them on a GPU; compile_check compiles every one for KERNEL_ROLES x HEAD_DIMS x {fp16, bf16, fp32}."""
    configs = _CONFIGS[role]
    return configs.get((elem_bytes, block_d)) or configs[(elem_bytes, max(block_d, 64))]


def split_plan(n_stream: int, block_stream: int, programs: int, allow_split: bool) -> tuple[int, int]:
    """(splits, items per split, a multiple of block_stream) for a streamed axis of n_stream items.

    Splits are added only while programs * splits stays under TARGET_PROGRAMS, so a split partial-sum
    buffer (splits x rows x d) stays bounded however long the streamed axis grows.
    """
    tiles = triton.cdiv(max(n_stream, 1), block_stream)
    wanted = max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, max(programs, 1)))) if allow_split else 1
    tiles_per_split = triton.cdiv(tiles, wanted)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * block_stream


# ptxas's own register target spilled 9 packed float32 variants at head dims 16 and 32 (8-24 registers) that
# a 255 cap compiles spill-free; the same cap spills at 128 and 256, where ptxas's choice does not. Dense and
# 2-byte variants keep ptxas's choice (compile_check).
PACKED_FLOAT32_MAX_REGISTERS, PACKED_FLOAT32_CAPPED_HEAD_DIM = 255, 32


def register_cap(elem_bytes: int, block_d: int, x_packed: bool, y_packed: bool) -> int | None:
    """The maxnreg launch option of a generic kernel's variant (None: ptxas decides)."""
    capped = elem_bytes == 4 and block_d <= PACKED_FLOAT32_CAPPED_HEAD_DIM and (x_packed or y_packed)
    return PACKED_FLOAT32_MAX_REGISTERS if capped else None


_BLOCKS = {"fwd": ("BLOCK_R", "BLOCK_K"), "rows": ("BLOCK_R", "BLOCK_K"), "keys": ("BLOCK_K", "BLOCK_R")}
_TUNED_META = ("BLOCK_R", "BLOCK_K", "PRECISION")  # what a candidate sets besides warps and stages


def plan_blocks(role: str, block_d: int, elem_bytes: int) -> tuple[int, int]:
    """(tile block, stream block) a launch plans its programs and splits with, whichever candidate runs:
    the default's tile block and the largest candidate stream block. Blocks are powers of two, so every
    candidate's tiles cover a split exactly, and the split plan (the partial buffers' shapes and the order
    of their fixed-order sum) does not depend on the autotuner's pick."""
    tiled, streamed = _BLOCKS[role]
    candidates = block_candidates(role, block_d, elem_bytes)
    return candidates[0][tiled], max(c[streamed] for c in candidates)


def _length_bucket(stream_length: int) -> int:
    """The streamed items per program, coarsely (256, 1k, 4k, 16k+): the autotuner's key besides dtypes,
    head-dim bucket and variant, so that a new sequence length does not retune."""
    bucket = 256
    while bucket < min(stream_length, 16384):
        bucket *= 4
    return bucket


_TUNERS: dict = {}  # (kernel, role, elem bytes, head-dim bucket, length bucket, atomic outputs) -> Autotuner


def _tuner(kernel, role: str, block_d: int, elem_bytes: int, stream_length: int, atomic_outputs: tuple,
           maxnreg: int | None):
    """The autotuner of one kernel role over its candidates. It benchmarks once per key (first call: device
    syncs, extra launches); later calls only look the pick up on the host, so CUDA-graph capture works after
    one warm-up call per shape bucket. The atomic variants add into zero-filled buffers: the tuner zeroes
    them before every benchmark run and before the real launch. Other launches store every output element
    and read no output, so benchmark runs leave nothing behind."""
    key = (kernel, role, elem_bytes, block_d, _length_bucket(stream_length), atomic_outputs, maxnreg)
    if key not in _TUNERS:
        import triton.testing

        configs = [triton.Config({name: c[name] for name in _TUNED_META}, num_warps=c["num_warps"],
                                 num_stages=c["num_stages"], maxnreg=maxnreg)
                   for c in block_candidates(role, block_d, elem_bytes)]
        # Tensor dtypes join the key by themselves (the stages' pointer dtypes); SCALED_GRAD picks a variant.
        _TUNERS[key] = triton.autotune(
            configs, key=["SCALED_GRAD", "X_PACKED", "Y_PACKED"], reset_to_zero=list(atomic_outputs),
            do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
        )(kernel)
    return _TUNERS[key]


def _launch(kernel, role: str, block_d: int, elem_bytes: int, grid, args: tuple, stream_length: int,
            atomic_outputs: tuple, **meta) -> None:
    """Launch a generic kernel with grid(META) (META: the chosen candidate's blocks): under the interpreter,
    or with a single candidate, the default configuration, with no autotuner; on a GPU the tuner's pick."""
    candidates = block_candidates(role, block_d, elem_bytes)
    maxnreg = register_cap(elem_bytes, block_d, meta.get("X_PACKED", False), meta.get("Y_PACKED", False))
    if INTERPRETER or len(candidates) == 1:
        cfg = candidates[0]
        kernel[grid(cfg)](*args, **meta, **{name: cfg[name] for name in _TUNED_META}, num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"], **({"maxnreg": maxnreg} if maxnreg else {}))
    else:
        _tuner(kernel, role, block_d, elem_bytes, stream_length, atomic_outputs, maxnreg)[grid](*args, **meta)


# ---- host wrappers ------------------------------------------------------------------------------------

def _upcast(*tensors: torch.Tensor) -> bool:
    return INTERPRETER and any(t.dtype == torch.bfloat16 for t in tensors)


def _mask_args(key_mask: torch.Tensor | None, device):
    """(uint8 mask, batch stride, key stride, has_mask); an unread 1-byte placeholder when there is no mask
    (an allocation, no launch)."""
    if key_mask is None:  # strides (0, 1): the same specialisation as a contiguous mask
        return torch.empty(1, dtype=torch.uint8, device=device), 0, 1, 0
    mask = key_mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), 1


class Sequences(NamedTuple):
    """The packed rows of a (total, heads, d) operand (flash-attn's varlen layout): sequence s holds rows
    cu_seqlens[s]:cu_seqlens[s + 1] (int32, on the device), none longer than max_seqlen."""
    cu_seqlens: torch.Tensor
    max_seqlen: int


def _operand(t: torch.Tensor, seqs: Sequences | None):
    """(batch, heads, rows, dim, strides (batch, head, row, col), cu_seqlens pointer) of a dense (b, h, n, d)
    operand or a packed (total, h, d) one: a packed operand's batch is its sequence, its rows are planned as
    the longest sequence's, and its batch stride is its row stride (the kernels offset by the sequence's first
    row, see _sequence_rows); a dense operand gets an unread int32 placeholder (an allocation, no launch)."""
    if seqs is None:
        return (*t.shape, t.stride(), torch.empty(1, dtype=torch.int32, device=t.device))
    row, head, col = t.stride()
    return (seqs.cu_seqlens.shape[0] - 1, t.shape[1], seqs.max_seqlen, t.shape[2], (row, head, row, col),
            seqs.cu_seqlens)


def _packing(x_seqs: Sequences | None, y_seqs: Sequences | None) -> dict:
    """The kernels' X_PACKED / Y_PACKED flags."""
    return dict(X_PACKED=x_seqs is not None, Y_PACKED=y_seqs is not None)


def _buffer(splits: int, shape, dtype, device, split_capable: bool, atomic: bool) -> torch.Tensor:
    """Where programs write: the result itself when the launch cannot split; float32 (splits, *shape) slices
    when it may; with atomic one zero-filled float32 (1, *shape) that every split adds into."""
    if atomic:
        return torch.zeros(1, *shape, dtype=torch.float32, device=device)
    return torch.empty(splits, *shape, dtype=torch.float32 if split_capable else dtype, device=device)


def _strides(buffer: torch.Tensor) -> tuple[int, ...]:
    """Strides of a (splits, ...) buffer as the kernels take them: the split stride is 0 when all programs
    write the one slice (a single split, or the atomic buffer); a packed (splits, total, heads, d) buffer's
    batch stride is its row stride."""
    split, *rest = buffer.stride()
    if len(rest) == 3:
        rest = (rest[0], rest[1], rest[0], rest[2])
    return (split if buffer.shape[0] > 1 else 0, *rest)


def reduce_splits(partials: torch.Tensor, dtype) -> torch.Tensor:
    """A fixed-order sum over the split axis of a (splits, ...) buffer (deterministic), cast to dtype: the
    second stage of a split reduction whose consumer cannot add the partials on load."""
    total = partials[0] if partials.shape[0] == 1 else partials.sum(0)
    return total.to(dtype)


def gaussian_attention_fwd(x, y, v, key_mask, scale: float, out_dtype, split_keys: bool = False,
                           deterministic: bool = True, x_seqs: Sequences | None = None,
                           y_seqs: Sequences | None = None) -> torch.Tensor:
    """kappa(x, y) @ v: x (b, H, r, p), y (b, Hk, n, p), v (b, Hk, n, pv) in x's dtype, key_mask (b, n) bool
    or None. x_seqs / y_seqs: x, or y and v, are packed instead ((total, H, p) and (total, Hk, p / pv), no key
    mask), batch row s of the other operands pairing with sequence s.

    Returns the (splits, b, H, r, pv) buffer the programs wrote ((splits, total_x, H, pv) for a packed x): with
    split_keys the key axis may be cut into ranges whose float32 partial sums the consumer adds
    (``reduce_splits``, or on load in the next kernel); deterministic=False lets a launch that does split add
    them atomically into one slice instead. Without split_keys it is one slice in out_dtype.
    """
    batch, heads, n_rows, dim, x_strides, cu_x = _operand(x, x_seqs)
    _, kv_heads, n_keys, _, y_strides, cu_y = _operand(y, y_seqs)
    dim_v = v.shape[-1]
    block_d = head_block(dim, dim_v)
    row_block, key_block = plan_blocks("fwd", block_d, x.element_size())
    splits, keys_per_split = split_plan(n_keys, key_block, triton.cdiv(n_rows, row_block) * batch * heads,
                                        split_keys)
    atomic = not deterministic and splits > 1
    out_shape = (*x.shape[:-1], dim_v)
    out = _buffer(splits, out_shape, out_dtype, x.device, split_keys, atomic)
    if n_rows:
        mask, sm_b, sm_r, has_mask = _mask_args(key_mask, x.device)
        _launch(gaussian_attention_fwd_kernel, "fwd", block_d, x.element_size(),
                lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), splits, batch * heads),
                (x, y, v, mask, cu_x, cu_y, out, *x_strides, *y_strides, *_operand(v, y_seqs)[4], sm_b, sm_r,
                 *_strides(out), n_rows, n_keys, heads, heads // kv_heads, keys_per_split, dim, dim_v, has_mask,
                 scale * LOG2_E), keys_per_split, ("OUT",) if atomic else (), BLOCK_D=block_d, BLOCK_DV=block_d,
                UPCAST=_upcast(x, y, v), ATOMIC=atomic, **_packing(x_seqs, y_seqs))
    return out


def gaussian_attention_bwd(grad_out, x, y, v, key_mask, scale: float, split_keys: bool = False,
                           split_rows: bool = True, deterministic: bool = True, grad_factor=None,
                           x_seqs: Sequences | None = None, y_seqs: Sequences | None = None):
    """The (splits, ...) buffers of (dx, dy, dv) of gaussian_attention_fwd, as it returns its output (each in
    its operand's layout).

    dx streams keys, split like the forward when split_keys (float32 partials), else one slice in x's dtype.
    dy and dv stream rows: with split_rows (rows as long as the sequence) they may split and come as float32
    partials; without (the m landmark rows) one slice each in y's and v's dtype. deterministic=False: launches
    that split add atomically into one float32 slice. grad_factor (b, H) float32: grad_out holds the true
    gradient divided by these powers of two (the key summary's dZ, which can exceed fp16's range); the
    kernels multiply them back (exact).
    """
    batch, heads, n_rows, dim, x_strides, cu_x = _operand(x, x_seqs)
    _, kv_heads, n_keys, _, y_strides, cu_y = _operand(y, y_seqs)
    dim_v = v.shape[-1]
    if grad_out.stride(-1) != 1:  # e.g. the stride-0 gradient of out.sum(): a unit inner stride, as compiled
        grad_out = grad_out.contiguous()
    scaled_grad = grad_factor is not None
    grad_factor = grad_factor if scaled_grad else grad_out  # an unread placeholder pointer
    block_d = head_block(dim, dim_v)
    mask, sm_b, sm_r, has_mask = _mask_args(key_mask, x.device)
    common = (x, y, v, mask, cu_x, cu_y, grad_out, grad_factor)
    common_strides = (*x_strides, *y_strides, *_operand(v, y_seqs)[4], sm_b, sm_r, *_operand(grad_out, x_seqs)[4])
    upcast = _upcast(x, y, v, grad_out)
    packing = _packing(x_seqs, y_seqs)

    row_block, key_block = plan_blocks("rows", block_d, x.element_size())
    splits, keys_per_split = split_plan(n_keys, key_block, triton.cdiv(n_rows, row_block) * batch * heads,
                                        split_keys)
    atomic = not deterministic and splits > 1
    grad_x = _buffer(splits, x.shape, x.dtype, x.device, split_keys, atomic)
    if n_rows:
        _launch(gaussian_attention_bwd_rows_kernel, "rows", block_d, x.element_size(),
                lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), splits, batch * heads),
                (*common, grad_x, *common_strides, *_strides(grad_x), n_rows, n_keys, heads, heads // kv_heads,
                 keys_per_split, dim, dim_v, has_mask, scale, scale * LOG2_E), keys_per_split,
                ("GRAD_X",) if atomic else (), BLOCK_D=block_d, BLOCK_DV=block_d, UPCAST=upcast, ATOMIC=atomic,
                SCALED_GRAD=scaled_grad, **packing)

    key_block, row_block = plan_blocks("keys", block_d, x.element_size())
    splits, rows_per_split = split_plan(n_rows, row_block, triton.cdiv(n_keys, key_block) * batch * kv_heads,
                                        split_rows)
    atomic = not deterministic and splits > 1
    grad_y = _buffer(splits, y.shape, y.dtype, y.device, split_rows, atomic)
    grad_v = _buffer(splits, v.shape, v.dtype, v.device, split_rows, atomic)
    if n_keys:
        _launch(gaussian_attention_bwd_keys_kernel, "keys", block_d, x.element_size(),
                lambda meta: (triton.cdiv(n_keys, meta["BLOCK_K"]), splits, batch * kv_heads),
                (*common, grad_y, grad_v, *common_strides, *_strides(grad_y), *_strides(grad_v), n_rows, n_keys,
                 kv_heads, heads // kv_heads, rows_per_split, dim, dim_v, has_mask, scale,
                 scale * LOG2_E), rows_per_split * (heads // kv_heads), ("GRAD_Y", "GRAD_V") if atomic else (),
                BLOCK_D=block_d, BLOCK_DV=block_d, UPCAST=upcast, ATOMIC=atomic, SCALED_GRAD=scaled_grad,
                **packing)
    return grad_x, grad_y, grad_v
