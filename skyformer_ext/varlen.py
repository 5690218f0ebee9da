"""Packed variable-length sequences (flash-attn's varlen layout): validation, landmarks, and the tile table
that maps the packed rows onto the dense stages.

Layout: q (total_q, heads, p), k (total_k, kv_heads, p), v (total_k, kv_heads, p_v); sequence s holds the
query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] and the key rows cu_seqlens_k[s]:cu_seqlens_k[s + 1].
Every sequence is its own Skyformer problem: its own landmarks (rows of its own [q_s; k_s]), Gram, solve
and key summary.

The tile table cuts every sequence into tiles of at most ``tile`` consecutive rows. A tile never crosses a
sequence boundary, so the dense stages run unchanged on a batch of tiles, each tile paired with its
sequence's landmarks: a layout is an addressing detail, not another implementation. The table is built on
the device from cu_seqlens with a fixed upper bound on its size (num_seqs + total // tile tiles), so it needs
no host sync; unused entries are empty tiles.
"""

from __future__ import annotations

import torch

from . import _checks


def check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """TypeError / ValueError naming the argument, for the packed layout and its sequence boundaries.

    The value checks (cu_seqlens start at 0, never decrease, end at the totals, max_seqlen bounds every
    length) read the boundaries back: one host sync, skipped under torch.compile and CUDA-graph capture."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total_tokens, heads, head_dim) (packed varlen layout), got "
                             f"shape {tuple(t.shape)}")
    # The per-tensor dtype, device, head and head-dim rules are the dense ones; a pack may hold no key at all
    # (every sequence keyless: zeros), which the dense rule refuses, so it sees one stand-in row then.
    k_probe, v_probe = ((t if k.shape[0] else t.new_zeros(1, *t.shape[1:])) for t in (k, v))
    _checks.check_qkv(q.transpose(0, 1)[None], k_probe.transpose(0, 1)[None], v_probe.transpose(0, 1)[None])
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32 (flash-attn's convention), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be 1-D of length num_seqs + 1 >= 2, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got lengths "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        _checks.check_positive_int(name, value, 0)
    if not _checks.reads_values(cu_seqlens_q):
        return
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        lengths = cu.diff()
        first, last, shortest, most = (int(x) for x in torch.stack(
            [cu[0], cu[-1], lengths.min(), lengths.max()]).tolist())
        if first != 0:
            raise ValueError(f"{name} must start at 0, got {first}")
        if shortest < 0:
            raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0), got a length of {shortest}")
        if last != total:
            raise ValueError(f"{name} must end at the number of packed rows ({total}), got {last}")
        max_name = "max_seqlen_" + name[-1]
        if most > longest:
            raise ValueError(f"{max_name} ({longest}) is smaller than the longest sequence ({most})")


def _lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]


def check_packed_landmark_indices(idx, cu_seqlens_q, cu_seqlens_k, device) -> None:
    """(num_seqs, m) rows of each sequence's own [q_s; k_s]: 0..len_q - 1 queries, then its keys."""
    num_seqs = cu_seqlens_q.shape[0] - 1
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"landmark_indices must be an integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"landmark_indices must have dtype int64 or int32, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != num_seqs or idx.shape[1] < 2:
        raise ValueError(f"landmark_indices must have shape (num_seqs, num_landmarks) with num_seqs={num_seqs} and "
                         f"num_landmarks >= 2, got {tuple(idx.shape)}")
    if idx.device != torch.device(device):
        raise ValueError(f"landmark_indices is on {idx.device} but q is on {device}")
    if idx.numel() and _checks.reads_values(idx):
        rows = (_lengths(cu_seqlens_q) + _lengths(cu_seqlens_k))[:, None]
        outside = (idx < 0) | ((idx >= rows) & (rows > 0))
        if bool(outside.any()):
            s = int(outside.any(1).nonzero()[0, 0])
            raise ValueError(f"landmark_indices of sequence {s} must lie in [0, len_q + len_k) = "
                             f"[0, {int(rows[s, 0])}) (rows of its own [q; k]), got "
                             f"{idx[s].tolist()}")


def sample_packed_landmarks(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, num_landmarks: int,
                            strategy: str, draws: torch.Tensor | None) -> torch.Tensor:
    """(num_seqs, m) int64 rows of each sequence's own [q_s; k_s], by the dense sampler's rule per sequence
    (skyformer_ext.landmarks.sample_landmarks without a mask): the first m // 2 landmarks among its queries
    (none when it has no query), the rest among its keys; ``draws`` (num_seqs, m) uniform in [0, 1) for
    "random", the midpoints of equal cells for "strided". A sequence without keys gets row 0 everywhere (its
    landmarks are zero rows)."""
    lengths_q, lengths_k = _lengths(cu_seqlens_q), _lengths(cu_seqlens_k)
    num_seqs, m = lengths_q.shape[0], num_landmarks
    slots = torch.arange(m, device=lengths_q.device).expand(num_seqs, m)
    m_queries = torch.where(lengths_q > 0, m // 2, 0)[:, None]
    is_key = slots >= m_queries
    if strategy == "strided":
        count = torch.where(is_key, m - m_queries, m_queries)
        local = torch.where(is_key, slots - m_queries, slots)
        draws = (local.double() + 0.5) / count.clamp_min(1).double()
    n_valid = torch.where(is_key, lengths_k[:, None], lengths_q[:, None]).long()
    rank = torch.minimum((draws * n_valid.double()).long(), n_valid - 1).clamp_min(0)
    rows = torch.where(is_key, lengths_q[:, None].long() + rank, rank)
    return torch.where(lengths_k[:, None] > 0, rows, 0)


def gather_packed_landmarks(q, k, cu_seqlens_q, cu_seqlens_k, indices) -> torch.Tensor:
    """L (num_seqs, heads, m, p) in the inputs' units and dtype: rows of each sequence's own [q_s; k_s];
    zero rows for a sequence without keys (its output is zero whatever they are). Differentiable."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    starts_q, starts_k = cu_seqlens_q[:-1].long()[:, None], cu_seqlens_k[:-1].long()[:, None]
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[:, None]
    has_keys = (cu_seqlens_k[1:] > cu_seqlens_k[:-1])[:, None, None, None]
    idx = indices.long()
    is_query = (idx < lengths_q)[:, :, None, None]
    q_rows = (starts_q + idx).clamp(0, max(q.shape[0] - 1, 0))
    k_rows = (starts_k + idx - lengths_q).clamp(0, max(k.shape[0] - 1, 0))
    from_k = k[k_rows] if k.shape[0] else k.new_zeros(*idx.shape, *k.shape[1:])
    from_k = from_k.repeat_interleave(group, dim=2) if group > 1 else from_k
    rows = torch.where(is_query, q[q_rows], from_k) if q.shape[0] else from_k
    return rows.masked_fill(~has_keys, 0.0).transpose(1, 2).contiguous()


def tile_table(cu_seqlens: torch.Tensor, total: int, tile: int):
    """(rows, seq, valid) of the tiles of every sequence: rows (num_tiles, tile) packed row of each slot (0 on
    unused slots), seq (num_tiles,) its sequence (clamped into range on empty tiles), valid (num_tiles, tile)
    bool. num_tiles = num_seqs + total // tile bounds the tiles the sequences need (sum of ceil(len / tile)),
    so no value is read back; the tiles past what they need are empty (valid all False)."""
    num_seqs = cu_seqlens.shape[0] - 1
    device = cu_seqlens.device
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    tiles_per_seq = (lengths + tile - 1) // tile
    bound = num_seqs + total // tile
    # The unused tiles belong to a sentinel sequence num_seqs, so that the repeats sum to the bound exactly.
    repeats = torch.cat([tiles_per_seq, (bound - tiles_per_seq.sum()).reshape(1)])
    seq = torch.repeat_interleave(torch.arange(num_seqs + 1, device=device), repeats, output_size=bound)
    first_tile = torch.cumsum(repeats, 0) - repeats
    tile_in_seq = torch.arange(bound, device=device) - first_tile[seq]
    used = seq < num_seqs
    seq = seq.clamp(max=max(num_seqs - 1, 0))
    offsets = tile_in_seq[:, None] * tile + torch.arange(tile, device=device)
    valid = used[:, None] & (offsets < lengths[seq][:, None])
    rows = torch.where(valid, starts[seq][:, None] + offsets, 0)
    return rows, seq, valid


# ---- the stages on packed rows ------------------------------------------------------------------------------

# Rows per tile and gathered elements per chunk of tiles: a chunk is one call of the dense tiled op.
TILE_ROWS = 128
CHUNK_ELEMENTS = 1 << 21


def _chunks(num_tiles: int, per_tile: int):
    size = max(1, CHUNK_ELEMENTS // max(per_tile, 1))
    return [(c0, min(c0 + size, num_tiles)) for c0 in range(0, num_tiles, size)]


def _tiles(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Packed (total, heads, d) rows gathered into tiles, (tiles, heads, tile, d)."""
    return x[rows].transpose(1, 2)


class Operand:
    """How a chunk of a packed stage reads one operand: ``rows`` (tiles, tile) packed rows of a (total, heads, d)
    tensor (``valid`` marks the slots that hold a row), or ``seq`` (tiles,) the sequence whose (heads, m, d)
    block of a per-sequence tensor each tile uses."""

    def __init__(self, rows=None, valid=None, seq=None):
        self.rows, self.valid, self.seq = rows, valid, seq

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.seq is not None:
            return t[self.seq]
        return _tiles(t, self.rows).masked_fill(~self.valid[:, None, :, None], 0.0)

    def add_into(self, buffer: torch.Tensor, part: torch.Tensor) -> None:
        """buffer += the chunk's ``part`` at the rows (or sequences) it came from (index_add_: in order on the
        CPU)."""
        if self.seq is not None:
            buffer.index_add_(0, self.seq, part.to(buffer.dtype))
        else:
            buffer.index_add_(0, self.rows[self.valid], part.transpose(1, 2)[self.valid].to(buffer.dtype))


class _ChunkedStage(torch.autograd.Function):
    """out[at out_of(c)] += kappa(X_c, Y_c) V_c over chunks c of tiles (the dense tiled op per chunk), with
    X_c, Y_c, V_c gathered by Operands. The backward recomputes each chunk and adds its gradients into one
    buffer per input: autograd through the gathers would allocate an input-sized gradient per chunk."""

    @staticmethod
    def forward(ctx, x, y, v, chunks, scale, out_shape, out_dtype):
        from .torch_backend import gaussian_attention

        cdtype = _checks.compute_dtype(x.dtype)
        out = torch.zeros(out_shape, dtype=cdtype, device=x.device)
        for xs, ys, vs, mask, outs in chunks:
            outs.add_into(out, gaussian_attention(xs.gather(x), ys.gather(y), vs.gather(v), mask, scale,
                                                  out_dtype=cdtype))
        ctx.save_for_backward(x, y, v)
        ctx.chunks, ctx.scale = chunks, scale
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from ._autograd import first_order_only
        from .torch_backend import gaussian_attention

        x, y, v = ctx.saved_tensors
        cdtype = _checks.compute_dtype(x.dtype)
        grads = [torch.zeros(t.shape, dtype=cdtype, device=t.device) for t in (x, y, v)]
        for xs, ys, vs, mask, outs in ctx.chunks:
            with torch.enable_grad():
                parts = [spec.gather(t).detach().requires_grad_() for spec, t in ((xs, x), (ys, y), (vs, v))]
                chunk_out = gaussian_attention(*parts, mask, ctx.scale, out_dtype=cdtype)
                chunk_grads = torch.autograd.grad(chunk_out, parts, outs.gather(grad_out).to(cdtype))
            for spec, buffer, grad in zip((xs, ys, vs), grads, chunk_grads):
                spec.add_into(buffer, grad)
        grads = tuple(g.to(t.dtype) for g, t in zip(grads, (x, y, v)))
        return *first_order_only("torch", grads, (grad_out, x, y, v)), None, None, None, None


def key_summary(k, v, landmarks, cu_seqlens_k, scale: float) -> torch.Tensor:
    """Z_s = kappa(K_s, L_s)^T V_s per sequence, (num_seqs, heads, m, p_v) in the landmarks' dtype: the dense
    key summary on each key tile against its sequence's landmarks, added per sequence."""
    num_seqs, heads, m, _ = landmarks.shape
    if k.shape[0] == 0:
        return landmarks.new_zeros(num_seqs, heads, m, v.shape[-1])
    rows, seq, valid = tile_table(cu_seqlens_k, k.shape[0], TILE_ROWS)
    chunks = []
    for c0, c1 in _chunks(rows.shape[0], TILE_ROWS * k.shape[1] * (k.shape[2] + v.shape[2])):
        keys = Operand(rows=rows[c0:c1], valid=valid[c0:c1])
        chunks.append((Operand(seq=seq[c0:c1]), keys, keys, valid[c0:c1], Operand(seq=seq[c0:c1])))
    return _ChunkedStage.apply(landmarks, k, v, chunks, scale, (num_seqs, heads, m, v.shape[-1]), landmarks.dtype)


def query_apply(q, landmarks, landmark_values, cu_seqlens_q, scale: float) -> torch.Tensor:
    """O = kappa(Q_s, L_s) Y_s per sequence, (total_q, heads, p_v) in q's dtype: the dense query apply on each
    query tile with its sequence's landmarks and values."""
    out_shape = (q.shape[0], q.shape[1], landmark_values.shape[-1])
    if q.shape[0] == 0:
        return q.new_zeros(out_shape)
    rows, seq, valid = tile_table(cu_seqlens_q, q.shape[0], TILE_ROWS)
    chunks = []
    for c0, c1 in _chunks(rows.shape[0], TILE_ROWS * q.shape[1] * (q.shape[2] + landmark_values.shape[-1])):
        queries, sequences = Operand(rows=rows[c0:c1], valid=valid[c0:c1]), Operand(seq=seq[c0:c1])
        chunks.append((queries, sequences, sequences, None, queries))
    return _ChunkedStage.apply(q, landmarks, landmark_values.to(landmarks.dtype), chunks, scale, out_shape, q.dtype)


def skyformer_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, indices, ridge, inverse, ns_iters, scale,
                    landmark_refine: int = 0) -> torch.Tensor:
    """backend="torch": landmarks (-> Lloyd steps) -> Gram -> key summary -> solve -> query apply, the dense
    tiled stages."""
    from . import solve
    from .torch_backend import _LandmarkGram

    cdtype = _checks.compute_dtype(q.dtype)
    landmarks = gather_packed_landmarks(q, k, cu_seqlens_q, cu_seqlens_k, indices).to(cdtype)
    landmarks = refine_packed_landmarks(q, k, landmarks, cu_seqlens_q, cu_seqlens_k, landmark_refine)
    gram = _LandmarkGram.apply(landmarks, scale)
    summary = key_summary(k, v, landmarks, cu_seqlens_k, scale)
    values = solve.landmark_solve(gram, summary, ridge, inverse, ns_iters)
    return query_apply(q, landmarks, values, cu_seqlens_q, scale)


def kernelized_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float) -> torch.Tensor:
    """backend="torch" exact kernelized attention: every (query tile, key tile) pair of a sequence through the
    dense tiled op, partial outputs added per query row. The pair list is built from the sequence lengths
    on the host (a read-back of cu_seqlens; free on the CPU)."""
    out_shape = (q.shape[0], q.shape[1], v.shape[-1])
    if q.shape[0] == 0 or k.shape[0] == 0:
        return q.new_zeros(out_shape)
    q_rows, q_seq, q_valid = tile_table(cu_seqlens_q, q.shape[0], TILE_ROWS)
    k_rows, k_seq, k_valid = tile_table(cu_seqlens_k, k.shape[0], TILE_ROWS)
    used_q = q_valid.any(1).tolist()
    k_tiles_of = {}
    for tile, (s, used) in enumerate(zip(k_seq.tolist(), k_valid.any(1).tolist())):
        if used:
            k_tiles_of.setdefault(s, []).append(tile)
    pairs = [(qt, kt) for qt, s in enumerate(q_seq.tolist()) if used_q[qt] for kt in k_tiles_of.get(s, [])]
    if not pairs:
        return q.new_zeros(out_shape) + 0 * (q.sum() + k.sum() + v.sum())
    pair_q, pair_k = (torch.tensor(col, device=q.device) for col in zip(*pairs))
    chunks = []
    for c0, c1 in _chunks(len(pairs), TILE_ROWS * q.shape[1] * (2 * q.shape[2] + v.shape[2])):
        qt, kt = pair_q[c0:c1], pair_k[c0:c1]
        queries, keys = Operand(rows=q_rows[qt], valid=q_valid[qt]), Operand(rows=k_rows[kt], valid=k_valid[kt])
        chunks.append((queries, keys, keys, k_valid[kt], queries))
    return _ChunkedStage.apply(q, k, v, chunks, scale, out_shape, q.dtype)


# ---- the reference: a loop of dense reference calls ----------------------------------------------------------

def _sequences(cu_seqlens_q, cu_seqlens_k):
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(bounds_q[s], bounds_q[s + 1], bounds_k[s], bounds_k[s + 1]) for s in range(len(bounds_q) - 1)]


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)[None]


def _packed(x: torch.Tensor) -> torch.Tensor:
    return x[0].transpose(0, 1)


def _per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, attend) -> torch.Tensor:
    """attend(s, q_s, k_s, v_s) in the dense layout for every sequence with queries and keys, packed back;
    zeros (connected to q, k, v) for a sequence without keys."""
    outputs = []
    for s, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        if k1 == k0 or q1 == q0:
            outputs.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum()))
            continue
        outputs.append(_packed(attend(s, _dense(q[q0:q1]), _dense(k[k0:k1]), _dense(v[k0:k1]))))
    return torch.cat(outputs) if outputs else q.new_zeros(0, q.shape[1], v.shape[-1])


def skyformer_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, indices, ridge, inverse, ns_iters, scale,
                        landmark_refine=0) -> torch.Tensor:
    """One dense reference call per sequence (zeros for a sequence without keys)."""
    from . import reference

    return _per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, lambda s, q, k, v: reference.skyformer_attention(
        q, k, v, indices[s:s + 1], ridge=ridge, inverse=inverse, ns_iters=ns_iters, scale=scale,
        landmark_refine=landmark_refine))


def kernelized_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale) -> torch.Tensor:
    from . import reference

    return _per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k,
                         lambda s, q, k, v: reference.kernelized_attention(q, k, v, scale=scale))


# ---- landmark refinement on packed rows ----------------------------------------------------------------------

def _sequence_of_rows(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                   output_size=total)


@torch.library.custom_op("skyformer_ext::lloyd_step_packed", mutates_args=())
def _lloyd_step_packed_op(q: torch.Tensor, k: torch.Tensor, landmarks: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lloyd step per sequence (reference.refine_landmarks' rule; a sequence without keys keeps its zero
    landmarks): (new landmarks (S, H, m, p), counts (S, H, m), assignment (H, total_q + total_k) int32, -1
    for rows that take no part). torch_backend.assign_and_add on the tiles of the tile table, each with its
    sequence's landmarks, then the per-tile sums added per sequence."""
    from .torch_backend import assign_and_add, landmark_half_norms, moved_landmarks

    num_seqs, heads, m, dim = landmarks.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    device, cdtype = q.device, landmarks.dtype
    half_norm = landmark_half_norms(landmarks)
    sums = torch.zeros(num_seqs, heads, m + 1, dim, dtype=cdtype, device=device)
    counts = torch.zeros(num_seqs, heads, m + 1, dtype=cdtype, device=device)
    assignment = torch.full((heads, q.shape[0] + k.shape[0]), -1, dtype=torch.int32, device=device)
    has_keys = cu_seqlens_k[1:] > cu_seqlens_k[:-1]
    for rows_of, cu, offset, width in ((q, cu_seqlens_q, 0, heads), (k, cu_seqlens_k, q.shape[0], kv_heads)):
        if rows_of.shape[0] == 0:
            continue
        rows, seq, valid = tile_table(cu, rows_of.shape[0], TILE_ROWS)
        valid = valid & has_keys[seq][:, None]
        for c0, c1 in _chunks(rows.shape[0], TILE_ROWS * heads * (dim + m)):
            tiles, tile_seq, keep = rows[c0:c1], seq[c0:c1], valid[c0:c1]
            chunk = tiles.shape[0]
            x = _tiles(rows_of, tiles).to(cdtype).reshape(chunk * kv_heads, width // kv_heads, TILE_ROWS, dim)
            tile_sums = torch.zeros(chunk * kv_heads, group, m + 1, dim, dtype=cdtype, device=device)
            tile_counts = torch.zeros(chunk * kv_heads, group, m + 1, dtype=cdtype, device=device)
            nearest = assign_and_add(x, keep.repeat_interleave(kv_heads, 0)[:, None], landmarks[tile_seq].reshape(
                chunk * kv_heads, group, m, dim), half_norm[tile_seq].reshape(chunk * kv_heads, group, 1, m),
                tile_sums, tile_counts)
            sums.index_add_(0, tile_seq, tile_sums.reshape(chunk, heads, m + 1, dim))
            counts.index_add_(0, tile_seq, tile_counts.reshape(chunk, heads, m + 1))
            nearest = nearest.reshape(chunk, heads, TILE_ROWS).transpose(0, 1)[:, keep]
            assignment[:, offset + tiles[keep]] = nearest.masked_fill(nearest == m, -1).int()
    new, counts = moved_landmarks(sums, counts, landmarks)
    return new, counts, assignment


@_lloyd_step_packed_op.register_fake
def _(q, k, landmarks, cu_seqlens_q, cu_seqlens_k):
    return (landmarks.new_empty(landmarks.shape), landmarks.new_empty(landmarks.shape[:3]),
            q.new_empty(landmarks.shape[1], q.shape[0] + k.shape[0], dtype=torch.int32))


@torch.library.custom_op("skyformer_ext::lloyd_step_packed_backward", mutates_args=())
def _lloyd_step_packed_backward_op(grad_new: torch.Tensor, counts: torch.Tensor, assignment: torch.Tensor,
                                   q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                   cu_seqlens_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, d seeds): each row gets dL_j / count_j of its sequence's landmark j (a gather, O(rows x p));
    landmarks that got no row pass dL_j on to their previous position."""
    from .torch_backend import cluster_shares

    num_seqs, heads, m, dim = grad_new.shape
    kv_heads = k.shape[1]
    share, passed_on = cluster_shares(grad_new, counts)
    share = share.reshape(-1, dim)

    def gathered(cu, total, offset):  # (total, heads, p)
        seq = _sequence_of_rows(cu, total)
        nearest = assignment[:, offset:offset + total].T.long()  # (total, heads)
        slot = (seq[:, None] * heads + torch.arange(heads, device=q.device)) * m + nearest.clamp_min(0)
        return share[slot].masked_fill((nearest < 0)[..., None], 0.0)

    grad_q = gathered(cu_seqlens_q, q.shape[0], 0)
    grad_k = gathered(cu_seqlens_k, k.shape[0], q.shape[0]).reshape(k.shape[0], kv_heads, heads // kv_heads,
                                                                    dim).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), passed_on


@_lloyd_step_packed_backward_op.register_fake
def _(grad_new, counts, assignment, q, k, cu_seqlens_q, cu_seqlens_k):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(grad_new)


def _lloyd_packed_setup(ctx, inputs, output):
    q, k, _, cu_seqlens_q, cu_seqlens_k = inputs
    _, counts, assignment = output
    ctx.save_for_backward(counts, assignment, q, k, cu_seqlens_q, cu_seqlens_k)
    ctx.mark_non_differentiable(counts, assignment)


def _lloyd_packed_backward(ctx, grad_new, *_unused_grads):
    from ._amp import without_autocast
    from ._autograd import first_order_only

    with torch.no_grad(), without_autocast(grad_new.device):
        grads = _lloyd_step_packed_backward_op(grad_new, *ctx.saved_tensors)
    return *first_order_only("torch", grads, (grad_new, *ctx.saved_tensors)), None, None


_lloyd_step_packed_op.register_autograd(_lloyd_packed_backward, setup_context=_lloyd_packed_setup)


def refine_packed_landmarks(q, k, landmarks, cu_seqlens_q, cu_seqlens_k, steps: int) -> torch.Tensor:
    for _ in range(steps):
        landmarks = _lloyd_step_packed_op(q, k, landmarks, cu_seqlens_q, cu_seqlens_k)[0]
    return landmarks
