"""backend="triton": the fused kernels of triton_kernels/ as torch.library custom ops with autograd.

A Skyformer call is one custom op whose backward is another, so torch.compile keeps each as a single graph
node and the whole call is one autograd path. The forward launches, in order (stage modules of triton_kernels):

    [torch.rand: the landmark draws, random landmarks only] -> landmarks (indices + landmark rows)
    -> [landmark_refine: per Lloyd step, assignment + split sums, then the update]
    -> key_summary (split partial sums of Z) -> landmark_solve (Gram, partials added on load, solve: Y)
    -> query_apply (O)

and the backward: query_apply (dq; dL, dY partials) -> landmark_solve (dZ, the Gram term of dL) ->
key_summary (dL partials; dk, dv) -> landmarks (every dL part added on load and scattered into dq, dk; with
refinement only into seeds that never moved, and the total dL kept) -> [landmark_refine: per step, each
row's share dL_j / count_j of its landmark into dq, dk].
No launch computes anything but these stages (no memsets, no separate reductions, no casts) and nothing
waits for the GPU: the call can be captured in a CUDA graph. Nothing (n x m) or (n x n) exists, forward or
backward: the kernels recompute kappa tiles; the extra buffers are O(m * p) per head plus bounded per-split
partial sums (deterministic=False: one float32 buffer per reduction that the splits add into atomically).
Packed variable-length calls (skyformer_attention_varlen) are the same op with cu_seqlens: the same kernels and
launches (refinement included), addressed by sequence. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (set before this module is first
imported; the tests do).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from triton_kernels import key_summary, kernelized, landmark_solve, query_apply
from triton_kernels import landmark_refine as refine_stage
from triton_kernels import landmarks as landmark_stage
from triton_kernels.gaussian_tiles import Sequences

from ._amp import AUTOCAST_DEVICES, autocast_inputs, without_autocast
from ._autograd import first_order_only
from ._stages import stage

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # the largest compiled head-dim bucket, every dtype


MAX_LANDMARKS = landmark_solve.MAX_LANDMARKS  # the fused solve keeps m x m matrices per program


def supports(q: Tensor, v: Tensor, num_landmarks: int = 0) -> bool:
    """Whether the kernels cover this dtype, these head dims and (Skyformer) this many landmarks: what "auto"
    asks before choosing triton."""
    return (q.dtype in SUPPORTED_DTYPES and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
            and num_landmarks <= MAX_LANDMARKS)


def check_inputs(q: Tensor, v: Tensor) -> None:
    """backend="triton" needs CUDA tensors (or the interpreter), fp16/bf16/fp32 and head dims it compiles."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got {q.dtype}; "
                        f"use backend='torch' for float64")
    head_dim = max(q.shape[-1], v.shape[-1])
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got {head_dim}; use "
                         f"backend='torch'")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got q on {q.device} (set TRITON_INTERPRET=1 "
                         f"before importing skyformer_ext to run the kernels on CPU in Triton's interpreter)")


# ---- Skyformer: the five stages in one op ---------------------------------------------------------------

@torch.library.custom_op("skyformer_ext::skyformer_attention", mutates_args=())
def skyformer_attention_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                           landmark_indices: Optional[Tensor], landmark_draws: Optional[Tensor],
                           num_landmarks: int, scale: float, ridge: float, inverse: str, ns_iters: int,
                           deterministic: bool, landmark_refine: int, cu_seqlens_q: Optional[Tensor] = None,
                           cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, landmarks, landmark indices, Z, Y, refine assignments, refine counts): the output and what the
    backward needs. Seeds come from landmark_indices when given, else from landmark_draws (random), else the
    strided grid; landmark_refine Lloyd steps then move them. With cu_seqlens_q / cu_seqlens_k q, k, v are
    packed sequences (flash-attn's varlen layout, no key mask) and batch row s of everything per-landmark is
    sequence s: the same kernels, addressed by sequence."""
    seqs = _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    query_seqs, key_seqs = seqs if seqs is not None else (None, None)
    with stage("landmarks"):
        landmarks, indices = landmark_stage.forward(q, k, key_mask, num_landmarks, landmark_indices,
                                                    landmark_draws, seqs)
    with stage("landmark_refine"):
        landmarks, assignments, counts = refine_stage.forward(q, k, key_mask, landmarks, landmark_refine, seqs)
    with stage("key_summary"):
        summary_partials = key_summary.forward(k, v, landmarks, key_mask, scale, deterministic, key_seqs)
    with stage("landmark_solve"):
        values, summary = landmark_solve.forward(landmarks, summary_partials, scale, ridge, inverse, ns_iters,
                                                 q.dtype)
    with stage("query_apply"):
        out = query_apply.forward(q, landmarks, values, scale, query_seqs)
    return out, landmarks, indices, summary, values, assignments, counts


_NOT_PACKED = (None, None, 0, 0)  # the defaults of the packing arguments (cu_seqlens_q/k, max_seqlen_q/k)


def _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int):
    """(query, key) Sequences of a packed call, None for a dense one."""
    if cu_seqlens_q is None:
        return None
    return Sequences(cu_seqlens_q, max_seqlen_q), Sequences(cu_seqlens_k, max_seqlen_k)


@skyformer_attention_op.register_fake
def _(q, k, v, key_mask, landmark_indices, landmark_draws, num_landmarks, scale, ridge, inverse, ns_iters,
      deterministic, landmark_refine, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    packed = cu_seqlens_q is not None
    batch, heads = (cu_seqlens_q.shape[0] - 1, q.shape[1]) if packed else q.shape[:2]
    points = q.shape[0] + k.shape[0] if packed else q.shape[2] + k.shape[2]
    head_rows = (batch, heads, num_landmarks)
    return (q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(*head_rows, q.shape[-1]),
            q.new_empty(batch, num_landmarks, dtype=torch.int64),
            q.new_empty(*head_rows, v.shape[-1], dtype=torch.float32), q.new_empty(*head_rows, v.shape[-1]),
            q.new_empty(refine_stage.assignment_shape(landmark_refine, batch, heads, points, 0, packed),
                        dtype=torch.int32),
            q.new_empty(landmark_refine, *head_rows, dtype=torch.float32))


@torch.library.custom_op("skyformer_ext::skyformer_attention_backward", mutates_args=())
def skyformer_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                                 landmarks: Tensor, indices: Tensor, summary: Tensor, values: Tensor,
                                 assignments: Tensor, counts: Tensor, scale: float, ridge: float, inverse: str,
                                 ns_iters: int, deterministic: bool, cu_seqlens_q: Optional[Tensor] = None,
                                 cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
                                 max_seqlen_k: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    seqs = _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    query_seqs, key_seqs = seqs if seqs is not None else (None, None)
    with stage("query_apply"):
        grad_q, grad_landmarks_queries, grad_values = query_apply.backward(grad_out, q, landmarks, values,
                                                                           scale, deterministic, query_seqs)
    with stage("landmark_solve"):
        grad_summary, grad_summary_factor, grad_landmarks_solve = landmark_solve.backward(
            grad_values, landmarks, summary, scale, ridge, inverse, ns_iters, q.dtype)
    with stage("key_summary"):
        grad_k, grad_v, grad_landmarks_keys = key_summary.backward(grad_summary, grad_summary_factor, k, v,
                                                                   landmarks, key_mask, scale, deterministic,
                                                                   key_seqs)
    refined = assignments.shape[0] > 0
    with stage("landmarks"):
        grad_landmarks = landmark_stage.backward_into(grad_q, grad_k, indices, key_mask, grad_landmarks_queries,
                                                      grad_landmarks_keys, grad_landmarks_solve,
                                                      counts if refined else None, seqs)
    if refined:
        with stage("landmark_refine"):
            refine_stage.backward_into(grad_q, grad_k, assignments, counts, grad_landmarks, seqs)
    return grad_q, grad_k, grad_v


@skyformer_attention_backward.register_fake
def _(grad_out, q, k, v, key_mask, landmarks, indices, summary, values, assignments, counts, scale, ridge, inverse,
      ns_iters, deterministic, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _skyformer_setup(ctx, inputs, output):
    q, k, v, key_mask, _, _, _, scale, ridge, inverse, ns_iters, deterministic, _, *packing = inputs
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = (*packing, *_NOT_PACKED[len(packing):])
    _, landmarks, indices, summary, values, assignments, counts = output
    ctx.save_for_backward(q, k, v, key_mask, landmarks, indices, summary, values, assignments, counts,
                          cu_seqlens_q, cu_seqlens_k)
    ctx.options = (scale, ridge, inverse, ns_iters, deterministic)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs kept for the backward


def _skyformer_backward(ctx, grad_out, *_unused_grads):
    *saved, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    with torch.no_grad(), without_autocast(grad_out.device):
        grads = skyformer_attention_backward(grad_out, *saved, *ctx.options, cu_seqlens_q, cu_seqlens_k,
                                             *ctx.max_seqlens)
    return *first_order_only("triton", grads, (grad_out, *saved)), *(None,) * 14


skyformer_attention_op.register_autograd(_skyformer_backward, setup_context=_skyformer_setup)


# ---- exact kernelized attention ------------------------------------------------------------------------

@torch.library.custom_op("skyformer_ext::kernelized_attention", mutates_args=())
def kernelized_attention_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
                            deterministic: bool, cu_seqlens_q: Optional[Tensor] = None,
                            cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
                            max_seqlen_k: int = 0) -> Tensor:
    """deterministic only matters to the backward (dK and dV split over the query rows). cu_seqlens: packed
    sequences, as in skyformer_attention_op."""
    return kernelized.forward(q, k, v, key_mask, scale,
                              *(_sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) or ()))


@kernelized_attention_op.register_fake
def _(q, k, v, key_mask, scale, deterministic, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
      max_seqlen_k=0):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("skyformer_ext::kernelized_attention_backward", mutates_args=())
def kernelized_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                                  scale: float, deterministic: bool, cu_seqlens_q: Optional[Tensor] = None,
                                  cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
                                  max_seqlen_k: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return kernelized.backward(grad_out, q, k, v, key_mask, scale, deterministic,
                               *(_sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) or ()))


@kernelized_attention_backward.register_fake
def _(grad_out, q, k, v, key_mask, scale, deterministic, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
      max_seqlen_k=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ka_setup(ctx, inputs, output):
    q, k, v, key_mask, scale, deterministic, *packing = inputs
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = (*packing, *_NOT_PACKED[len(packing):])
    ctx.save_for_backward(q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k)
    ctx.options = (scale, deterministic)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)


def _ka_backward(ctx, grad_out):
    q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    with torch.no_grad(), without_autocast(grad_out.device):
        grads = kernelized_attention_backward(grad_out, q, k, v, key_mask, *ctx.options, cu_seqlens_q,
                                              cu_seqlens_k, *ctx.max_seqlens)
    return *first_order_only("triton", grads, (grad_out, q, k, v)), *(None,) * 7


kernelized_attention_op.register_autograd(_ka_backward, setup_context=_ka_setup)


# ---- autocast: the policy of skyformer_ext._amp for direct calls of the ops --------------------------------

_autocast_library = torch.library.Library("skyformer_ext", "IMPL")
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _register_autocast(name: str) -> None:
    """float32 tensor arguments -> the region's dtype (read at call time: torch.library.register_autocast
    fixes one dtype at registration), then the op itself with autocast off. The API casts before calling, so
    this serves code that calls torch.ops.skyformer_ext.* directly."""
    op = getattr(torch.ops.skyformer_ext, name).default
    for device_type in AUTOCAST_DEVICES:
        def autocast_kernel(*args, device_type=device_type):
            cast = [autocast_inputs(a)[0] if isinstance(a, Tensor) and a.device.type == device_type else a
                    for a in args]
            with without_autocast(torch.device(device_type)):
                return op(*cast)
        _autocast_library.impl(name, autocast_kernel, AUTOCAST_KEYS[device_type])


for _name in ("skyformer_attention", "kernelized_attention"):
    _register_autocast(_name)


# ---- entry points used by api.py -----------------------------------------------------------------------

def kernelized_attention(q, k, v, attn_mask, scale: float, deterministic: bool = True, packing=_NOT_PACKED) -> Tensor:
    """packing: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of packed q, k, v."""
    check_inputs(q, v)
    return kernelized_attention_op(q, k, v, attn_mask, scale, deterministic, *packing)


def skyformer_attention(q, k, v, attn_mask, num_landmarks: int, landmark_indices, landmark_draws, ridge,
                        inverse, ns_iters, scale, deterministic: bool = True, landmark_refine: int = 0,
                        packing=_NOT_PACKED) -> Tensor:
    """Landmarks (-> Lloyd steps) -> key summary -> landmark solve -> query apply, every stage fused kernels.
    packing: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of packed q, k, v (no attn_mask)."""
    check_inputs(q, v)
    if landmark_indices is not None:
        landmark_indices = landmark_indices.contiguous()  # the kernel reads rows of unit inner stride
        num_landmarks = landmark_indices.shape[1]
    if num_landmarks > MAX_LANDMARKS:
        raise ValueError(f"backend='triton' supports up to {MAX_LANDMARKS} landmarks, got num_landmarks="
                         f"{num_landmarks}; use backend='torch'")
    return skyformer_attention_op(q, k, v, attn_mask, landmark_indices, landmark_draws, num_landmarks, scale,
                                  ridge, inverse, ns_iters, deterministic, landmark_refine, *packing)[0]
