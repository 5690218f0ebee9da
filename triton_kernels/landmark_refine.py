"""Stage 1b, landmark refinement: Lloyd (k-means) steps that move each landmark to the mean of the rows of
[Q; K] nearest to it (reference: skyformer_ext.reference.refine_landmarks, its semantics and edge rules).

Forward, two launches per step:
- ``lloyd_assign_kernel`` (grid: head-dim chunk, split, batch*head) streams its split's tiles of points —
  query tiles, then key tiles of the head's kv head — computes each point's nearest landmark from
  |l|^2/2 - x.l (a tile of BLOCK_N x BLOCK_M values in registers, never stored), and adds the points into
  per-landmark sums with a one-hot product, plus counts. It writes float32 split partials, and the assignment
  of every point (int32, -1 for rows that take no part) for the backward.
- ``lloyd_update_kernel`` (grid: batch*head, head-dim chunk) adds the partials in split order (deterministic),
  divides, keeps the old position of a landmark that got no point, and writes the new landmarks and counts.
  A batch row with no valid key keeps its zero landmarks (counts 0): its output is zero whatever they are.

Backward, one launch per step (``lloyd_grad_kernel``, grid: point tile, batch*kv head): every point adds
dL_j / count_j of its landmark j into its dq or dk row (key rows sum over the GQA group in the program, then
one read-modify-write: no atomics). dL is the total landmark gradient that the scatter kernel of
triton_kernels.landmarks writes; a landmark that got no point in a later step passes it on unchanged, so step
t uses dL times prod_{s > t} [count_s == 0], and the seeds the product over all steps.

Dots take the input dtype (the one-hot operand is exact in every dtype) with float32 accumulation; float32
inputs use tf32x3, which keeps ~float32 accuracy. The assignment's head-dim chunks (32 columns) recompute the
distances (the same values in every chunk) so that a program holds only BLOCK_M x CHUNK_D sums: registers,
not FLOPs, bound this kernel (refine_config).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .gaussian_tiles import (RUNTIME_INTS, TARGET_PROGRAMS, Sequences, _batch_and_heads, _load_tile, _mask_args,
                             _operand, _sequence_rows, _upcast, kernel_with_runtime_ints)
from .landmarks import _valid_key_count, passes_on

MASK_BLOCK = 128
# ptxas's own register target spilled the narrow-tile variants (head-dim bucket 16: 32 registers for the grad
# kernel, 72 for the assign kernel at m <= 16); these caps are spill-free in every bucket (compile_check). The
# packed grad kernel needs up to 80 (float32, sm_90).
ASSIGN_MAX_REGISTERS, GRAD_MAX_REGISTERS, PACKED_GRAD_MAX_REGISTERS = 255, 64, 96
# Sequence lengths and step/split counts vary call to call: unspecialised, one compiled variant for all.
_kernel = kernel_with_runtime_ints(RUNTIME_INTS + ["n_q", "n_k", "step", "steps", "splits", "tiles_per_split",
                                                   "key_offset", "masks_queries"])


def refine_config(m: int, dim: int, elem_bytes: int) -> dict:
    """Tiles and warps of the three refine kernels for m landmarks, head dim ``dim`` and the input element
    size: BLOCK_M landmark slots; the assign kernel's BLOCK_N points per tile, CHUNK_D head-dim columns of
    sums per program and num_warps (the update kernel uses the same chunks); the grad kernel's GRAD_BLOCK_N
    and GRAD_CHUNK_D; the float32 dot precision. The spill-free choices of compile_check (sm_80, sm_90): a
    distance tile, a sums chunk and, for float32, tf32x3's split operands must share 255 registers."""
    block_m = max(16, triton.next_power_of_2(m))
    block_d = max(16, triton.next_power_of_2(dim))
    wide = elem_bytes == 4
    chunk = 16 if wide and block_m > 128 else 32
    return dict(BLOCK_M=block_m, BLOCK_N=32 if block_m <= 64 else 16, CHUNK_D=min(block_d, chunk),
                num_warps=4 if block_m <= (16 if wide else 32) else 8, GRAD_BLOCK_N=32,
                GRAD_CHUNK_D=min(block_d, 32), PRECISION="tf32x3" if wide else "ieee")


@triton.jit
def _point_keep(mask_base, stride_mask, row0, n_rows, use_mask, BLOCK_N: tl.constexpr):
    """Rows in range and, when use_mask, marked valid by the key mask."""
    rows = row0 + tl.arange(0, BLOCK_N)
    keep = rows < n_rows
    padded = tl.load(mask_base + rows.to(tl.int64) * stride_mask, mask=keep & (use_mask != 0), other=1) == 0
    return rows, keep & ~padded


@triton.jit
def _nearest_landmark(x_base, s_r, s_d, row0, n_rows, keep, l_base, sl_r, sl_d, l_half, m, dim,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_D: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Each point's nearest landmark (int32, ties to the lower index, NaN distances as +inf): argmin of
    |l|^2/2 - x.l over the m slots, the dot accumulated over head-dim chunks. Rows not kept load as zeros
    (padding may hold NaN)."""
    dots = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for col0 in range(0, dim, CHUNK_D):
        x = _load_tile(x_base, row0, n_rows, s_r, s_d, dim - col0, BLOCK_N, CHUNK_D, UPCAST, keep, col0)
        lm = _load_tile(l_base, 0, m, sl_r, sl_d, dim - col0, BLOCK_M, CHUNK_D, UPCAST, None, col0)
        dots = tl.dot(x, tl.trans(lm), dots, input_precision=PRECISION)
    score = l_half[None, :] - dots
    # NaN (from a seed or point holding NaN) counts as +inf, as in the reference: a NaN landmark gets no point.
    return tl.argmin(tl.where(score == score, score, float("inf")), axis=1, tie_break_left=True)


@triton.jit
def _shadowed_slots(l_base, sl_r, sl_d, m, dim, BLOCK_M: tl.constexpr, CHUNK_D: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Slots holding exactly the row of a lower slot (duplicate seeds). Ties go to the lower index, and a dot
    need not give identical columns identical bits (a BLAS under the interpreter does not), so duplicates
    are found by comparing coordinates: m * m * p comparisons, read from cache."""
    slots = tl.arange(0, BLOCK_M)
    shadowed = slots < 0
    for lower in range(0, m):
        same = slots > lower
        for col0 in range(0, dim, CHUNK_D):
            cols = col0 + tl.arange(0, CHUNK_D)
            tile = _load_tile(l_base, 0, m, sl_r, sl_d, dim - col0, BLOCK_M, CHUNK_D, UPCAST, None, col0)
            row = tl.load(l_base + lower * sl_r + cols * sl_d, mask=cols < dim, other=0.0)
            if UPCAST:
                row = row.to(tl.float32)
            same = same & (tl.sum((tile != row[None, :]).to(tl.int32), axis=1) == 0)
        shadowed = shadowed | same
    return shadowed


@triton.jit
def _landmark_half_norms(l_base, sl_r, sl_d, m, dim, BLOCK_M: tl.constexpr, CHUNK_D: tl.constexpr,
                         UPCAST: tl.constexpr):
    """|l|^2 / 2 per slot in float32; +inf on slots >= m and on duplicates of a lower slot, so that no point
    picks them."""
    half = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col0 in range(0, dim, CHUNK_D):
        lm = _load_tile(l_base, 0, m, sl_r, sl_d, dim - col0, BLOCK_M, CHUNK_D, UPCAST, None, col0).to(tl.float32)
        half += 0.5 * tl.sum(lm * lm, axis=1)
    unpicked = (tl.arange(0, BLOCK_M) >= m) | _shadowed_slots(l_base, sl_r, sl_d, m, dim, BLOCK_M, CHUNK_D, UPCAST)
    return tl.where(unpicked, float("inf"), half)


@triton.jit
def _assign_tile(x_base, s_r, s_d, row0, n_rows, mask_base, stride_mask, use_mask, l_base, sl_r, sl_d, l_half,
                 sums, counts, assign_base, m, dim, chunk0, WRITE_ASSIGNMENT, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, CHUNK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of points: their nearest landmarks, added into the sums of head-dim chunk chunk0.. and counts."""
    rows, keep = _point_keep(mask_base, stride_mask, row0, n_rows, use_mask, BLOCK_N)
    nearest = _nearest_landmark(x_base, s_r, s_d, row0, n_rows, keep, l_base, sl_r, sl_d, l_half, m, dim,
                                BLOCK_N, BLOCK_M, CHUNK_D, UPCAST, PRECISION)
    member = (nearest[:, None] == tl.arange(0, BLOCK_M)[None, :]) & keep[:, None]
    x = _load_tile(x_base, row0, n_rows, s_r, s_d, dim - chunk0, BLOCK_N, CHUNK_D, UPCAST, keep, chunk0)
    sums = tl.dot(tl.trans(member.to(x.dtype)), x, sums, input_precision=PRECISION)
    counts += tl.sum(member.to(tl.float32), axis=0)
    if WRITE_ASSIGNMENT:
        tl.store(assign_base + rows, tl.where(keep, nearest, -1), mask=rows < n_rows)
    return sums, counts


@_kernel
def lloyd_assign_kernel(Q, K, MASK, CU_Q, CU_K, L, SUMS, COUNTS, ASSIGN,
                        sq_b, sq_h, sq_r, sq_d, sk_b, sk_h, sk_r, sk_d, sm_b, sm_r, sl_b, sl_h, sl_r, sl_d,
                        ss_s, ss_b, ss_h, ss_r, ss_d, sc_s, sc_b, sc_h, sa_b, sa_h,
                        n_q, n_k, key_offset, heads, group, m, tiles_per_split, dim, has_mask, masks_queries,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr):
    chunk, split = tl.program_id(0), tl.program_id(1)
    batch, head, kv_head = _batch_and_heads(tl.program_id(2), heads, group)
    q_first, n_q = _sequence_rows(CU_Q, batch, n_q, PACKED)
    k_first, n_k = _sequence_rows(CU_K, batch, n_k, PACKED)
    chunk0 = chunk * CHUNK_D
    l_base = L + batch * sl_b + head * sl_h
    l_half = _landmark_half_norms(l_base, sl_r, sl_d, m, dim, BLOCK_M, CHUNK_D, UPCAST)
    mask_base = MASK + batch * sm_b
    assign_base = ASSIGN + head * sa_h
    write_assignment = chunk == 0
    sums = tl.zeros((BLOCK_M, CHUNK_D), dtype=tl.float32)
    counts = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Point tiles are numbered query tiles first, then key tiles; a split takes a contiguous range of them.
    query_tiles = tl.cdiv(n_q, BLOCK_N)
    all_tiles = query_tiles + tl.cdiv(n_k, BLOCK_N)
    tile_start = split * tiles_per_split
    tile_stop = tl.minimum(tile_start + tiles_per_split, all_tiles)
    for tile in range(tile_start, tl.minimum(tile_stop, query_tiles)):
        sums, counts = _assign_tile(Q + q_first * sq_b + head * sq_h, sq_r, sq_d, tile * BLOCK_N, n_q, mask_base,
                                    sm_r, masks_queries, l_base, sl_r, sl_d, l_half, sums, counts,
                                    assign_base + q_first * sa_b, m, dim, chunk0, write_assignment, BLOCK_N, BLOCK_M,
                                    CHUNK_D, UPCAST, PRECISION)
    for tile in range(tl.maximum(tile_start, query_tiles), tile_stop):
        sums, counts = _assign_tile(K + k_first * sk_b + kv_head * sk_h, sk_r, sk_d, (tile - query_tiles) * BLOCK_N,
                                    n_k, mask_base, sm_r, has_mask, l_base, sl_r, sl_d, l_half, sums, counts,
                                    assign_base + k_first * sa_b + key_offset, m, dim, chunk0, write_assignment,
                                    BLOCK_N, BLOCK_M, CHUNK_D, UPCAST, PRECISION)
    slots = tl.arange(0, BLOCK_M)
    cols = chunk0 + tl.arange(0, CHUNK_D)
    split_offset = split.to(tl.int64)
    sums_base = SUMS + split_offset * ss_s + batch * ss_b + head * ss_h
    tl.store(sums_base + slots[:, None] * ss_r + cols[None, :] * ss_d, sums,
             mask=(slots < m)[:, None] & (cols < dim)[None, :])
    if write_assignment:
        tl.store(COUNTS + split_offset * sc_s + batch * sc_b + head * sc_h + slots, counts, mask=slots < m)


@_kernel
def lloyd_update_kernel(L, SUMS, COUNTS, MASK, CU_K, L_NEW, COUNTS_OUT,
                        sl_b, sl_h, sl_r, sl_d, ss_s, ss_b, ss_h, ss_r, ss_d, sc_s, sc_b, sc_h, sm_b, sm_r,
                        sn_b, sn_h, sn_r, sn_d, so_b, so_h,
                        n_k, heads, m, splits, dim, has_mask,
                        BLOCK_M: tl.constexpr, CHUNK_D: tl.constexpr, MASK_BLOCK: tl.constexpr,
                        PACKED: tl.constexpr):
    pid_bh, chunk = tl.program_id(0), tl.program_id(1)
    batch, head, _ = _batch_and_heads(pid_bh, heads, 1)
    _, n_k = _sequence_rows(CU_K, batch, n_k, PACKED)
    slots = tl.arange(0, BLOCK_M)
    cols = chunk * CHUNK_D + tl.arange(0, CHUNK_D)
    inside = (slots < m)[:, None] & (cols < dim)[None, :]
    sums = tl.zeros((BLOCK_M, CHUNK_D), dtype=tl.float32)
    counts = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sums_base = SUMS + batch * ss_b + head * ss_h
    counts_base = COUNTS + batch * sc_b + head * sc_h
    for _ in range(0, splits):  # a fixed order: bit-identical reruns; pointers step (64-bit) per split
        sums += tl.load(sums_base + slots[:, None] * ss_r + cols[None, :] * ss_d, mask=inside, other=0.0)
        counts += tl.load(counts_base + slots, mask=slots < m, other=0.0)
        sums_base += ss_s
        counts_base += sc_s
    # A batch row with no valid key keeps its zero landmarks and reports no point (cross-attention queries
    # would otherwise move them): nothing flows back through it either.
    has_keys = _valid_key_count(MASK + batch * sm_b, sm_r, n_k, has_mask, MASK_BLOCK) > 0
    counts = tl.where(has_keys, counts, 0.0)
    old = tl.load(L + batch * sl_b + head * sl_h + slots[:, None] * sl_r + cols[None, :] * sl_d, mask=inside,
                  other=0.0)
    new = tl.where(counts[:, None] > 0, sums / tl.maximum(counts, 1.0)[:, None], old.to(tl.float32))
    tl.store(L_NEW + batch * sn_b + head * sn_h + slots[:, None] * sn_r + cols[None, :] * sn_d,
             new.to(L_NEW.dtype.element_ty), mask=inside)
    if chunk == 0:
        tl.store(COUNTS_OUT + batch * so_b + head * so_h + slots, counts, mask=slots < m)


@triton.jit
def _point_shares(assign_base, count_base, grad_base, sc_t, sg_r, sg_d, rows, n_rows, step, steps, col0, dim,
                  BLOCK_N: tl.constexpr, CHUNK_D: tl.constexpr):
    """dL_j / count_j (the part of dL that step ``step`` received) for the points rows.. of one head, head-dim
    columns col0..: zero for rows that took no part."""
    nearest = tl.load(assign_base + rows, mask=rows < n_rows, other=-1)
    member = nearest >= 0
    slot = tl.where(member, nearest, 0).to(tl.int64)
    count = tl.load(count_base + step * sc_t + slot, mask=member, other=0.0)
    share = member & (count > 0) & passes_on(count_base, sc_t, slot, step + 1, steps)
    cols = col0 + tl.arange(0, CHUNK_D)
    grad = tl.load(grad_base + slot[:, None] * sg_r + cols[None, :] * sg_d,
                   mask=share[:, None] & (cols < dim)[None, :], other=0.0)
    return grad / tl.maximum(count, 1.0)[:, None]


@triton.jit
def _add_into_rows(base, s_r, s_d, rows, n_rows, col0, dim, grad, CHUNK_D: tl.constexpr):
    cols = col0 + tl.arange(0, CHUNK_D)
    pointers = base + rows[:, None].to(tl.int64) * s_r + cols[None, :] * s_d
    inside = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    total = tl.load(pointers, mask=inside, other=0.0).to(tl.float32) + grad
    tl.store(pointers, total.to(base.dtype.element_ty), mask=inside)


@_kernel
def lloyd_grad_kernel(ASSIGN, COUNTS, GRAD_L, GRAD_Q, GRAD_K, CU_Q, CU_K,
                      sa_t, sa_b, sa_h, sc_t, sc_b, sc_h, sg_b, sg_h, sg_r, sg_d,
                      sdq_b, sdq_h, sdq_r, sdq_d, sdk_b, sdk_h, sdk_r, sdk_d,
                      n_q, n_k, key_offset, kv_heads, group, step, steps, dim,
                      BLOCK_N: tl.constexpr, CHUNK_D: tl.constexpr, PACKED: tl.constexpr):
    tile, pid_bk = tl.program_id(0), tl.program_id(1)
    batch = (pid_bk // kv_heads).to(tl.int64)
    kv_head = (pid_bk % kv_heads).to(tl.int64)
    q_first, n_q = _sequence_rows(CU_Q, batch, n_q, PACKED)
    k_first, n_k = _sequence_rows(CU_K, batch, n_k, PACKED)
    query_tiles = tl.cdiv(n_q, BLOCK_N)
    is_query = tile < query_tiles
    row0 = tl.where(is_query, tile, tile - query_tiles) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    n_rows = tl.where(is_query, n_q, n_k)
    for col0 in range(0, dim, CHUNK_D):
        key_grad = tl.zeros((BLOCK_N, CHUNK_D), dtype=tl.float32)
        for member in range(0, group):
            head = kv_head * group + member
            grad = _point_shares(ASSIGN + step * sa_t + head * sa_h
                                 + tl.where(is_query, q_first * sa_b, k_first * sa_b + key_offset),
                                 COUNTS + batch * sc_b + head * sc_h,
                                 GRAD_L + batch * sg_b + head * sg_h, sc_t, sg_r, sg_d, rows, n_rows, step, steps,
                                 col0, dim, BLOCK_N, CHUNK_D)
            if is_query:
                _add_into_rows(GRAD_Q + q_first * sdq_b + head * sdq_h, sdq_r, sdq_d, rows, n_q, col0, dim, grad,
                               CHUNK_D)
            else:
                key_grad += grad
        if not is_query:
            _add_into_rows(GRAD_K + k_first * sdk_b + kv_head * sdk_h, sdk_r, sdk_d, rows, n_k, col0, dim,
                           key_grad, CHUNK_D)


# ---- host wrappers ------------------------------------------------------------------------------------

def _assignment_layout(assignments: torch.Tensor, packed: bool, n_q: int, total_q: int):
    """(step, batch, head strides, key offset) of the (steps, b, H, points) assignments: dense rows
    [0, n_q) queries then keys; packed (b = 1) every packed query row, then every packed key row at total_q,
    each sequence addressed by its first row (the row stride 1 stands in for the batch stride)."""
    step_stride, batch_stride, head_stride, _ = assignments.stride()
    return step_stride, 1 if packed else batch_stride, head_stride, total_q if packed else n_q


def assignment_shape(steps: int, batch: int, heads: int, n_q: int, n_k: int, packed: bool) -> tuple:
    """(steps, b, H, points) of the assignments: points n_q + n_k per batch row, or, packed, every packed row
    of q and k (total_q + total_k) in one row."""
    return steps, 1 if packed else batch, heads, n_q + n_k


class _AssignPlan(NamedTuple):
    """What an assignment pass launches with: tiles, splits, the operands' addressing, the split buffers."""
    cfg: dict
    chunks: int
    splits: int
    tiles_per_split: int
    operands: tuple  # (q, k, mask, cu_q, cu_k) and their strides, as the assign kernel takes them
    sizes: tuple     # (n_q, n_k, heads, group, m, dim)
    sums: torch.Tensor          # (splits, b, H, m, p) float32
    split_counts: torch.Tensor  # (splits, b, H, m) float32


def _assign_plan(q, k, key_mask, seeds, seqs) -> _AssignPlan:
    query_seqs, key_seqs = seqs if seqs is not None else (None, None)
    batch, heads, m, dim = seeds.shape
    _, _, n_q, _, q_strides, cu_q = _operand(q, query_seqs)
    _, kv_heads, n_k, _, k_strides, cu_k = _operand(k, key_seqs)
    cfg = refine_config(m, dim, q.element_size())
    chunks = triton.cdiv(dim, cfg["CHUNK_D"])
    tiles = triton.cdiv(n_q, cfg["BLOCK_N"]) + triton.cdiv(n_k, cfg["BLOCK_N"])
    splits = max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, batch * heads * chunks)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    mask, sm_b, sm_r, has_mask = _mask_args(key_mask, q.device)
    return _AssignPlan(cfg, chunks, splits, tiles_per_split,
                       ((q, k, mask, cu_q, cu_k), (*q_strides, *k_strides, sm_b, sm_r), has_mask),
                       (n_q, n_k, heads, heads // kv_heads, m, dim),
                       torch.empty(splits, batch, heads, m, dim, dtype=torch.float32, device=q.device),
                       torch.empty(splits, batch, heads, m, dtype=torch.float32, device=q.device))


def _launch_assign(plan: _AssignPlan, landmarks, assignment, sa_b: int, sa_h: int, key_offset: int,
                   masks_queries: bool, packed: bool) -> None:
    (q, k, mask, cu_q, cu_k), strides, has_mask = plan.operands
    n_q, n_k, heads, group, m, dim = plan.sizes
    cfg = plan.cfg
    lloyd_assign_kernel[(plan.chunks, plan.splits, landmarks.shape[0] * heads)](
        q, k, mask, cu_q, cu_k, landmarks, plan.sums, plan.split_counts, assignment, *strides,
        *landmarks.stride(), *plan.sums.stride(), *plan.split_counts.stride()[:3], sa_b, sa_h,
        n_q, n_k, key_offset, heads, group, m, plan.tiles_per_split, dim, has_mask, int(masks_queries),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], CHUNK_D=cfg["CHUNK_D"], UPCAST=_upcast(q, k),
        PRECISION=cfg["PRECISION"], PACKED=packed, num_warps=cfg["num_warps"], maxnreg=ASSIGN_MAX_REGISTERS)


def forward(q, k, key_mask, seeds, steps: int, seqs: tuple[Sequences, Sequences] | None = None):
    """(refined landmarks (b, H, m, p) in q's dtype, assignments (see assignment_shape) int32, counts
    (steps, b, H, m) float32): ``steps`` Lloyd steps from ``seeds``, two launches each. seqs: packed q and k
    (query and key Sequences, no key mask): batch row s of the landmarks is sequence s, its points the rows of
    sequence s (a sequence without keys keeps its zero landmarks). With a key mask and n_q == n_k
    (self-attention) the mask marks the valid queries too."""
    batch, heads, m, dim = seeds.shape
    packed = seqs is not None
    plan = _assign_plan(q, k, key_mask, seeds, seqs)
    n_q, n_k = plan.sizes[:2]
    total_q, total_k = (q.shape[0], k.shape[0]) if packed else (n_q, n_k)
    assignments = torch.empty(assignment_shape(steps, batch, heads, total_q, total_k, packed), dtype=torch.int32,
                              device=q.device)
    counts = torch.empty(steps, batch, heads, m, dtype=torch.float32, device=q.device)
    if steps == 0:
        return seeds, assignments, counts
    _, sa_b, sa_h, key_offset = _assignment_layout(assignments, packed, n_q, total_q)
    (_, _, mask, _, cu_k), strides, has_mask = plan.operands
    sm_b, sm_r = strides[-2:]
    landmarks = seeds
    for step in range(steps):
        _launch_assign(plan, landmarks, assignments[step], sa_b, sa_h, key_offset,
                       key_mask is not None and n_q == n_k, packed)
        moved = torch.empty_like(seeds)
        lloyd_update_kernel[(batch * heads, plan.chunks)](
            landmarks, plan.sums, plan.split_counts, mask, cu_k, moved, counts[step], *landmarks.stride(),
            *plan.sums.stride(), *plan.split_counts.stride()[:3], sm_b, sm_r, *moved.stride(),
            *counts.stride()[1:3], n_k, heads, m, plan.splits, dim, has_mask, BLOCK_M=plan.cfg["BLOCK_M"],
            CHUNK_D=plan.cfg["CHUNK_D"], MASK_BLOCK=MASK_BLOCK, PACKED=packed, num_warps=4)
        landmarks = moved
    return landmarks, assignments, counts


def assign_points(q, k, key_mask, landmarks, masks_queries: bool):
    """The assignment half of a step on dense q, k (one launch), for callers that combine the sums
    themselves (context parallel: over the ranks): (split sums (S, b, H, m, p) float32, split counts (S, b, H, m)
    float32, assignment (b, H, n_q + n_k) int32, -1 for rows that take no part). masks_queries: key_mask
    marks the valid queries too."""
    batch, heads, n_q, _ = q.shape
    plan = _assign_plan(q, k, key_mask, landmarks, None)
    assignment = torch.empty(assignment_shape(1, batch, heads, n_q, k.shape[2], False), dtype=torch.int32,
                             device=q.device)
    _, sa_b, sa_h, key_offset = _assignment_layout(assignment, False, n_q, n_q)
    _launch_assign(plan, landmarks, assignment[0], sa_b, sa_h, key_offset, masks_queries, False)
    return plan.sums, plan.split_counts, assignment


def backward_into(grad_q, grad_k, assignments, counts, grad_landmarks,
                  seqs: tuple[Sequences, Sequences] | None = None) -> None:
    """Adds every step's shares of the total landmark gradient grad_landmarks (b, H, m, p) float32 into
    grad_q / grad_k, in place: one launch per step. seqs: packed grad_q and grad_k, as in forward."""
    query_seqs, key_seqs = seqs if seqs is not None else (None, None)
    steps = assignments.shape[0]
    batch, heads, m, dim = grad_landmarks.shape
    _, _, n_q, _, dq_strides, cu_q = _operand(grad_q, query_seqs)
    _, kv_heads, n_k, _, dk_strides, cu_k = _operand(grad_k, key_seqs)
    packed = seqs is not None
    sa_t, sa_b, sa_h, key_offset = _assignment_layout(assignments, packed, n_q, grad_q.shape[0] if packed else n_q)
    cfg = refine_config(m, dim, grad_q.element_size())
    block_n = cfg["GRAD_BLOCK_N"]
    tiles = triton.cdiv(n_q, block_n) + triton.cdiv(n_k, block_n)
    for step in reversed(range(steps)):
        lloyd_grad_kernel[(tiles, batch * kv_heads)](
            assignments, counts, grad_landmarks, grad_q, grad_k, cu_q, cu_k, sa_t, sa_b, sa_h,
            *counts.stride()[:3], *grad_landmarks.stride(), *dq_strides, *dk_strides, n_q, n_k, key_offset,
            kv_heads, heads // kv_heads, step, steps, dim, BLOCK_N=block_n, CHUNK_D=cfg["GRAD_CHUNK_D"],
            PACKED=packed, num_warps=4, maxnreg=PACKED_GRAD_MAX_REGISTERS if packed else GRAD_MAX_REGISTERS)
