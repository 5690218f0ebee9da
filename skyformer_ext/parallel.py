"""Context parallelism: Skyformer attention over a sequence sharded across the ranks of a torch.distributed
group, with communication that does not grow with the sequence length.

Rank r holds a contiguous shard of the queries and of the keys (rank order = sequence order; shards may be
uneven or empty). The Skyformer factorization out = kappa(Q, L) W kappa(L, K) V has only two global pieces,
both of size m x d per (batch, head): the landmark rows L and the key summary Z = kappa(L, K) V = sum over
ranks of kappa(L, K_r) V_r. So a call is:

    1. shard sizes and valid-key counts: one all-gather of (batch + 1) x 2 integers;
    2. random landmarks: rank 0's (batch, m) uniform draws, broadcast (none for strided or given landmarks);
       every rank maps them to global rows with the single-device rule (skyformer_ext.landmarks: the first
       m // 2 among the valid queries, the rest among the valid keys, the mask respected globally through the
       gathered counts), and fills the slots of the rows it owns;
    3. L: one all-reduce of the (batch, heads, m, p) slot buffer (each slot filled by its owner, zeros
       elsewhere);
    4. Z: the local key summary over the rank's valid keys, one all-reduce of (batch, heads, m, p_v);
    5. the small landmark solve Y = (kappa(L, L) + ridge I)^-1 Z, replicated on every rank (bit-identical: the
       same inputs); the query apply kappa(Q_r, L) Y, local.

Backward (autograd through the same stages): each all-reduce's backward is an all-reduce of its gradient.
The solve runs on the rank's local dY, so its dZ and its Gram part of dL are partial sums like the query
apply's dL: the dZ all-reduce adds the partial dZ once (then every rank's key summary backward uses the total),
and the dL all-reduce adds every partial dL (query apply + solve + key summary) once; each owner then scatters
the total into its own q/k rows. Nothing is summed twice.

Traffic per rank and call, forward + backward: 2 * batch * heads * m * (p + p_v) numbers (plus the counts and
the draws), whatever n is; ring attention moves every key and value to every rank, (P - 1) / P * 2 * n_k *
kv_heads * (p + p_v) per direction and rank. deterministic=True sums by all-gather then a fixed rank-order add
(bit-identical reruns); deterministic=False uses all_reduce. Only c10d collectives on the given group: gloo on
CPU, NCCL on CUDA.

Backends: "torch" composes the tiled PyTorch stages with autograd (the sums are autograd nodes); "triton"
("auto" on CUDA tensors the kernels cover) runs the fused stage kernels of triton_kernels (landmark rows
gathered in the input dtype, key summary, landmark solve, query apply, and their backward chain with the
landmark-gradient scatter kernel) as one autograd node with the same four sums inside; Z, dZ and dL cross the
ranks in float32, as the single-device op keeps them.

landmark_refine (Lloyd steps over the whole sequence): every rank assigns its own rows to the replicated
landmarks; the per-landmark sums and counts are summed over the ranks, one collective of m * (p + 1) per head
and step, and the means are replicated. The backward hands each row dL_j / count_j of its landmark, which needs
the total dL: the torch stages sum it once more per step (m * p), the Triton path has it from its dL sum.
"""

from __future__ import annotations

import torch

from . import _checks, solve
from ._amp import autocast_inputs, without_autocast
from .api import _resolve_backend
from .landmarks import landmark_draws


class _Communicator:
    """The collectives of one call on ``group``: every cross-rank sum goes through ``sum``."""

    def __init__(self, group, deterministic: bool):
        import torch.distributed as dist

        self.dist, self.group, self.deterministic = dist, group, deterministic
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(P, *t.shape): every rank's t, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of t over the ranks: all-gather and a rank-order add (deterministic), else all_reduce."""
        if self.deterministic:
            total = None
            for part in self.gather(t):  # a fixed order: bit-identical on every rank and rerun
                total = part.clone() if total is None else total + part
            return total
        total = t.contiguous().clone()
        self.dist.all_reduce(total, group=self.group)
        return total

    def broadcast_from_first(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        self.dist.broadcast(t, src=self.dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                            group=self.group)
        return t


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over the ranks. Backward: every rank's output was the same sum, and each rank's loss
    used it, so the input's gradient is the sum over the ranks of the output gradients."""

    @staticmethod
    def forward(ctx, t, comm):
        ctx.comm = comm
        return comm.sum(t)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.sum(grad), None


def _valid_rows_order(valid: torch.Tensor) -> torch.Tensor:
    """(batch, n) positions of the valid rows first, in increasing order (a stable sort)."""
    return torch.argsort((~valid).to(torch.int8), dim=1, stable=True)


def _owned_slots(comm, landmark_indices, draws, strategy, num_landmarks, n_q, n_k, sizes, counts, q_valid,
                 k_valid, device):
    """(rows (batch, m) int64 into this rank's [q_r; k_r], owned (batch, m) bool, has_keys (batch,) bool).

    sizes (P, 2): every rank's (n_q, n_k); counts (P, batch, 2): every rank's valid queries and keys per batch
    row. Given indices are global rows of [Q; K]; drawn or strided landmarks follow sample_landmarks' rule on
    the global valid rows (a batch row with no valid key anywhere treats every row as valid)."""
    offsets = torch.cumsum(sizes, 0) - sizes  # (P, 2) first global row of every rank's shard
    total_q, total_k = (int(x) for x in sizes.sum(0).tolist())
    first_q, first_k = (int(x) for x in offsets[comm.rank].tolist())
    has_keys = counts[:, :, 1].sum(0) > 0
    if landmark_indices is not None:
        idx = landmark_indices.long()
        is_key = idx >= total_q
        local = torch.where(is_key, idx - total_q - first_k, idx - first_q)
        owned = (local >= 0) & (local < torch.where(is_key, n_k, n_q))
        return torch.where(is_key, n_q + local, local).clamp(0, max(n_q + n_k - 1, 0)), owned, has_keys
    batch, m = counts.shape[1], num_landmarks
    m_q = m // 2 if total_q > 0 else 0
    slots = torch.arange(m, device=device)
    is_key = (slots >= m_q).expand(batch, m)
    if strategy == "strided":  # the midpoints of equal cells, per part (sample_landmarks' grid)
        count = torch.where(is_key, m - m_q, m_q).clamp_min(1)
        draws = (torch.where(is_key, slots - m_q, slots).double() + 0.5) / count.double()
    # Valid counts per part: where no key is valid anywhere, every row counts (the single-device rule).
    all_rows = sizes[:, None, :].expand_as(counts)
    counts = torch.where(has_keys[None, :, None], counts, all_rows)
    before = (torch.cumsum(counts, 0) - counts)[comm.rank]  # (batch, 2) valid rows on earlier ranks
    totals = counts.sum(0)
    part = is_key.long()
    n_valid = totals.gather(1, part)
    rank_in_part = torch.minimum((draws * n_valid.double()).long(), n_valid - 1)
    local_rank = rank_in_part - before.gather(1, part)
    owned = (local_rank >= 0) & (local_rank < counts[comm.rank].gather(1, part))
    rows = torch.zeros(batch, m, dtype=torch.long, device=device)
    for key_part, valid, n, offset in ((False, q_valid, n_q, 0), (True, k_valid, n_k, n_q)):
        if n == 0:
            continue
        valid = valid | ~has_keys[:, None]
        position = _valid_rows_order(valid).gather(1, local_rank.clamp(0, n - 1))
        rows = torch.where(is_key == key_part, position + offset, rows)
    return rows, owned, has_keys


def _slot_rows(q, k, rows, filled):
    """(batch, heads, m, p): this rank's rows of [q_r; k_r] in the slots it fills (filled (batch, m): the slots
    it owns, in batch rows with a valid key), zeros elsewhere (batch rows with no valid key: zero landmarks, as
    on one device). Differentiable: the gradient of a slot flows into the owner's row."""
    batch, heads, n_q, p = q.shape
    kv_heads, n_k, m = k.shape[1], k.shape[2], rows.shape[1]
    keep = filled[:, None, :, None]
    slots = q.new_zeros(batch, heads, m, p)
    if n_q:
        from_q = q.gather(2, rows.clamp(max=n_q - 1)[:, None, :, None].expand(batch, heads, m, p))
        slots = torch.where(keep & (rows < n_q)[:, None, :, None], from_q, slots)
    if n_k:
        from_k = k.gather(2, (rows - n_q).clamp(0, n_k - 1)[:, None, :, None].expand(batch, kv_heads, m, p))
        from_k = from_k.repeat_interleave(heads // kv_heads, dim=1) if heads > kv_heads else from_k
        slots = torch.where(keep & (rows >= n_q)[:, None, :, None], from_k, slots)
    return slots


def _check_inputs(q, k, v, attn_mask, landmark_indices):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # The dense rules, except that a shard may hold no key (the dense rule refuses n_k = 0).
    k_probe, v_probe = ((t if k.dim() != 4 or k.shape[2] else t.new_zeros(*t.shape[:2], 1, t.shape[3]))
                        for t in (k, v))
    _checks.check_qkv(q, k_probe, v_probe)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a bool torch.Tensor (batch, n_k_local), got "
                            f"{type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must have dtype torch.bool (True = key takes part), got {attn_mask.dtype}")
        if tuple(attn_mask.shape) != (q.shape[0], k.shape[2]):
            raise ValueError(f"attn_mask must be this rank's shard, shape (batch, n_k_local) = "
                             f"{(q.shape[0], k.shape[2])}, got {tuple(attn_mask.shape)}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    if landmark_indices is not None:
        if not isinstance(landmark_indices, torch.Tensor):
            raise TypeError(f"landmark_indices must be an integer torch.Tensor, got {type(landmark_indices).__name__}")
        if landmark_indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"landmark_indices must have dtype int64 or int32, got {landmark_indices.dtype}")
        if landmark_indices.dim() != 2 or landmark_indices.shape[0] != q.shape[0] or landmark_indices.shape[1] < 2:
            raise ValueError(f"landmark_indices must have shape (batch, num_landmarks >= 2) with batch={q.shape[0]}"
                             f" (global rows of the whole [Q; K]), got {tuple(landmark_indices.shape)}")
        if landmark_indices.device != q.device:
            raise ValueError(f"landmark_indices is on {landmark_indices.device} but q is on {q.device}")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                               attn_mask: torch.Tensor | None = None, num_landmarks: int = 128,
                               landmarks: str = "random", landmark_indices: torch.Tensor | None = None,
                               generator: torch.Generator | None = None, ridge: float = 0.1,
                               inverse: str = "newton_schulz", ns_iters: int = 6, scale: float | None = None,
                               backend: str = "auto", deterministic: bool = True,
                               landmark_refine: int = 0) -> torch.Tensor:
    """Skyformer attention on a sequence sharded over the ranks of ``group`` (default: the world group).

    Args:
        q: (batch, heads, n_q_local, p), this rank's contiguous shard of the queries; k, v: (batch, kv_heads,
            n_k_local, p / p_v), its shard of the keys and values. Shards follow the rank order, may be uneven,
            and may be empty (n_local = 0). Queries and keys may be sharded differently (cross-attention).
        attn_mask: optional bool (batch, n_k_local), this rank's shard of the key mask (True = takes part).
            In self-attention (the same global length for queries and keys) it also marks the valid queries,
            as on one device; then queries and keys must be sharded alike.
        landmark_indices: optional (batch, m) global rows of the whole [Q; K] (0..N_q - 1 queries, then keys),
            the same on every rank.
        generator: drives the random landmarks on rank 0 of the group, whose draws are broadcast (the other
            ranks' generators are not used).
        backend: "auto" (the Triton kernels for CUDA tensors they cover, else the tiled PyTorch stages),
            "torch" or "triton"; every rank must pick the same.
        landmark_refine: Lloyd steps on the landmarks (see :func:`skyformer_ext.skyformer_attention`), over the
            whole sequence: each rank assigns its own rows, and the per-landmark sums and counts are summed over
            the ranks (one collective of m * (p + 1) numbers per head and step; on the torch stages one more of
            m * p per step in the backward, the Triton path reuses the dL sum it makes anyway).
        Every other option as in :func:`skyformer_ext.skyformer_attention`.

    Returns:
        (batch, heads, n_q_local, p_v): this rank's shard of the output; autograd gives each rank the
        gradients of its own shards. Equals the single-process call on the concatenated sequence with the same
        landmarks (float64: to rounding). See the module docstring for the communication.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context_parallel_attention needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group)")
    _check_inputs(q, k, v, attn_mask, landmark_indices)
    _checks.check_skyformer_options(num_landmarks, landmarks, ridge, inverse, ns_iters, scale, deterministic,
                                    backend, landmark_refine)
    if backend == "reference":
        raise ValueError("context_parallel_attention runs the stages of the 'torch' or 'triton' backend on every "
                         "rank: backend must be 'auto', 'torch' or 'triton', got 'reference'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    comm = _Communicator(group, deterministic)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    device = q.device
    key_valid = (attn_mask if attn_mask is not None else torch.ones(batch, n_k, dtype=torch.bool, device=device))
    # 1. Every rank's shard sizes (row 0) and valid query / key counts per batch row: one all-gather.
    self_attention_mask = attn_mask is not None
    local = torch.stack([torch.tensor([n_q, n_k], device=device),
                         *torch.stack([torch.full((batch,), n_q, device=device), key_valid.sum(1)], 1)])
    gathered = comm.gather(local.long())
    sizes, counts = gathered[:, 0], gathered[:, 1:]
    total_q, total_k = (int(x) for x in sizes.sum(0).tolist())
    if total_k == 0:
        raise ValueError("k and v must hold at least one key over the ranks (every shard is empty)")
    if self_attention_mask and total_q == total_k:
        if not torch.equal(sizes[:, 0], sizes[:, 1]):
            raise ValueError("self-attention with attn_mask (the same global length for q and k): the mask marks "
                             "the valid queries too, so queries and keys must be sharded alike")
        counts = torch.stack([counts[:, :, 1], counts[:, :, 1]], 2)
        query_valid = key_valid
    else:
        query_valid = torch.ones(batch, n_q, dtype=torch.bool, device=device)
    if landmark_indices is not None and _checks.reads_values(landmark_indices):
        low, high = (int(x) for x in torch.stack([landmark_indices.min(), landmark_indices.max()]).tolist())
        if low < 0 or high >= total_q + total_k:
            raise ValueError(f"landmark_indices must lie in [0, N_q + N_k) = [0, {total_q + total_k}) (global rows "
                             f"of the whole [Q; K]), got range [{low}, {high}]")
    m = num_landmarks if landmark_indices is None else landmark_indices.shape[1]
    # 2. Random landmarks: rank 0's draws, broadcast.
    draws = None
    if landmark_indices is None and landmarks == "random":
        draws = comm.broadcast_from_first(landmark_draws(batch, m, generator, device))
    rows, owned, has_keys = _owned_slots(comm, landmark_indices, draws, landmarks, m, n_q, n_k, sizes, counts,
                                         query_valid, key_valid, device)
    q, k, v = autocast_inputs(q, k, v)
    scale = _checks.default_scale(scale, q.shape[-1])
    with without_autocast(device):
        if _resolve_backend(backend, q, v, m) == "triton":
            from . import triton_backend

            triton_backend.check_inputs(q, v)
            if m > triton_backend.MAX_LANDMARKS:
                raise ValueError(f"backend='triton' supports up to {triton_backend.MAX_LANDMARKS} landmarks, got "
                                 f"num_landmarks={m}; use backend='torch'")
            refinement = (landmark_refine, has_keys, self_attention_mask and total_q == total_k)
            return _ShardedTritonSkyformer.apply(q, k, v, attn_mask, rows, owned & has_keys[:, None], comm,
                                                 (scale, ridge, inverse, ns_iters, deterministic), refinement)
        return _skyformer_sharded(q, k, v, attn_mask, rows, owned & has_keys[:, None], comm, ridge, inverse,
                                  ns_iters, scale, landmark_refine,
                                  (query_valid & has_keys[:, None], key_valid & has_keys[:, None]))


def _skyformer_sharded(q, k, v, attn_mask, rows, filled, comm, ridge, inverse, ns_iters, scale, refine_steps,
                       point_validity):
    """The torch backend's stages (torch_backend.skyformer_attention) with the two global sums in between."""
    from .torch_backend import _LandmarkGram, gaussian_attention

    cdtype = _checks.compute_dtype(q.dtype)
    # 3. L: the owners' slots, summed over the ranks.
    # Connected to q and k even when this rank fills no slot: every rank must take part in the backward's sum.
    slots = _slot_rows(q, k, rows, filled) + 0 * (q.sum() + k.sum())
    landmarks = _SumOverRanks.apply(slots.to(cdtype), comm)
    for _ in range(refine_steps):
        landmarks = _ShardedLloydStep.apply(q, k, landmarks, *point_validity, comm)
    gram = _LandmarkGram.apply(landmarks, scale)
    # 4. Z: the local key summary (a rank without keys contributes zeros), summed over the ranks.
    if k.shape[2]:
        local_summary = gaussian_attention(landmarks, k, v, attn_mask, scale, out_dtype=cdtype)
    else:
        local_summary = landmarks.new_zeros(*landmarks.shape[:3], v.shape[-1]) + 0 * (k.sum() + v.sum())
    summary = _SumOverRanks.apply(local_summary, comm)
    # 5. The replicated solve, the local query apply.
    values = solve.landmark_solve(gram, summary, ridge, inverse, ns_iters)
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]) + 0 * values.sum().to(q.dtype)
    return gaussian_attention(q, landmarks, values, None, scale, out_dtype=q.dtype)


class _ShardedLloydStep(torch.autograd.Function):
    """One Lloyd step over the whole sequence: this rank's rows assigned to the (replicated) landmarks, the
    per-landmark sums and counts summed over the ranks in one collective, the means replicated. Backward: the
    rows' shares dL_j / count_j need the total dL of the new landmarks (one sum over the ranks); what passes on
    to a landmark that got no row stays this rank's partial, summed once where the seeds were gathered."""

    @staticmethod
    def forward(ctx, q, k, landmarks, query_valid, key_valid, comm):
        from .torch_backend import cluster_sums, moved_landmarks

        sums, counts, assignment = cluster_sums(q, k, landmarks, query_valid, key_valid)
        totals = comm.sum(torch.cat([sums, counts[..., None]], dim=-1))
        new, counts = moved_landmarks(totals[..., :-1], totals[..., -1], landmarks)
        ctx.save_for_backward(counts, assignment, q, k)
        ctx.comm = comm
        return new

    @staticmethod
    def backward(ctx, grad_new):
        from .torch_backend import cluster_row_grads, cluster_shares

        counts, assignment, q, k = ctx.saved_tensors
        share, _ = cluster_shares(ctx.comm.sum(grad_new), counts)
        _, passed_on = cluster_shares(grad_new, counts)
        return *cluster_row_grads(share, assignment, q, k), passed_on, None, None, None


def _power_of_two_scale(t: torch.Tensor) -> torch.Tensor:
    """(b, H) float32 powers of two f >= max|t| per (b, H) matrix (1 where t is 0): t / f fits float16."""
    mantissa, exponent = torch.frexp(t.abs().amax(dim=(-2, -1)))
    return torch.where(mantissa > 0, torch.ldexp(torch.ones_like(mantissa), exponent), torch.ones_like(mantissa))


def _triton_lloyd_steps(q, k, key_mask, landmarks, comm, steps, has_keys, queries_masked):
    """(landmarks after ``steps`` Lloyd steps over the whole sequence, this rank's assignments (steps, b, H,
    n_q + n_k) int32, the global counts (steps, b, H, m) float32): the assign kernel on the local rows, the
    split sums and counts added locally in a fixed order, then summed over the ranks in one collective."""
    from triton_kernels import landmark_refine as refine_stage
    from triton_kernels.gaussian_tiles import reduce_splits

    from .torch_backend import moved_landmarks

    batch, heads, m, dim = landmarks.shape
    rows = q.shape[2] + k.shape[2]
    assignments = torch.empty(steps, batch, heads, rows, dtype=torch.int32, device=q.device)
    counts = torch.empty(steps, batch, heads, m, dtype=torch.float32, device=q.device)
    for step in range(steps):
        if rows:
            sums, split_counts, assignment = refine_stage.assign_points(q, k, key_mask, landmarks, queries_masked)
            assignments[step] = assignment[0]
            local = torch.cat([reduce_splits(sums, torch.float32),
                               reduce_splits(split_counts, torch.float32)[..., None]], dim=-1)
        else:
            local = landmarks.new_zeros(batch, heads, m, dim + 1, dtype=torch.float32)
        totals = comm.sum(local)
        # A batch row with no valid key anywhere keeps its zero landmarks (the update kernel's rule).
        counts[step] = torch.where(has_keys[:, None, None], totals[..., -1], 0.0)
        landmarks = moved_landmarks(totals[..., :-1], counts[step], landmarks.float())[0].to(landmarks.dtype)
    return landmarks, assignments, counts


class _ShardedTritonSkyformer(torch.autograd.Function):
    """backend="triton" on every rank: the stage kernels of triton_kernels with the sums over the ranks between
    them, one autograd node (its backward runs the kernels' backward chain and the two backward sums). Z, dZ
    and dL cross the ranks in float32, as the single-device op keeps them; the landmark rows in the input
    dtype (each slot has one owner: the sum is exact). Lloyd steps: the assignment kernel on the local rows,
    its split sums and counts summed over the ranks, the means taken in float32 and stored in the input
    dtype (as the update kernel does); backward: the total dL to the seeds that never moved (scatter kernel)
    and each local row's share (the refine grad kernel with the global counts)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, rows, filled, comm, options, refinement):
        from triton_kernels import key_summary, landmark_solve, query_apply
        from triton_kernels.gaussian_tiles import reduce_splits

        scale, ridge, inverse, ns_iters, deterministic = options
        batch, heads, n_q, _ = q.shape
        m, dim_v = rows.shape[1], v.shape[-1]
        with torch.no_grad():
            landmarks = comm.sum(_slot_rows(q, k, rows, filled))
            landmarks, assignments, counts = _triton_lloyd_steps(q, k, key_mask, landmarks, comm, *refinement)
            if k.shape[2]:
                local_summary = reduce_splits(key_summary.forward(k, v, landmarks, key_mask, scale, deterministic),
                                              torch.float32)
            else:
                local_summary = landmarks.new_zeros(batch, heads, m, dim_v, dtype=torch.float32)
            summary_total = comm.sum(local_summary)[None]  # one "split" of the solve's partial sums
            values, summary = landmark_solve.forward(landmarks, summary_total, scale, ridge, inverse, ns_iters,
                                                     q.dtype)
            out = (query_apply.forward(q, landmarks, values, scale) if n_q
                   else q.new_zeros(batch, heads, 0, dim_v))
        ctx.save_for_backward(q, k, v, key_mask, rows, filled, landmarks, summary, values, assignments, counts)
        ctx.comm, ctx.options = comm, options
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from triton_kernels import key_summary, landmark_solve, query_apply
        from triton_kernels import landmark_refine as refine_stage
        from triton_kernels import landmarks as landmark_stage
        from triton_kernels.gaussian_tiles import reduce_splits

        q, k, v, key_mask, rows, filled, landmarks, summary, values, assignments, counts = ctx.saved_tensors
        comm = ctx.comm
        scale, ridge, inverse, ns_iters, deterministic = ctx.options
        f32 = dict(dtype=torch.float32)
        if q.shape[2]:
            grad_q, grad_landmarks_queries, grad_values = query_apply.backward(grad_out.contiguous(), q, landmarks,
                                                                               values, scale, deterministic)
            grad_landmarks = reduce_splits(grad_landmarks_queries, torch.float32)
        else:
            grad_q, grad_landmarks = torch.zeros_like(q), landmarks.new_zeros(landmarks.shape, **f32)
            grad_values = values.new_zeros(1, *values.shape, **f32)
        # This rank's dY gives partial dZ and Gram dL (the solve is linear in dY); float32 dZ for the sum.
        grad_summary_scaled, grad_factor, grad_landmarks_solve = landmark_solve.backward(
            grad_values, landmarks, summary, scale, ridge, inverse, ns_iters, torch.float32)
        grad_summary = comm.sum(grad_summary_scaled * grad_factor[..., None, None])
        grad_landmarks += grad_landmarks_solve
        if k.shape[2]:
            grad_factor = _power_of_two_scale(grad_summary)
            grad_k, grad_v, grad_landmarks_keys = key_summary.backward(
                (grad_summary / grad_factor[..., None, None]).to(k.dtype), grad_factor, k, v, landmarks, key_mask,
                scale, deterministic)
            grad_landmarks += reduce_splits(grad_landmarks_keys, torch.float32)
        else:
            grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_landmarks = comm.sum(grad_landmarks)
        # A seed gets dL where its landmark never moved (got no row in any step), and only from its owner.
        grad_seeds = grad_landmarks * ((counts == 0).all(0) & filled[:, None, :])[..., None]
        if q.shape[2] or k.shape[2]:
            # Each owner adds the total dL of its slots into its q / k rows (one launch, duplicates in slot
            # order); unfilled slots add zeros. A rank without keys lends the kernel a one-row dummy dk.
            grad_k_rows = grad_k if k.shape[2] else k.new_zeros(*k.shape[:2], 1, k.shape[3])
            no_partials = grad_seeds[None][:0]  # (0 splits, b, H, m, p): dL arrives whole
            landmark_stage.backward_into(grad_q, grad_k_rows, rows.contiguous(), None, no_partials, no_partials,
                                         grad_seeds)
            if assignments.shape[0]:  # every local row's share dL_j / count_j, through the steps
                refine_stage.backward_into(grad_q, grad_k, assignments, counts, grad_landmarks)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None
