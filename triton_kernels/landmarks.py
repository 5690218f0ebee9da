"""Stage 1, landmarks: choose m rows of X = [q; k], gather them, and route their gradients back
(reference: skyformer_ext.landmarks.sample_landmarks and gather_landmarks).

Forward, one launch (``landmark_rows_kernel``, a program per (batch, head)): maps the uniform draws of
``sample_landmarks`` (or the strided grid, or given indices) to row indices with exactly its rule — the first
m // 2 landmarks among the valid query rows, the rest among the valid key rows, the rank-th valid row for a
draw u being rank = min(floor(u * n_valid), n_valid - 1) — and writes the landmark rows L (b, H, m, p).
Without a key mask the rank is the row; with one, the program walks the mask in blocks, counting valid rows
with a cumulative sum (O(m * n / BLOCK_N) vector steps, no sort, no host sync). Same draws -> same indices as
the torch path, bit for bit.

A batch row with no valid key gets zero landmark rows (``skyformer_ext.landmarks.gather_landmarks``' rule) and
no landmark gradient.

Backward, one launch (``landmark_grad_scatter_kernel``, a program per (batch, kv head)): dL arrives in three
parts — split partials from the query apply and from the key summary, and the landmark solve's Gram term —
which the program adds on load and scatter-adds into dq (query landmarks) and dk (key landmarks, summed over
the GQA group). Landmarks are visited one after another, so repeated landmarks accumulate in a fixed order:
deterministic, no atomics. With landmark refinement it also writes the total dL per (batch, head) for
landmark_refine's backward, and a seed receives dL only if its landmark got no row in any Lloyd step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gaussian_tiles import Sequences, _kernel, _mask_args, _operand, _sequence_rows

# Where landmark indices come from (the SOURCE constexpr): constexpr globals, so compiled kernels may read them.
SOURCE_GIVEN, SOURCE_DRAWS, SOURCE_STRIDED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MAX_LANDMARKS = 1024  # the index vectors live in registers: BLOCK_M = next power of two of m
SCATTER_MASK_BLOCK = 128  # mask entries per step of the scatter's valid-key count
# Register caps for ptxas: without a hint it gave the scatter 32 registers and the one-warp rows kernel 80, and
# both spilled (sm_90, compile_check); they need ~47 and up to ~190. One program per (batch, head) or (batch,
# kv head): occupancy is moot.
SCATTER_MAX_REGISTERS = 64
ROWS_MAX_REGISTERS = 255


def rows_config(block_m: int) -> dict:
    """Warps, keys per step of the masked walk (BLOCK_M x BLOCK_N comparisons) and head-dim columns gathered
    per step of landmark_rows_kernel for BLOCK_M landmark slots: the spill-free choices of compile_check."""
    num_warps = 1 if block_m <= 32 else 4 if block_m <= 128 else 8 if block_m <= 256 else 16
    block = 32 if block_m <= 256 else 16 if block_m <= 512 else 8
    return dict(num_warps=num_warps, BLOCK_N=block, BLOCK_D=block, maxnreg=ROWS_MAX_REGISTERS)


@triton.jit
def _valid_key_count(mask_base, stride_mask, n_k, has_mask, BLOCK_N: tl.constexpr):
    """The number of valid keys of a batch row (n_k without a mask): a walk over its mask in blocks."""
    walked_keys = n_k * has_mask
    valid_keys = n_k * 0
    for key0 in range(0, walked_keys, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        keep = tl.load(mask_base + keys.to(tl.int64) * stride_mask, mask=keys < n_k, other=0)
        valid_keys += tl.sum((keep != 0).to(tl.int32), axis=0)
    return tl.where(has_mask != 0, valid_keys, n_k)


@triton.jit
def _landmark_rows(DRAWS, INDICES_IN, mask_base, stride_mask, n_q, n_k, m, m_queries, has_mask, valid_keys,
                   SOURCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices into [q; k] of the m landmark slots (int64, BLOCK_M of them; slots >= m are 0)."""
    slots = tl.arange(0, BLOCK_M)
    in_range = slots < m
    if SOURCE == SOURCE_GIVEN:
        return tl.load(INDICES_IN + slots, mask=in_range, other=0).to(tl.int64)
    is_key = slots >= m_queries
    if SOURCE == SOURCE_DRAWS:
        draws = tl.load(DRAWS + slots, mask=in_range, other=0.0).to(tl.float64)
    else:  # strided: the midpoints of count equal cells, per part
        count = tl.where(is_key, m - m_queries, m_queries)
        local = tl.where(is_key, slots - m_queries, slots)
        draws = (local.to(tl.float64) + 0.5) / tl.maximum(count, 1).to(tl.float64)
    # The key mask marks the valid keys, and the valid queries too when n_q == n_k (self-attention); a batch
    # row with no valid key treats every row as valid. Without a mask the walk covers no key.
    walked_keys = n_k * has_mask
    walks_mask = (has_mask != 0) & (valid_keys > 0) & (is_key | (n_q == n_k))
    n_valid = tl.where(walks_mask, valid_keys, tl.where(is_key, n_k, n_q)).to(tl.int64)
    rank = tl.minimum((draws * n_valid.to(tl.float64)).to(tl.int64), n_valid - 1)
    position = tl.where(walks_mask, 0, rank)
    valid_before = valid_keys.to(tl.int64) * 0
    for key0 in range(0, walked_keys, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        keep = tl.load(mask_base + keys.to(tl.int64) * stride_mask, mask=keys < n_k, other=0) != 0
        valid_through = valid_before + tl.cumsum(keep.to(tl.int64), axis=0)
        hit = walks_mask[:, None] & keep[None, :] & (valid_through[None, :] == rank[:, None] + 1)
        position += tl.sum(tl.where(hit, keys[None, :].to(tl.int64), 0), axis=1)
        valid_before += tl.sum(keep.to(tl.int64), axis=0)
    return tl.where(in_range, position + tl.where(is_key, n_q, 0), 0)


@_kernel
def landmark_rows_kernel(Q, K, MASK, CU_Q, CU_K, DRAWS, INDICES_IN, INDICES_OUT, L,
                         sq_b, sq_h, sq_r, sq_d, sk_b, sk_h, sk_r, sk_d, sm_b, sm_r, sdraw_b, sidx_b, sout_b,
                         sl_b, sl_h, sl_r, sl_d, n_q, n_k, heads, group, m, dim, has_mask,
                         SOURCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, PACKED: tl.constexpr):
    pid_b, head = tl.program_id(0), tl.program_id(1)
    batch = pid_b.to(tl.int64)
    q_first, n_q = _sequence_rows(CU_Q, batch, n_q, PACKED)
    k_first, n_k = _sequence_rows(CU_K, batch, n_k, PACKED)
    m_queries = tl.where(n_q > 0, m // 2, 0)  # a batch row (sequence) without queries draws every landmark from keys
    valid_keys = _valid_key_count(MASK + batch * sm_b, sm_r, n_k, has_mask, BLOCK_N)
    indices = _landmark_rows(DRAWS + batch * sdraw_b, INDICES_IN + batch * sidx_b, MASK + batch * sm_b, sm_r,
                             n_q, n_k, m, m_queries, has_mask, valid_keys, SOURCE, BLOCK_M, BLOCK_N)
    slots = tl.arange(0, BLOCK_M)
    in_range = slots < m
    if head == 0:  # the backward's scatter needs them; every head of a batch row has the same ones
        tl.store(INDICES_OUT + batch * sout_b + slots, indices, mask=in_range)
    # A batch row with no valid key gets zero landmark rows (gather_landmarks' rule): its padding may hold
    # anything, and its output is zero whatever the landmarks are.
    gathered = in_range & (valid_keys > 0)
    from_q = gathered & (indices < n_q)
    from_k = gathered & (indices >= n_q)
    q_rows = Q + q_first * sq_b + head.to(tl.int64) * sq_h + tl.where(from_q, indices, 0)[:, None] * sq_r
    k_rows = (K + k_first * sk_b + (head // group).to(tl.int64) * sk_h
              + tl.where(from_k, indices - n_q, 0)[:, None] * sk_r)
    l_rows = L + batch * sl_b + head.to(tl.int64) * sl_h + slots[:, None].to(tl.int64) * sl_r
    for col0 in range(0, dim, BLOCK_D):
        cols = col0 + tl.arange(0, BLOCK_D)
        inside = cols[None, :] < dim
        rows = tl.where(from_q[:, None],
                        tl.load(q_rows + cols[None, :] * sq_d, mask=from_q[:, None] & inside, other=0.0),
                        tl.load(k_rows + cols[None, :] * sk_d, mask=from_k[:, None] & inside, other=0.0))
        tl.store(l_rows + cols[None, :] * sl_d, rows, mask=in_range[:, None] & inside)


@triton.jit
def passes_on(count_base, sc_t, slot, first_step, steps):
    """Whether the gradient of landmark ``slot`` (a scalar or a vector of slots) reaches back before refinement
    step first_step: it got no point in any step from first_step on (always, with no step). count_base: the
    head's counts of step 0, steps apart by sc_t. From step 0 it says whether a seed gets its gradient."""
    passes = slot >= 0  # all True, in slot's shape
    for step in range(first_step, steps):
        passes = passes & (tl.load(count_base + step * sc_t + slot) == 0.0)
    return passes


@_kernel
def landmark_grad_scatter_kernel(INDICES, MASK, CU_Q, CU_K, GRAD_QA, GRAD_KS, GRAD_SOLVE, GRAD_Q, GRAD_K, COUNTS,
                                 GRAD_TOTAL,
                                 sidx_b, sm_b, sm_r, sqa_s, sqa_b, sqa_h, sqa_r, sqa_d, sks_s, sks_b, sks_h, sks_r,
                                 sks_d, sgs_b, sgs_h, sgs_r, sgs_d, sdq_b, sdq_h, sdq_r, sdq_d, sdk_b, sdk_h, sdk_r,
                                 sdk_d, sc_t, sc_b, sc_h, st_b, st_h, st_r, n_q, n_k, m, kv_heads, group,
                                 query_splits, key_splits, dim, has_mask, refine_steps,
                                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr):
    pid_bk = tl.program_id(0)
    batch = (pid_bk // kv_heads).to(tl.int64)
    kv_head = (pid_bk % kv_heads).to(tl.int64)
    q_first, n_q = _sequence_rows(CU_Q, batch, n_q, PACKED)
    k_first, n_k = _sequence_rows(CU_K, batch, n_k, PACKED)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < dim
    # A batch row with no valid key had zero landmark rows, taken from no row: nothing to scatter (with
    # refinement its total dL is still written: the refine backward reads every slot).
    has_keys = _valid_key_count(MASK + batch * sm_b, sm_r, n_k, has_mask, BLOCK_N) > 0
    for slot in range(0, tl.where(has_keys | (refine_steps > 0), m, 0)):
        row = tl.load(INDICES + batch * sidx_b + slot)
        key_grad = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for member in range(0, group):
            head = kv_head * group + member
            offset = batch * sqa_b + head * sqa_h + slot * sqa_r
            grad = tl.load(GRAD_SOLVE + batch * sgs_b + head * sgs_h + slot * sgs_r + cols * sgs_d, mask=inside,
                           other=0.0)
            for split in range(0, query_splits):
                grad += tl.load(GRAD_QA + split * sqa_s + offset + cols * sqa_d, mask=inside, other=0.0)
            offset = batch * sks_b + head * sks_h + slot * sks_r
            for split in range(0, key_splits):
                grad += tl.load(GRAD_KS + split * sks_s + offset + cols * sks_d, mask=inside, other=0.0)
            if refine_steps > 0:  # the refine backward hands the rest of dL to the rows of the clusters
                tl.store(GRAD_TOTAL + batch * st_b + head * st_h + slot * st_r + cols, grad, mask=inside)
                grad = tl.where(passes_on(COUNTS + batch * sc_b + head * sc_h, sc_t, slot, 0, refine_steps), grad,
                                0.0)
            if has_keys & (row < n_q):
                target = GRAD_Q + q_first * sdq_b + head * sdq_h + row * sdq_r + cols * sdq_d
                total = tl.load(target, mask=inside, other=0.0).to(tl.float32) + grad
                tl.store(target, total.to(GRAD_Q.dtype.element_ty), mask=inside)
            else:
                key_grad += grad
        if has_keys & (row >= n_q):
            target = GRAD_K + k_first * sdk_b + kv_head * sdk_h + (row - n_q) * sdk_r + cols * sdk_d
            total = tl.load(target, mask=inside, other=0.0).to(tl.float32) + key_grad
            tl.store(target, total.to(GRAD_K.dtype.element_ty), mask=inside)


# ---- host wrappers ------------------------------------------------------------------------------------

def forward(q, k, key_mask, m: int, indices=None, draws=None, seqs: tuple[Sequences, Sequences] | None = None):
    """(L (b, H, m, p) in q's dtype, indices (b, m) int64): from given ``indices``, from ``draws`` (b, m)
    uniform in [0, 1) (float64, the layout of ``skyformer_ext.landmarks.landmark_draws``), or, with neither,
    the strided grid. seqs: packed q and k (query and key Sequences, no key mask): batch row s is sequence s,
    its indices rows of its own [q_s; k_s] (skyformer_ext.varlen.sample_packed_landmarks' rule)."""
    query_seqs, key_seqs = seqs if seqs is not None else (None, None)
    batch, heads, n_q, dim, q_strides, cu_q = _operand(q, query_seqs)
    _, kv_heads, n_k, _, k_strides, cu_k = _operand(k, key_seqs)
    source = (SOURCE_GIVEN if indices is not None else SOURCE_DRAWS if draws is not None else SOURCE_STRIDED).value
    landmarks = q.new_empty(batch, heads, m, dim)
    out_indices = torch.empty(batch, m, dtype=torch.int64, device=q.device)
    placeholder = out_indices  # pointers that the chosen source never reads
    indices_in = indices if indices is not None else placeholder
    draws = draws if draws is not None else placeholder
    mask, sm_b, sm_r, has_mask = _mask_args(key_mask, q.device)
    block_m = max(16, triton.next_power_of_2(m))
    landmark_rows_kernel[(batch, heads)](
        q, k, mask, cu_q, cu_k, draws, indices_in, out_indices, landmarks, *q_strides, *k_strides, sm_b, sm_r,
        draws.stride(0), indices_in.stride(0), out_indices.stride(0), *landmarks.stride(),
        n_q, n_k, heads, heads // kv_heads, m, dim, has_mask,
        SOURCE=source, BLOCK_M=block_m, PACKED=seqs is not None, **rows_config(block_m))
    return landmarks, out_indices


def backward_into(grad_q, grad_k, indices, key_mask, grad_from_queries, grad_from_keys, grad_from_solve,
                  refine_counts=None, seqs: tuple[Sequences, Sequences] | None = None):
    """Adds dL = sum of the query apply's split partials + the key summary's split partials + the solve's
    Gram term into grad_q / grad_k at the landmark rows, in place (one launch); batch rows with no valid key
    (zero landmark rows) get nothing. seqs: packed grad_q and grad_k, as in forward.

    With refinement (``refine_counts``: the (steps, b, H, m) counts of landmark_refine.forward) a seed gets dL
    only where its landmark never moved, and the total dL is returned, (b, H, m, p) float32, for
    landmark_refine.backward_into; else None."""
    batch, heads, m, dim = grad_from_solve.shape
    query_seqs, key_seqs = seqs if seqs is not None else (None, None)
    _, _, n_q, _, dq_strides, cu_q = _operand(grad_q, query_seqs)
    _, kv_heads, n_k, _, dk_strides, cu_k = _operand(grad_k, key_seqs)
    mask, sm_b, sm_r, has_mask = _mask_args(key_mask, grad_k.device)
    steps = 0 if refine_counts is None else refine_counts.shape[0]
    grad_total = (torch.empty(batch, heads, m, dim, dtype=torch.float32, device=grad_q.device) if steps
                  else None)
    counts = refine_counts if steps else grad_from_solve  # unread float32 placeholders without refinement
    total = grad_total if steps else grad_from_solve
    landmark_grad_scatter_kernel[(batch * kv_heads,)](
        indices, mask, cu_q, cu_k, grad_from_queries, grad_from_keys, grad_from_solve, grad_q, grad_k, counts,
        total, indices.stride(0), sm_b, sm_r, *grad_from_queries.stride(), *grad_from_keys.stride(),
        *grad_from_solve.stride(), *dq_strides, *dk_strides,
        *(refine_counts.stride()[:3] if steps else (0, 0, 0)), *total.stride()[:3], n_q, n_k, m, kv_heads,
        heads // kv_heads, grad_from_queries.shape[0], grad_from_keys.shape[0], dim, has_mask, steps,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_N=SCATTER_MASK_BLOCK, PACKED=seqs is not None,
        num_warps=4, maxnreg=SCATTER_MAX_REGISTERS)
    return grad_total
