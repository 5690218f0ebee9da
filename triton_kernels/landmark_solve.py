"""Stage 3, landmark solve: Y = W Z with W the Newton-Schulz approximation of (M + ridge I)^-1, M = kappa(L, L),
or the exact inverse by Cholesky, fused into one kernel launch forward and one backward (reference:
skyformer_ext.reference.landmark_gram and newton_schulz_inverse; the iteration and its exact reverse are those of
csrc/generic.cpp; the Cholesky policy that of skyformer_ext.solve).

A program per (batch, head) matrix runs the whole solve: the Gram M (the kappa tile of gaussian_tiles),
A = M + ridge I, d = rowsum(A)^-1/2, N = D A D, V0 = N^T / max_j colsum_j(N), ns_iters updates
V <- 1/4 V (13I - X(15I - X(7I - X))) with X = N V (all four products symmetric: polynomials in N, computed as
their upper tiles and mirrored), then Y = D V D Z, where Z is the key summary, given as
float32 split partials (S, b, H, m, p_v) that the kernel adds on load in the order s = 0..S-1 (deterministic).

Kernels:
- ``newton_schulz_fwd_kernel``: writes Y (input dtype) and the reduced Z (float32, which the backward takes).
- ``newton_schulz_bwd_kernel``: adds the dY partials the same way, recomputes the forward keeping every iterate
  V_k and the products X_k, X_k T1_k, X_k T2_k, walks the iteration backwards (reverse-mode, exactly what
  autograd of the reference computes) to dZ and dA = dM, then the Gram backward
  dL = scale * (H L - L * rowsum(H)), H = (dM + dM^T) * M. dZ grows with n (fp16 could overflow), so it is
  written as dZ / f in the input dtype with f (b, H) a per-matrix power of two, max|dZ / f| <= 1 (f = 1 for
  dZ = 0): the consumers multiply back by f, exactly.
- ``cholesky_fwd_kernel`` (inverse="cholesky"): Y = A^-1 Z, A = sym(M) + ridge I, by a blocked Cholesky factor
  and two block substitutions, with skyformer_ext.solve's failure policy on device (jitter retries, a status
  per matrix, NaN Y for a matrix that fails or has non-finite landmarks); also writes the reduced Z.
- ``cholesky_bwd_kernel``: refactors (the same factor and jitter), dZ = A^-1 dY, dA = -dZ Y^T, then the same
  Gram backward and the same scaled dZ output as newton_schulz_bwd_kernel.

Matrices up to 256 x 256 float32 do not fit in registers: each program keeps its matrices in its own slab of
a float32 global workspace (L2-resident on a GPU) and multiplies them with BLOCK x BLOCK tl.dot tiles; a
tl.debug_barrier() separates every phase that reads what other threads of the program wrote. Rows and
columns past m are never read (masked loads give 0) nor written, so padding cannot change a result.
Dot precision: see solve_config and cholesky_config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gaussian_tiles
from .gaussian_tiles import (INTERPRETER, LOG2_E, _accumulate_score_grad, _batch_and_heads, _kappa_rows_grad,
                             _kappa_tile, _load_tile, _load_tile_with_half_norm, _write_tile, head_block)

# The landmark count, split count and iteration count take any value (1 included) without recompiling.
RUNTIME_INTS = (*gaussian_tiles.RUNTIME_INTS, "splits", "ns_iters")
MAX_LANDMARKS = 256
MAX_HEAD_DIM = 256
M_PADS = (16, 32, 64, 128, 256)  # landmark-count buckets: next power of two of m, at least 16
# A launch has one program per (batch, head) matrix, about one per SM, so occupancy buys nothing: let ptxas use
# every register. Its default target for these call-heavy kernels (168) spilled in many configs (compile_check).
MAX_REGISTERS = 255


_kernel = gaussian_tiles.kernel_with_runtime_ints(RUNTIME_INTS)


# ---- blocked matrix helpers (operands in the program's float32 workspace) --------------------------------

# Not inlined: the kernels call it ~14 times, and inlined copies kept each other's addresses live (spills
# at every head dim) and multiplied compile time.
@triton.jit(noinline=True)
def _product(C, sc_r, sc_c, A, sa_r, sa_c, B, sb_r, sb_c, n_rows, n_inner, n_cols, alpha, accumulate, ROW_SCALE,
             BLOCK: tl.constexpr, PRECISION: tl.constexpr, A_SHIFT: tl.constexpr = 0.0,
             ROW_SCALED: tl.constexpr = False, SYMMETRIC: tl.constexpr = False):
    """C = alpha * A @ B + A_SHIFT * A [+ C when accumulate != 0] [rows scaled by ROW_SCALE], which is
    alpha * A @ (B + A_SHIFT / alpha * I): the iteration's A @ (cI - B) without forming cI - B.

    Operands are float32 strided matrices (a transpose is the swapped strides; A is square when A_SHIFT is
    used); C must not alias A or B. Returns max|C| over the written elements. SYMMETRIC (square C known to be
    symmetric: A and B commuting symmetric matrices): computes the tiles on and above the diagonal and writes
    each off-diagonal one also to its mirror, (T + 1) / 2T of the work for T x T tiles.
    """
    offsets = tl.arange(0, BLOCK)
    keep_old = (offsets * 0 + accumulate) != 0
    amax = 0.0
    for row0 in range(0, n_rows, BLOCK):
        row_in = (row0 + offsets < n_rows)[:, None]
        for col0 in range(row0 if SYMMETRIC else 0, n_cols, BLOCK):
            col_in = (col0 + offsets < n_cols)[None, :]
            a_tile = A + (row0 + offsets)[:, None] * sa_r + offsets[None, :] * sa_c
            b_tile = B + offsets[:, None] * sb_r + (col0 + offsets)[None, :] * sb_c
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k0 in range(0, n_inner, BLOCK):
                k_in = k0 + offsets < n_inner
                a = tl.load(a_tile, mask=row_in & k_in[None, :], other=0.0)
                b = tl.load(b_tile, mask=k_in[:, None] & col_in, other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_tile += BLOCK * sa_c
                b_tile += BLOCK * sb_r
            out = alpha * acc
            if A_SHIFT != 0.0:
                out += A_SHIFT * _load_tile(A, row0, n_rows, sa_r, sa_c, n_cols - col0, BLOCK, BLOCK, False, None,
                                            col0)
            if ROW_SCALED:
                out = out * _vector(ROW_SCALE, row0, n_rows, BLOCK)[:, None]
            out += _load_tile(C, row0, n_rows, sc_r, sc_c, n_cols - col0, BLOCK, BLOCK, False, keep_old, col0)
            amax = tl.maximum(amax, tl.max(tl.abs(out)))
            _write_tile(C, out, row0, n_rows, sc_r, sc_c, n_cols, BLOCK, BLOCK, False, col0)
            if SYMMETRIC:
                if col0 != row0:  # the diagonal tile is written once: its mirror would race with it
                    _write_tile(C, out, row0, n_rows, sc_c, sc_r, n_cols, BLOCK, BLOCK, False, col0)
    return amax


@triton.jit
def _square(S, row0, col0, m, ld, BLOCK: tl.constexpr):
    """The (row0, col0) tile of an m x m workspace matrix with row stride ld."""
    return _load_tile(S, row0, m, ld, 1, m - col0, BLOCK, BLOCK, False, None, col0)


@triton.jit
def _square_t(S, row0, col0, m, ld, BLOCK: tl.constexpr):
    """The (row0, col0) tile of the transpose of an m x m workspace matrix."""
    return _load_tile(S, row0, m, 1, ld, m - col0, BLOCK, BLOCK, False, None, col0)


@triton.jit
def _vector(VEC, start, n, BLOCK: tl.constexpr):
    offsets = start + tl.arange(0, BLOCK)
    return tl.load(VEC + offsets, mask=offsets < n, other=0.0)


@triton.jit
def _store_vector(VEC, values, start, n, BLOCK: tl.constexpr):
    offsets = start + tl.arange(0, BLOCK)
    tl.store(VEC + offsets, values, mask=offsets < n)


@triton.jit
def _product_sums(P, Q, row0, m, ld, BLOCK: tl.constexpr):
    """rowsum_k(P * Q) + colsum_k(P * Q) for the rows k of one tile: the two ways index k enters P * Q."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for col0 in range(0, m, BLOCK):
        total += tl.sum(_square(P, row0, col0, m, ld, BLOCK) * _square(Q, row0, col0, m, ld, BLOCK)
                        + _square_t(P, row0, col0, m, ld, BLOCK) * _square_t(Q, row0, col0, m, ld, BLOCK), axis=1)
    return total


@triton.jit
def _reduce_partials(P, sp_s, sp_r, sp_d, splits, m, dim_v, D_VEC, OUT, so_r, so_d, SCALED, ld_v,
                     BLOCK: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_SCALED: tl.constexpr = True):
    """Sum the split partials P[0..splits-1] (m x dim_v) in order; write the sum to OUT (if WRITE_OUT) and
    D times the sum to the workspace matrix SCALED (if WRITE_SCALED)."""
    for row0 in range(0, m, BLOCK):
        if WRITE_SCALED:
            d = _vector(D_VEC, row0, m, BLOCK)
        for col0 in range(0, dim_v, BLOCK):
            total = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            partial = P
            for _ in range(0, splits):
                total += _load_tile(partial, row0, m, sp_r, sp_d, dim_v - col0, BLOCK, BLOCK, False, None, col0)
                partial += sp_s
            if WRITE_OUT:
                _write_tile(OUT, total, row0, m, so_r, so_d, dim_v, BLOCK, BLOCK, False, col0)
            if WRITE_SCALED:
                _write_tile(SCALED, d[:, None] * total, row0, m, ld_v, 1, dim_v, BLOCK, BLOCK, False, col0)


@triton.jit
def _write_gram(L, sl_r, sl_d, m, dim, scale_log2, ridge, OUT, ld, INV_SQRT_ROW_SUMS, GRAM_BLOCK: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, GRAM_PRECISION: tl.constexpr,
                STORE_INV_SQRT_ROW_SUMS: tl.constexpr):
    """OUT = kappa(L, L) + ridge I (m x m, row stride ld) and, if STORE_INV_SQRT_ROW_SUMS, rowsum(OUT)^-1/2 into
    the vector INV_SQRT_ROW_SUMS. Returns (max_i |OUT_ii|, the number of landmarks whose norm is not finite)."""
    offsets = tl.arange(0, GRAM_BLOCK)
    max_diagonal = 0.0
    non_finite = 0
    for row0 in range(0, m, GRAM_BLOCK):
        a, a_half = _load_tile_with_half_norm(L, row0, m, sl_r, sl_d, dim, scale_log2, GRAM_BLOCK, BLOCK_D, UPCAST)
        # Judged from the norms: kappa clamps its exponent, and a GPU's min() turns NaN into that bound (1).
        non_finite += tl.sum(tl.where(a_half < float("inf"), 0, 1))
        row_sum = tl.zeros((GRAM_BLOCK,), dtype=tl.float32)
        for col0 in range(0, m, GRAM_BLOCK):
            b, b_half = _load_tile_with_half_norm(L, col0, m, sl_r, sl_d, dim, scale_log2, GRAM_BLOCK, BLOCK_D,
                                                  UPCAST)
            diagonal = (row0 + offsets)[:, None] == (col0 + offsets)[None, :]
            tile = _kappa_tile(a, a_half, b, b_half, scale_log2, GRAM_PRECISION) + tl.where(diagonal, ridge, 0.0)
            # Columns past m hold kappa(L_i, 0) != 0: not part of A.
            tile = tl.where((col0 + offsets < m)[None, :], tile, 0.0)
            max_diagonal = tl.maximum(max_diagonal, tl.max(tl.where(diagonal, tl.abs(tile), 0.0)))
            row_sum += tl.sum(tile, axis=1)
            _write_tile(OUT, tile, row0, m, ld, 1, m, GRAM_BLOCK, GRAM_BLOCK, False, col0)
        if STORE_INV_SQRT_ROW_SUMS:
            _store_vector(INV_SQRT_ROW_SUMS, tl.math.rsqrt(row_sum), row0, m, GRAM_BLOCK)
    return max_diagonal, non_finite


# ---- the forward iteration, shared by both kernels ----------------------------------------------------

@triton.jit
def _newton_schulz_forward(L, sl_r, sl_d, m, dim, scale_log2, ridge, ns_iters, WS, ld, iterate_slots,
                           product_slots, D_VEC, COLSUM, BLOCK: tl.constexpr, GRAM_BLOCK: tl.constexpr,
                           BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           GRAM_PRECISION: tl.constexpr):
    """Runs the iteration in the workspace: N in slot 0, V_k in slot 1 + k % iterate_slots, and X_k, X_k T1_k,
    X_k T2_k in the three slots at 1 + iterate_slots + 3 * (k % product_slots). Writes d and colsum(N);
    returns the step size s = max_j colsum_j(N)."""
    size = ld * ld
    N = WS
    # A = kappa(L, L) + ridge I into N's slot, and d = rowsum(A)^-1/2.
    _write_gram(L, sl_r, sl_d, m, dim, scale_log2, ridge, N, ld, D_VEC, GRAM_BLOCK, BLOCK_D, UPCAST, GRAM_PRECISION,
                True)
    tl.debug_barrier()

    # N = D A D in place (each element read and written by the same tile pass), its column sums and max.
    step = 0.0
    for col0 in range(0, m, BLOCK):
        d_col = _vector(D_VEC, col0, m, BLOCK)
        col_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for row0 in range(0, m, BLOCK):
            tile = _vector(D_VEC, row0, m, BLOCK)[:, None] * _square(N, row0, col0, m, ld, BLOCK) * d_col[None, :]
            _write_tile(N, tile, row0, m, ld, 1, m, BLOCK, BLOCK, False, col0)
            col_sum += tl.sum(tile, axis=0)
        _store_vector(COLSUM, col_sum, col0, m, BLOCK)
        step = tl.maximum(step, tl.max(col_sum))  # colsums are > 0; padded ones are 0
    tl.debug_barrier()

    V = WS + size
    for row0 in range(0, m, BLOCK):
        for col0 in range(0, m, BLOCK):
            _write_tile(V, _square_t(N, row0, col0, m, ld, BLOCK) / step, row0, m, ld, 1, m, BLOCK, BLOCK, False,
                        col0)
    tl.debug_barrier()

    for k in range(0, ns_iters):
        V = WS + (1 + k % iterate_slots) * size
        V_next = WS + (1 + (k + 1) % iterate_slots) * size
        X = WS + (1 + iterate_slots + 3 * (k % product_slots)) * size
        XT1 = X + size
        XT2 = X + 2 * size
        # N is symmetric and every iterate a polynomial in N, so all four products are symmetric.
        _product(X, ld, 1, N, ld, 1, V, ld, 1, m, m, m, 1.0, 0, D_VEC, BLOCK, PRECISION, SYMMETRIC=True)
        tl.debug_barrier()
        _product(XT1, ld, 1, X, ld, 1, X, ld, 1, m, m, m, -1.0, 0, D_VEC, BLOCK, PRECISION, 7.0, SYMMETRIC=True)
        tl.debug_barrier()
        _product(XT2, ld, 1, X, ld, 1, XT1, ld, 1, m, m, m, -1.0, 0, D_VEC, BLOCK, PRECISION, 15.0, SYMMETRIC=True)
        tl.debug_barrier()
        _product(V_next, ld, 1, V, ld, 1, XT2, ld, 1, m, m, m, -0.25, 0, D_VEC, BLOCK, PRECISION, 3.25,
                 SYMMETRIC=True)
        tl.debug_barrier()
    return step


@triton.jit
def _program_start(L, sl_b, sl_h, WS, ws_stride, heads):
    pid = tl.program_id(0)
    batch, head, _ = _batch_and_heads(pid, heads, 1)
    return pid, batch, head, L + batch * sl_b + head * sl_h, WS + pid.to(tl.int64) * ws_stride


# ---- kernels -----------------------------------------------------------------------------------------

@_kernel
def newton_schulz_fwd_kernel(
        L, Z_PARTIALS, Y, Z, WS,
        sl_b, sl_h, sl_r, sl_d, sp_s, sp_b, sp_h, sp_r, sp_d, sy_b, sy_h, sy_r, sy_d, sz_b, sz_h, sz_r, sz_d,
        m, heads, dim, dim_v, splits, ns_iters, ld, ld_v, wide_offset, vector_offset, ws_stride, scale_log2, ridge,
        BLOCK: tl.constexpr, GRAM_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr):
    """Workspace: N, V (two slots, alternating), X, X T1, X T2; D Z (m x dim_v); vectors d, colsum(N)."""
    _, batch, head, l_base, ws = _program_start(L, sl_b, sl_h, WS, ws_stride, heads)
    D_VEC = ws + vector_offset
    scaled_summary = ws + wide_offset
    _newton_schulz_forward(l_base, sl_r, sl_d, m, dim, scale_log2, ridge, ns_iters, ws, ld, 2, 1, D_VEC,
                           D_VEC + ld, BLOCK, GRAM_BLOCK, BLOCK_D, UPCAST, PRECISION, GRAM_PRECISION)
    _reduce_partials(Z_PARTIALS + batch * sp_b + head * sp_h, sp_s, sp_r, sp_d, splits, m, dim_v, D_VEC,
                     Z + batch * sz_b + head * sz_h, sz_r, sz_d, scaled_summary, ld_v, BLOCK, True)
    tl.debug_barrier()
    # Y = D V D Z = d * (V @ (D Z)).
    v_last = ws + (1 + ns_iters % 2) * ld * ld
    _product(Y + batch * sy_b + head * sy_h, sy_r, sy_d, v_last, ld, 1, scaled_summary, ld_v, 1, m, m, dim_v,
             1.0, 0, D_VEC, BLOCK, PRECISION, ROW_SCALED=True)


@triton.jit
def _power_of_two_at_least(x):
    """The smallest power of two >= x for a float32 x > 0, from its bits (exact), and 1 for x = 0."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.where(x > 0, (exponent << 23).to(tl.float32, bitcast=True), 1.0)


@triton.jit
def _copy_divided(SRC, ld_src, DST, sd_r, sd_d, m, dim_v, divisor, BLOCK: tl.constexpr):
    """DST = SRC / divisor for an m x dim_v workspace matrix SRC (row stride ld_src), cast to DST's type."""
    for row0 in range(0, m, BLOCK):
        for col0 in range(0, dim_v, BLOCK):
            tile = _load_tile(SRC, row0, m, ld_src, 1, dim_v - col0, BLOCK, BLOCK, False, None, col0)
            _write_tile(DST, tile / divisor, row0, m, sd_r, sd_d, dim_v, BLOCK, BLOCK, False, col0)


@triton.jit
def _store_scaled_grad(GRAD_SUMMARY, ld_v, grad_max, GRAD_FACTOR, GRAD_Z, sdz_r, sdz_d, m, dim_v,
                       BLOCK: tl.constexpr):
    """dZ (workspace, max|dZ| = grad_max) as dZ / f into GRAD_Z and f into GRAD_FACTOR (see the module doc)."""
    factor = _power_of_two_at_least(grad_max)
    tl.store(GRAD_FACTOR, factor)
    _copy_divided(GRAD_SUMMARY, ld_v, GRAD_Z, sdz_r, sdz_d, m, dim_v, factor, BLOCK)


@triton.jit
def _gram_backward(L, sl_r, sl_d, m, dim, scale, scale_log2, GRAD_M, ld, GRAD_L, sdl_r, sdl_d,
                   GRAM_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                   GRAM_PRECISION: tl.constexpr):
    """dL_i = scale * (H L - L * rowsum(H))_i, H = (dM + dM^T) * kappa(L, L), dM in the workspace (row stride ld)."""
    for row0 in range(0, m, GRAM_BLOCK):
        a, a_half = _load_tile_with_half_norm(L, row0, m, sl_r, sl_d, dim, scale_log2, GRAM_BLOCK, BLOCK_D, UPCAST)
        acc = tl.zeros((GRAM_BLOCK, BLOCK_D), dtype=tl.float32)
        row_sum = tl.zeros((GRAM_BLOCK,), dtype=tl.float32)
        for col0 in range(0, m, GRAM_BLOCK):
            b, b_half = _load_tile_with_half_norm(L, col0, m, sl_r, sl_d, dim, scale_log2, GRAM_BLOCK, BLOCK_D,
                                                  UPCAST)
            kappa = _kappa_tile(a, a_half, b, b_half, scale_log2, GRAM_PRECISION)
            symmetric = (_square(GRAD_M, row0, col0, m, ld, GRAM_BLOCK)
                         + _square_t(GRAD_M, row0, col0, m, ld, GRAM_BLOCK))
            # H @ L in float32: a half-precision H would cost dL ~3 digits.
            acc, row_sum = _accumulate_score_grad(acc, row_sum, symmetric * kappa, b.to(tl.float32),
                                                  GRAM_PRECISION)
        _write_tile(GRAD_L, _kappa_rows_grad(acc, a, row_sum, scale), row0, m, sdl_r, sdl_d, dim, GRAM_BLOCK,
                    BLOCK_D, False)


@_kernel
def newton_schulz_bwd_kernel(
        GRAD_PARTIALS, L, Z, GRAD_Z, GRAD_FACTOR, GRAD_L, WS,
        sg_s, sg_b, sg_h, sg_r, sg_d, sl_b, sl_h, sl_r, sl_d, sz_b, sz_h, sz_r, sz_d,
        sdz_b, sdz_h, sdz_r, sdz_d, sdl_b, sdl_h, sdl_r, sdl_d,
        m, heads, dim, dim_v, splits, ns_iters, ld, ld_v, wide_offset, vector_offset, ws_stride, scale, scale_log2,
        ridge, BLOCK: tl.constexpr, GRAM_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr):
    """Workspace: N, V_0..V_iters, (X, X T1, X T2) per iteration, then dV (two slots, alternating), dT3, dT2,
    dX, dN; D Z, D dY, dZ (m x dim_v); vectors d, colsum(N), the d-gradient sums, the rowsum gradient."""
    pid, batch, head, l_base, ws = _program_start(L, sl_b, sl_h, WS, ws_stride, heads)
    size = ld * ld
    D_VEC = ws + vector_offset
    COLSUM = D_VEC + ld
    D_GRAD_SUMS = D_VEC + 2 * ld
    ROWSUM_GRAD = D_VEC + 3 * ld
    scaled_summary = ws + wide_offset
    scaled_grad = scaled_summary + ld * ld_v
    grad_summary = scaled_grad + ld * ld_v
    N = ws
    step = _newton_schulz_forward(l_base, sl_r, sl_d, m, dim, scale_log2, ridge, ns_iters, ws, ld, ns_iters + 1,
                                  ns_iters, D_VEC, COLSUM, BLOCK, GRAM_BLOCK, BLOCK_D, UPCAST, PRECISION,
                                  GRAM_PRECISION)
    v_last = ws + (1 + ns_iters) * size
    grads = ws + (2 + 4 * ns_iters) * size
    grad_t3 = grads + 2 * size
    grad_t2 = grads + 3 * size
    grad_x = grads + 4 * size
    grad_n = grads + 5 * size

    _reduce_partials(Z + batch * sz_b + head * sz_h, 0, sz_r, sz_d, 1, m, dim_v, D_VEC, Z, 0, 0, scaled_summary,
                     ld_v, BLOCK, False)
    _reduce_partials(GRAD_PARTIALS + batch * sg_b + head * sg_h, sg_s, sg_r, sg_d, splits, m, dim_v, D_VEC, Z, 0,
                     0, scaled_grad, ld_v, BLOCK, False)
    tl.debug_barrier()

    # Y = W Z with W = D V D: dZ = W^T dY = d * (V^T @ (D dY)); dV = D dW D = (D dY) @ (D Z)^T.
    grad_max = _product(grad_summary, ld_v, 1, v_last, 1, ld, scaled_grad, ld_v, 1, m, m, dim_v, 1.0, 0, D_VEC,
                        BLOCK, PRECISION, ROW_SCALED=True)
    _product(grads, ld, 1, scaled_grad, ld_v, 1, scaled_summary, 1, ld_v, m, dim_v, m, 1.0, 0, D_VEC, BLOCK,
             PRECISION)
    tl.debug_barrier()
    _store_scaled_grad(grad_summary, ld_v, grad_max, GRAD_FACTOR + pid, GRAD_Z + batch * sdz_b + head * sdz_h,
                       sdz_r, sdz_d, m, dim_v, BLOCK)
    # dW's part of dd_k (times d_k): sum_j dW_kj V_kj d_j d_k + sum_i dW_ik V_ik d_i d_k, from dV = D dW D.
    for row0 in range(0, m, BLOCK):
        _store_vector(D_GRAD_SUMS, _product_sums(grads, v_last, row0, m, ld, BLOCK), row0, m, BLOCK)

    # Reverse of V' = 1/4 V T3, T3 = 13I - X T2, T2 = 15I - X T1, T1 = 7I - X, X = N V.
    for step_back in range(0, ns_iters):
        k = ns_iters - 1 - step_back
        grad_v = grads + (step_back % 2) * size
        grad_v_prev = grads + ((step_back + 1) % 2) * size
        V = ws + (1 + k) * size
        X = ws + (2 + ns_iters + 3 * k) * size
        XT1 = X + size
        XT2 = X + 2 * size
        # dT3 = 1/4 V^T dV';  dV = 1/4 dV' T3^T
        _product(grad_t3, ld, 1, V, 1, ld, grad_v, ld, 1, m, m, m, 0.25, 0, D_VEC, BLOCK, PRECISION)
        _product(grad_v_prev, ld, 1, grad_v, ld, 1, XT2, 1, ld, m, m, m, -0.25, 0, D_VEC, BLOCK, PRECISION, 3.25)
        tl.debug_barrier()
        # dT2 = -X^T dT3;  dX = -dT3 T2^T - dT2 T1^T - dT1 with dT1 = -X^T dT2
        _product(grad_t2, ld, 1, X, 1, ld, grad_t3, ld, 1, m, m, m, -1.0, 0, D_VEC, BLOCK, PRECISION)
        _product(grad_x, ld, 1, grad_t3, ld, 1, XT1, 1, ld, m, m, m, 1.0, 0, D_VEC, BLOCK, PRECISION, -15.0)
        tl.debug_barrier()
        _product(grad_x, ld, 1, grad_t2, ld, 1, X, 1, ld, m, m, m, 1.0, 1, D_VEC, BLOCK, PRECISION, -7.0)
        tl.debug_barrier()
        _product(grad_x, ld, 1, X, 1, ld, grad_t2, ld, 1, m, m, m, 1.0, 1, D_VEC, BLOCK, PRECISION)
        tl.debug_barrier()
        # dN += dX V^T;  dV += N^T dX
        _product(grad_n, ld, 1, grad_x, ld, 1, V, 1, ld, m, m, m, 1.0, step_back, D_VEC, BLOCK, PRECISION)
        _product(grad_v_prev, ld, 1, N, 1, ld, grad_x, ld, 1, m, m, m, 1.0, 1, D_VEC, BLOCK, PRECISION)
        tl.debug_barrier()

    # V_0 = N^T / s, s = max_j colsum_j(N): dN += dV_0^T / s, and ds = -sum(dV_0 * V_0) / s goes to the
    # maximal column(s), shared evenly among ties (as autograd's amax does).
    grad_v0 = grads + (ns_iters % 2) * size
    v0 = ws + size
    grad_v0_dot = 0.0
    ties = 0.0
    for row0 in range(0, m, BLOCK):
        for col0 in range(0, m, BLOCK):
            grad_v0_dot += tl.sum(_square(grad_v0, row0, col0, m, ld, BLOCK) * _square(v0, row0, col0, m, ld, BLOCK))
        ties += tl.sum((_vector(COLSUM, row0, m, BLOCK) == step).to(tl.float32))
    grad_step_share = -grad_v0_dot / step / ties
    for row0 in range(0, m, BLOCK):
        for col0 in range(0, m, BLOCK):
            is_max = (_vector(COLSUM, col0, m, BLOCK) == step).to(tl.float32)
            tile = (_square(grad_n, row0, col0, m, ld, BLOCK) + _square_t(grad_v0, row0, col0, m, ld, BLOCK) / step
                    + grad_step_share * is_max[None, :])
            _write_tile(grad_n, tile, row0, m, ld, 1, m, BLOCK, BLOCK, False, col0)
    tl.debug_barrier()

    # N = D A D, d = rowsum(A)^-1/2: dd_k = (sums_k + sum_j dN_kj N_kj + sum_i dN_ik N_ik) / d_k, and
    # d rowsum_k = -1/2 dd_k d_k^3.
    for row0 in range(0, m, BLOCK):
        d = _vector(D_VEC, row0, m, BLOCK)
        sums = _vector(D_GRAD_SUMS, row0, m, BLOCK) + _product_sums(grad_n, N, row0, m, ld, BLOCK)
        _store_vector(ROWSUM_GRAD, -0.5 * sums * d * d, row0, m, BLOCK)
    tl.debug_barrier()
    # dM = dA = D dN D + d rowsum (broadcast along rows), in place of dN.
    for row0 in range(0, m, BLOCK):
        d_row = _vector(D_VEC, row0, m, BLOCK)
        rowsum_grad = _vector(ROWSUM_GRAD, row0, m, BLOCK)
        for col0 in range(0, m, BLOCK):
            tile = (d_row[:, None] * _square(grad_n, row0, col0, m, ld, BLOCK) * _vector(D_VEC, col0, m, BLOCK)[None, :]
                    + rowsum_grad[:, None])
            _write_tile(grad_n, tile, row0, m, ld, 1, m, BLOCK, BLOCK, False, col0)
    tl.debug_barrier()

    # Gram backward with dM = dA.
    _gram_backward(l_base, sl_r, sl_d, m, dim, scale, scale_log2, grad_n, ld, GRAD_L + batch * sdl_b + head * sdl_h,
                   sdl_r, sdl_d, GRAM_BLOCK, BLOCK_D, UPCAST, GRAM_PRECISION)


# ---- Cholesky: factor with the failure policy, substitutions ------------------------------------------

# skyformer_ext.solve's failure policy and status codes (tests check that these agree).
FLOAT32_EPS: tl.constexpr = tl.constexpr(2.0 ** -23)
MAX_JITTER_STEPS: tl.constexpr = tl.constexpr(3)
JITTER_GROWTH: tl.constexpr = tl.constexpr(10.0)
NOT_POSITIVE_DEFINITE: tl.constexpr = tl.constexpr(MAX_JITTER_STEPS + 1)
NON_FINITE: tl.constexpr = tl.constexpr(-1)


@triton.jit
def _symmetric_tile(M, row0, col0, m, ld, BLOCK: tl.constexpr):
    """The (row0, col0) tile of sym(M) = (M + M^T) / 2."""
    return 0.5 * (_square(M, row0, col0, m, ld, BLOCK) + _square_t(M, row0, col0, m, ld, BLOCK))


@triton.jit
def _minus_factored(tile, FACTOR, row0, col0, ld, m, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """tile - sum_{k0 < col0} L[row0, k0] L[col0, k0]^T over the factor's blocks left of block column col0."""
    taken = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, col0, BLOCK):
        taken = tl.dot(_square(FACTOR, row0, k0, m, ld, BLOCK), _square_t(FACTOR, k0, col0, m, ld, BLOCK), taken,
                       input_precision=PRECISION)
    return tile - taken


# Inlined, like the substitutions: as calls, the values live across them spilled. The forward and backward
# kernels run this same code on the same M, so they get the same factor and status.
@triton.jit
def _cholesky_factor(M, FACTOR, DIAG_INV, m, ld, shift, tau, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Left-looking blocked Cholesky A = L L^T of A = sym(M) + shift I. Block column col0: its diagonal block
    minus the factored columns is factored in registers (unblocked, a pivot <= tau counts as a failure and is
    replaced by 1), together with its inverse; the blocks below are (A - factored) L_jj^-T, one tl.dot each.
    Writes L's strictly lower blocks to FACTOR and inv(L_jj) to the diagonal blocks of DIAG_INV (upper blocks
    and L_jj itself are never needed). Returns the number of failed pivots."""
    offsets = tl.arange(0, BLOCK)
    rows = offsets[:, None]
    cols = offsets[None, :]
    failures = 0
    for col0 in range(0, m, BLOCK):
        tile = _minus_factored(_symmetric_tile(M, col0, col0, m, ld, BLOCK), FACTOR, col0, col0, ld, m, BLOCK,
                               PRECISION)
        # Rows past m: the identity, whose pivots (1) change nothing.
        tile = tl.where(rows == cols, tl.where((col0 + offsets < m)[:, None], tile + shift, 1.0), tile)
        # The lower triangle mirrored: row k below is then column k bit for bit.
        tile = tl.where(rows >= cols, tile, tl.trans(tile))
        inverse = tl.where(rows == cols, 1.0, 0.0)
        for k in range(0, BLOCK):
            column = tl.sum(tl.where(cols == k, tile, 0.0), axis=1)
            row = tl.sum(tl.where(rows == k, tile, 0.0), axis=0)
            pivot = tl.sum(tl.where(offsets == k, column, 0.0))
            failures += tl.where(pivot > tau, 0, 1)
            root = tl.sqrt_rn(tl.where(pivot > tau, pivot, 1.0))
            l_column = tl.where(offsets >= k, tl.div_rn(column, root), 0.0)  # L[:, k]
            l_row = tl.where(offsets >= k, tl.div_rn(row, root), 0.0)  # the same, along columns
            tile -= l_column[:, None] * l_row[None, :]
            # inv(L) row by row: X_k = R_k / L_kk, then R_r -= L_rk X_k below (R starts as I).
            inverse_row = tl.div_rn(tl.sum(tl.where(rows == k, inverse, 0.0), axis=0), root)
            inverse = tl.where(rows == k, inverse_row[None, :],
                               inverse - tl.where(offsets > k, l_column, 0.0)[:, None] * inverse_row[None, :])
        _write_tile(DIAG_INV, inverse, col0, m, ld, 1, m, BLOCK, BLOCK, False, col0)
        inverse_t = tl.trans(inverse)
        for row0 in range(col0 + BLOCK, m, BLOCK):
            panel = _minus_factored(_symmetric_tile(M, row0, col0, m, ld, BLOCK), FACTOR, row0, col0, ld, m, BLOCK,
                                    PRECISION)
            _write_tile(FACTOR, tl.dot(panel, inverse_t, input_precision=PRECISION), row0, m, ld, 1, m, BLOCK, BLOCK,
                        False, col0)
        tl.debug_barrier()
    return failures


@triton.jit
def _factor_with_jitter(M, FACTOR, DIAG_INV, m, ld, ridge, max_diagonal, non_finite, BLOCK: tl.constexpr,
                        PRECISION: tl.constexpr):
    """skyformer_ext.solve's failure policy on device. tau = m * eps * max_i |M_ii| (1 if that is 0); factor
    sym(M) + ridge I, and after a failure sym(M) + (ridge + tau 10^s) I for s = 1..MAX_JITTER_STEPS. Returns
    the status: 0, the step s that succeeded, NOT_POSITIVE_DEFINITE, or NON_FINITE (nothing factored)."""
    tau = m * FLOAT32_EPS * tl.where(max_diagonal == 0, 1.0, max_diagonal)
    # Only the status is carried through the attempts (more loop-carried scalars spilled): attempt s runs
    # while status == s and moves it to s + 1 on failure, so that all failing ends at MAX_JITTER_STEPS + 1.
    status = tl.where(non_finite == 0, 0, NON_FINITE)
    jitter = 0.0
    for attempt in range(0, MAX_JITTER_STEPS + 1):
        if status == attempt:
            failures = _cholesky_factor(M, FACTOR, DIAG_INV, m, ld, ridge + jitter * tau, tau, BLOCK, PRECISION)
            status += tl.where(failures > 0, 1, 0)
        jitter = tl.maximum(jitter * JITTER_GROWTH, JITTER_GROWTH)
    return status


@triton.jit
def _gram_and_factor(L, sl_r, sl_d, m, dim, scale_log2, ridge, M, FACTOR, DIAG_INV, ld, BLOCK: tl.constexpr,
                     GRAM_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr):
    """M = kappa(L, L) into the workspace and the factor of sym(M) + ridge I (+ jitter); returns the status."""
    max_diagonal, non_finite = _write_gram(L, sl_r, sl_d, m, dim, scale_log2, 0.0, M, ld, M, GRAM_BLOCK, BLOCK_D,
                                           UPCAST, GRAM_PRECISION, False)
    tl.debug_barrier()
    return _factor_with_jitter(M, FACTOR, DIAG_INV, m, ld, ridge, max_diagonal, non_finite, BLOCK, PRECISION)


@triton.jit
def _substitution(OUT, RHS, sr_r, sr_c, FACTOR, DIAG_INV, m, dim_v, ld, ld_v, poison, TRANSPOSED: tl.constexpr,
                  BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """OUT = T^-1 RHS (m x dim_v, row stride ld_v) for T = L (forward substitution) or L^T (TRANSPOSED: back
    substitution), a block row at a time: X_i = inv(T_ii) (RHS_i - sum_k T_ik X_k) over the rows k solved
    before. All NaN if poison. Returns max|OUT|."""
    if TRANSPOSED:  # L^T is L with the strides swapped
        t_r = 1
        t_c = ld
    else:
        t_r = ld
        t_c = 1
    blocks = tl.cdiv(m, BLOCK)
    amax = 0.0
    for step in range(0, blocks):
        if TRANSPOSED:
            row0 = (blocks - 1 - step) * BLOCK
            solved_start = row0 + BLOCK
            solved_stop = m
        else:
            row0 = step * BLOCK
            solved_start = 0
            solved_stop = row0
        inverse = _load_tile(DIAG_INV, row0, m, t_r, t_c, m - row0, BLOCK, BLOCK, False, None, row0)
        for col0 in range(0, dim_v, BLOCK):
            taken = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k0 in range(solved_start, solved_stop, BLOCK):
                taken = tl.dot(_load_tile(FACTOR, row0, m, t_r, t_c, m - k0, BLOCK, BLOCK, False, None, k0),
                               _load_tile(OUT, k0, m, ld_v, 1, dim_v - col0, BLOCK, BLOCK, False, None, col0), taken,
                               input_precision=PRECISION)
            rest = _load_tile(RHS, row0, m, sr_r, sr_c, dim_v - col0, BLOCK, BLOCK, False, None, col0) - taken
            solved = tl.where(poison, float("nan"), tl.dot(inverse, rest, input_precision=PRECISION))
            amax = tl.maximum(amax, tl.max(tl.abs(solved)))
            _write_tile(OUT, solved, row0, m, ld_v, 1, dim_v, BLOCK, BLOCK, False, col0)
        tl.debug_barrier()
    return amax


@triton.jit
def _cholesky_solve(OUT, RHS, sr_r, sr_c, SCRATCH, FACTOR, DIAG_INV, m, dim_v, ld, ld_v, poison,
                    BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """OUT = (L L^T)^-1 RHS through SCRATCH = L^-1 RHS (both m x dim_v workspace matrices); returns max|OUT|."""
    _substitution(SCRATCH, RHS, sr_r, sr_c, FACTOR, DIAG_INV, m, dim_v, ld, ld_v, poison, False, BLOCK, PRECISION)
    return _substitution(OUT, SCRATCH, ld_v, 1, FACTOR, DIAG_INV, m, dim_v, ld, ld_v, poison, True, BLOCK,
                         PRECISION)


@_kernel
def cholesky_fwd_kernel(
        L, Z_PARTIALS, Y, Z, STATUS, WS,
        sl_b, sl_h, sl_r, sl_d, sp_s, sp_b, sp_h, sp_r, sp_d, sy_b, sy_h, sy_r, sy_d, sz_b, sz_h, sz_r, sz_d,
        m, heads, dim, dim_v, splits, ld, ld_v, wide_offset, ws_stride, scale_log2, ridge,
        BLOCK: tl.constexpr, GRAM_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr):
    """Workspace: M, L's blocks, inv(L_jj); L^-1 Z and Y (m x dim_v)."""
    pid, batch, head, l_base, ws = _program_start(L, sl_b, sl_h, WS, ws_stride, heads)
    factor = ws + ld * ld
    diag_inv = factor + ld * ld
    scratch = ws + wide_offset
    values = scratch + ld * ld_v
    summary = Z + batch * sz_b + head * sz_h
    # First, so that none of its arguments stays live through the factorization (they spilled).
    _reduce_partials(Z_PARTIALS + batch * sp_b + head * sp_h, sp_s, sp_r, sp_d, splits, m, dim_v, ws, summary, sz_r,
                     sz_d, ws, ld_v, BLOCK, True, False)
    status = _gram_and_factor(l_base, sl_r, sl_d, m, dim, scale_log2, ridge, ws, factor, diag_inv, ld, BLOCK,
                              GRAM_BLOCK, BLOCK_D, UPCAST, PRECISION, GRAM_PRECISION)
    tl.store(STATUS + pid, status)
    bad = (status == NON_FINITE) | (status == NOT_POSITIVE_DEFINITE)
    _cholesky_solve(values, summary, sz_r, sz_d, scratch, factor, diag_inv, m, dim_v, ld, ld_v, bad, BLOCK,
                    PRECISION)
    _copy_divided(values, ld_v, Y + batch * sy_b + head * sy_h, sy_r, sy_d, m, dim_v, 1.0, BLOCK)


@_kernel
def cholesky_bwd_kernel(
        GRAD_PARTIALS, L, Z, GRAD_Z, GRAD_FACTOR, GRAD_L, WS,
        sg_s, sg_b, sg_h, sg_r, sg_d, sl_b, sl_h, sl_r, sl_d, sz_b, sz_h, sz_r, sz_d,
        sdz_b, sdz_h, sdz_r, sdz_d, sdl_b, sdl_h, sdl_r, sdl_d,
        m, heads, dim, dim_v, splits, ld, ld_v, wide_offset, ws_stride, scale, scale_log2, ridge,
        BLOCK: tl.constexpr, GRAM_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr):
    """Workspace: M, L's blocks, inv(L_jj), dA; a substitution scratch, Y, dY, dZ (m x dim_v)."""
    pid, batch, head, l_base, ws = _program_start(L, sl_b, sl_h, WS, ws_stride, heads)
    size = ld * ld
    wide = ld * ld_v
    factor = ws + size
    diag_inv = factor + size
    grad_gram = diag_inv + size
    scratch = ws + wide_offset
    values = scratch + wide
    grad_values = values + wide
    grad_summary = grad_values + wide
    status = _gram_and_factor(l_base, sl_r, sl_d, m, dim, scale_log2, ridge, ws, factor, diag_inv, ld, BLOCK,
                              GRAM_BLOCK, BLOCK_D, UPCAST, PRECISION, GRAM_PRECISION)
    _reduce_partials(GRAD_PARTIALS + batch * sg_b + head * sg_h, sg_s, sg_r, sg_d, splits, m, dim_v, ws,
                     grad_values, ld_v, 1, ws, ld_v, BLOCK, True, False)
    tl.debug_barrier()
    # Y = A^-1 Z and dZ = A^-T dY = A^-1 dY (NaN, as in the forward, for a matrix without a factor).
    bad = (status == NON_FINITE) | (status == NOT_POSITIVE_DEFINITE)
    _cholesky_solve(values, Z + batch * sz_b + head * sz_h, sz_r, sz_d, scratch, factor, diag_inv, m, dim_v, ld,
                    ld_v, bad, BLOCK, PRECISION)
    grad_max = _cholesky_solve(grad_summary, grad_values, ld_v, 1, scratch, factor, diag_inv, m, dim_v, ld, ld_v,
                               bad, BLOCK, PRECISION)
    # dA = -dZ Y^T. A = sym(M) + shift I, so dM = sym(dA): the Gram backward's H = (dA + dA^T) * M is
    # exactly what it makes of dM = sym(dA), without forming it.
    _product(grad_gram, ld, 1, grad_summary, ld_v, 1, values, 1, ld_v, m, dim_v, m, -1.0, 0, ws, BLOCK, PRECISION)
    tl.debug_barrier()
    _store_scaled_grad(grad_summary, ld_v, grad_max, GRAD_FACTOR + pid, GRAD_Z + batch * sdz_b + head * sdz_h,
                       sdz_r, sdz_d, m, dim_v, BLOCK)
    _gram_backward(l_base, sl_r, sl_d, m, dim, scale, scale_log2, grad_gram, ld, GRAD_L + batch * sdl_b + head * sdl_h,
                   sdl_r, sdl_d, GRAM_BLOCK, BLOCK_D, UPCAST, GRAM_PRECISION)


# ---- launch configuration -----------------------------------------------------------------------------

def solve_precision(dtype: torch.dtype) -> str:
    """The iteration's float32 dot precision for inputs of this dtype. bfloat16: plain "tf32", ~3x cheaper than
    tf32x3; its ~1e-3 relative error in W adds under a quarter of what bfloat16 rounding already costs the
    output and the gradients. float16 / float32: "tf32x3" (~float32 accuracy), since TF32 would eat most of
    their 2x error budget (tests/test_solve_precision.py emulates TF32 rounding to show both)."""
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


def solve_config(m: int, dim: int, dtype: torch.dtype) -> dict:
    """Tiles, warps and dot precisions for m landmarks, landmark head dim `dim` and the input dtype;
    compile_check enumerates exactly M_PADS x HEAD_DIMS x {fp16, bf16, fp32}.

    BLOCK (the iteration's tiles) is 32 for every m: masked tiles make any m exact, and at m <= 16 the
    wasted work is negligible next to one launch, while one variant per head-dim bucket keeps compiles few.
    GRAM_BLOCK tiles the Gram phases, whose (GRAM_BLOCK x head dim) landmark tiles live in registers: 16
    where 32 would spill (compile_check). PRECISION (the iteration's float32 dots, m^3 * iters FLOPs, the
    solve's whole cost): ``solve_precision``; tf32x3 is ~float32 accuracy on tensor cores at ~3x plain tf32
    ("Cost of the landmark solve" in skyformer-math.md: ~80 us vs ~190 us with "ieee", ~26 us tf32, for
    b*H = 128, m = 128, 6 iterations; the iteration's products are symmetric and computed as upper tiles,
    which saves another ~3/8 at m = 128). GRAM_PRECISION (kappa's L L^T, the backward's H @ L;
    m^2 p FLOPs): tf32x3, "ieee" at float32 head dim 256 where tf32x3 tiles spill.
    """
    block_d = head_block(dim, dim)
    return dict(M_PAD=max(16, triton.next_power_of_2(m)), BLOCK=32, GRAM_BLOCK=16 if block_d >= 128 else 32,
                BLOCK_D=block_d, num_warps=8 if block_d == 256 else 4, num_stages=1, maxnreg=MAX_REGISTERS,
                PRECISION=solve_precision(dtype),
                GRAM_PRECISION="ieee" if dtype == torch.float32 and block_d == 256 else "tf32x3")


def cholesky_config(m: int, dim: int, dtype: torch.dtype) -> dict:
    """solve_config with PRECISION = "ieee" for the factor, the substitutions and dA: Cholesky costs only
    m^3/3 + 2 m^2 p_v FLOPs (~35x fewer than the iteration at m = 128), so plain float32 FMAs cost little,
    while the rounding of every product is amplified by the condition number of A (up to ~(m + ridge) / ridge;
    ~1/(10 tau) ~ 1e5 after jitter): accuracy first. BLOCK = 16: an "ieee" dot holds its operands' whole
    inner dimension per thread, and 32-wide tiles took up to 255 registers (compile_check)."""
    return dict(solve_config(m, dim, dtype), BLOCK=16, PRECISION="ieee")


def _workspace_layout(m: int, dim_v: int, squares: int, wides: int, vectors: int) -> dict:
    """Per-program float32 workspace: square m x m slots (row stride ld), wide m x dim_v slots (row stride
    ld_v), then vectors of length m; strides rounded to 16 elements (aligned rows)."""
    ld, ld_v = triton.cdiv(m, 16) * 16, triton.cdiv(dim_v, 16) * 16
    wide_offset = squares * ld * ld
    vector_offset = wide_offset + wides * ld * ld_v
    return dict(ld=ld, ld_v=ld_v, wide_offset=wide_offset, vector_offset=vector_offset,
                ws_stride=vector_offset + vectors * ld)


def _check_sizes(landmarks: torch.Tensor, dim_v: int, ns_iters: int = 1) -> None:
    m, dim = landmarks.shape[-2:]
    if not 1 <= m <= MAX_LANDMARKS or not 1 <= dim <= MAX_HEAD_DIM or not 1 <= dim_v <= MAX_HEAD_DIM:
        raise ValueError(f"landmark solve kernels take 1..{MAX_LANDMARKS} landmarks and head dims 1.."
                         f"{MAX_HEAD_DIM}; got m={m}, p={dim}, p_v={dim_v}")
    if ns_iters < 1:
        raise ValueError(f"ns_iters must be >= 1, got {ns_iters}")


def _launch_args(landmarks: torch.Tensor, dim_v: int, cfg: dict, layout: dict):
    batch, heads, m, dim = landmarks.shape
    workspace = torch.empty(batch * heads, layout["ws_stride"], dtype=torch.float32, device=landmarks.device)
    sizes = (m, heads, dim, dim_v)
    meta = dict(BLOCK=cfg["BLOCK"], GRAM_BLOCK=cfg["GRAM_BLOCK"], BLOCK_D=cfg["BLOCK_D"],
                UPCAST=INTERPRETER and landmarks.dtype == torch.bfloat16, PRECISION=cfg["PRECISION"],
                GRAM_PRECISION=cfg["GRAM_PRECISION"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                maxnreg=cfg["maxnreg"])
    return workspace, sizes, meta


def _newton_schulz_launch_args(landmarks: torch.Tensor, dim_v: int, ns_iters: int, backward: bool):
    m, dim = landmarks.shape[-2:]
    layout = _workspace_layout(m, dim_v, 4 * ns_iters + 8 if backward else 6, 3 if backward else 1, 4)
    layout_args = (layout["ld"], layout["ld_v"], layout["wide_offset"], layout["vector_offset"],
                   layout["ws_stride"])
    return *_launch_args(landmarks, dim_v, solve_config(m, dim, landmarks.dtype), layout), layout_args


def _cholesky_launch_args(landmarks: torch.Tensor, dim_v: int, backward: bool):
    m, dim = landmarks.shape[-2:]
    layout = _workspace_layout(m, dim_v, 4 if backward else 3, 4 if backward else 2, 0)
    layout_args = (layout["ld"], layout["ld_v"], layout["wide_offset"], layout["ws_stride"])
    return *_launch_args(landmarks, dim_v, cholesky_config(m, dim, landmarks.dtype), layout), layout_args


# ---- host wrappers ------------------------------------------------------------------------------------

def solve_forward(landmarks: torch.Tensor, summary_partials: torch.Tensor, scale: float, ridge: float,
                  ns_iters: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y in out_dtype, Z float32), both (b, H, m, p_v): landmarks (b, H, m, p) in the input dtype, the key
    summary as float32 split partials (S, b, H, m, p_v), added in order s = 0..S-1. One launch."""
    batch, heads, m, _ = landmarks.shape
    dim_v = summary_partials.shape[-1]
    _check_sizes(landmarks, dim_v, ns_iters)
    workspace, sizes, meta, layout_args = _newton_schulz_launch_args(landmarks, dim_v, ns_iters, backward=False)
    values = torch.empty(batch, heads, m, dim_v, dtype=out_dtype, device=landmarks.device)
    summary = torch.empty(batch, heads, m, dim_v, dtype=torch.float32, device=landmarks.device)
    newton_schulz_fwd_kernel[(batch * heads,)](
        landmarks, summary_partials, values, summary, workspace, *landmarks.stride(), *summary_partials.stride(),
        *values.stride(), *summary.stride(), *sizes, summary_partials.shape[0], ns_iters, *layout_args,
        scale * LOG2_E, ridge, **meta)
    return values, summary


def solve_backward(grad_value_partials: torch.Tensor, landmarks: torch.Tensor, summary: torch.Tensor,
                   scale: float, ridge: float, ns_iters: int,
                   grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dZ / f in grad_dtype (b, H, m, p_v), f float32 (b, H), dL of the Gram float32 (b, H, m, p)) from the
    float32 split partials of dY (S', b, H, m, p_v), the landmarks and the forward's float32 Z. f is a power
    of two per matrix with max|dZ / f| <= 1 (1 for dZ = 0); dZ = (dZ / f) * f exactly. One launch."""
    batch, heads, m, dim = landmarks.shape
    dim_v = summary.shape[-1]
    _check_sizes(landmarks, dim_v, ns_iters)
    workspace, sizes, meta, layout_args = _newton_schulz_launch_args(landmarks, dim_v, ns_iters, backward=True)
    grad_summary = torch.empty(batch, heads, m, dim_v, dtype=grad_dtype, device=landmarks.device)
    grad_factor = torch.empty(batch, heads, dtype=torch.float32, device=landmarks.device)
    grad_landmarks = torch.empty(batch, heads, m, dim, dtype=torch.float32, device=landmarks.device)
    newton_schulz_bwd_kernel[(batch * heads,)](
        grad_value_partials, landmarks, summary, grad_summary, grad_factor, grad_landmarks, workspace,
        *grad_value_partials.stride(), *landmarks.stride(), *summary.stride(), *grad_summary.stride(),
        *grad_landmarks.stride(), *sizes, grad_value_partials.shape[0], ns_iters, *layout_args, scale,
        scale * LOG2_E, ridge, **meta)
    return grad_summary, grad_factor, grad_landmarks


def cholesky_forward(landmarks: torch.Tensor, summary_partials: torch.Tensor, scale: float, ridge: float,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y in out_dtype, Z float32, both (b, H, m, p_v); status int32 (b, H)): Y = (sym(M) + ridge I)^-1 Z by
    Cholesky with skyformer_ext.solve's failure policy applied on device (status 0, the jitter step 1..3,
    4 = not positive definite or -1 = non-finite landmarks, those matrices' Y all NaN). Arguments as in
    solve_forward. One launch, no host sync: the caller applies solve.check_cholesky_status when it wants."""
    batch, heads, m, _ = landmarks.shape
    dim_v = summary_partials.shape[-1]
    _check_sizes(landmarks, dim_v)
    workspace, sizes, meta, layout_args = _cholesky_launch_args(landmarks, dim_v, backward=False)
    values = torch.empty(batch, heads, m, dim_v, dtype=out_dtype, device=landmarks.device)
    summary = torch.empty(batch, heads, m, dim_v, dtype=torch.float32, device=landmarks.device)
    status = torch.empty(batch, heads, dtype=torch.int32, device=landmarks.device)
    cholesky_fwd_kernel[(batch * heads,)](
        landmarks, summary_partials, values, summary, status, workspace, *landmarks.stride(),
        *summary_partials.stride(), *values.stride(), *summary.stride(), *sizes, summary_partials.shape[0],
        *layout_args, scale * LOG2_E, ridge, **meta)
    return values, summary, status


def cholesky_backward(grad_value_partials: torch.Tensor, landmarks: torch.Tensor, summary: torch.Tensor,
                      scale: float, ridge: float,
                      grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """solve_backward for cholesky_forward: refactors (same jitter, the same factor), dZ = A^-1 dY,
    dM = -sym(dZ Y^T) and its Gram backward. NaN gradients for a matrix the forward gave status 4 or -1.
    One launch."""
    batch, heads, m, dim = landmarks.shape
    dim_v = summary.shape[-1]
    _check_sizes(landmarks, dim_v)
    workspace, sizes, meta, layout_args = _cholesky_launch_args(landmarks, dim_v, backward=True)
    grad_summary = torch.empty(batch, heads, m, dim_v, dtype=grad_dtype, device=landmarks.device)
    grad_factor = torch.empty(batch, heads, dtype=torch.float32, device=landmarks.device)
    grad_landmarks = torch.empty(batch, heads, m, dim, dtype=torch.float32, device=landmarks.device)
    cholesky_bwd_kernel[(batch * heads,)](
        grad_value_partials, landmarks, summary, grad_summary, grad_factor, grad_landmarks, workspace,
        *grad_value_partials.stride(), *landmarks.stride(), *summary.stride(), *grad_summary.stride(),
        *grad_landmarks.stride(), *sizes, grad_value_partials.shape[0], *layout_args, scale, scale * LOG2_E,
        ridge, **meta)
    return grad_summary, grad_factor, grad_landmarks


def forward(landmarks: torch.Tensor, summary_partials: torch.Tensor, scale: float, ridge: float, inverse: str,
            ns_iters: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z) by the chosen inverse ("newton_schulz" or "cholesky"). A Cholesky matrix that stays not positive
    definite after jitter gets NaN values; its status is not read back (no host sync), see README "Edge cases
    and guarantees"."""
    if inverse == "cholesky":
        return cholesky_forward(landmarks, summary_partials, scale, ridge, out_dtype)[:2]
    return solve_forward(landmarks, summary_partials, scale, ridge, ns_iters, out_dtype)


def backward(grad_value_partials: torch.Tensor, landmarks: torch.Tensor, summary: torch.Tensor, scale: float,
             ridge: float, inverse: str, ns_iters: int,
             grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of forward by the same inverse: (dZ / f in grad_dtype, f, dL of the Gram)."""
    if inverse == "cholesky":
        return cholesky_backward(grad_value_partials, landmarks, summary, scale, ridge, grad_dtype)
    return solve_backward(grad_value_partials, landmarks, summary, scale, ridge, ns_iters, grad_dtype)
