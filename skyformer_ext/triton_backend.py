"""backend="triton": the fused kernels of triton_kernels/ as torch.library custom ops with autograd.

Each stage is one custom op whose backward is another custom op running the fused backward kernels, so
torch.compile keeps them as single graph nodes and the whole Skyformer call is one autograd path:

    gather landmarks (tiny, autograd scatters dL into dq, dk) -> skyformer_ext::landmark_gram
    -> skyformer_ext::key_summary -> solve.landmark_solve (m x m, differentiable) -> skyformer_ext::query_apply

Nothing (n x m) or (n x n) exists, forward or backward: the kernels recompute kappa tiles, and the only extra
buffers are O(m * p) per head plus bounded per-split partial sums (or, deterministic=False, one atomically
summed float32 buffer instead of the per-split ones). Runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (set before this module is first imported; the tests do).

The ops whose kernels (forward or backward) may split a reduction take ``deterministic``: True adds per-split
partials in a fixed order (bit-identical reruns), False lets the splits tl.atomic_add into one buffer.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from triton_kernels import gram, kernelized, key_summary, query_apply

from . import solve
from .landmarks import gather_landmarks

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # the largest compiled head-dim bucket, every dtype


def supports(q: Tensor, v: Tensor) -> bool:
    """Whether the kernels cover this dtype and these head dims (what "auto" asks before choosing triton)."""
    return q.dtype in SUPPORTED_DTYPES and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM


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


def _empty_like_shape(t: Tensor, shape, dtype=None) -> Tensor:
    return t.new_empty(shape, dtype=dtype or t.dtype)


# ---- stage 1: landmark Gram ----------------------------------------------------------------------------

@torch.library.custom_op("skyformer_ext::landmark_gram", mutates_args=())
def landmark_gram(landmarks: Tensor, scale: float) -> Tensor:
    return gram.forward(landmarks, scale)


@landmark_gram.register_fake
def _(landmarks, scale):
    b, h, m, _ = landmarks.shape
    return _empty_like_shape(landmarks, (b, h, m, m), torch.float32)


@torch.library.custom_op("skyformer_ext::landmark_gram_backward", mutates_args=())
def landmark_gram_backward(grad_gram: Tensor, landmarks: Tensor, scale: float) -> Tensor:
    return gram.backward(grad_gram, landmarks, scale)


@landmark_gram_backward.register_fake
def _(grad_gram, landmarks, scale):
    return torch.empty_like(landmarks)


def _save_inputs_and_options(ctx, inputs, output):
    """setup_context of every op here: the inputs are (tensors or None..., scale[, deterministic]); the
    tensors are saved (backward recomputes from them), the trailing Python options kept for the backward op."""
    tensors = [x for x in inputs if x is None or isinstance(x, Tensor)]
    ctx.save_for_backward(*tensors)
    ctx.options = tuple(inputs[len(tensors):])


def _no_grads(ctx) -> tuple[None, ...]:
    return (None,) * len(ctx.options)


def _gram_backward(ctx, grad_gram):
    (landmarks,) = ctx.saved_tensors
    return landmark_gram_backward(grad_gram, landmarks, *ctx.options), *_no_grads(ctx)


landmark_gram.register_autograd(_gram_backward, setup_context=_save_inputs_and_options)


# ---- stage 2: key summary ------------------------------------------------------------------------------

@torch.library.custom_op("skyformer_ext::key_summary", mutates_args=())
def key_summary_op(k: Tensor, v: Tensor, landmarks: Tensor, key_mask: Optional[Tensor], scale: float,
                   deterministic: bool) -> Tensor:
    return key_summary.forward(k, v, landmarks, key_mask, scale, deterministic)


@key_summary_op.register_fake
def _(k, v, landmarks, key_mask, scale, deterministic):
    return _empty_like_shape(landmarks, (*landmarks.shape[:3], v.shape[3]), torch.float32)


@torch.library.custom_op("skyformer_ext::key_summary_backward", mutates_args=())
def key_summary_backward(grad_summary: Tensor, k: Tensor, v: Tensor, landmarks: Tensor,
                         key_mask: Optional[Tensor], scale: float,
                         deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return key_summary.backward(grad_summary, k, v, landmarks, key_mask, scale, deterministic)


@key_summary_backward.register_fake
def _(grad_summary, k, v, landmarks, key_mask, scale, deterministic):
    return torch.empty_like(k), torch.empty_like(v), torch.empty_like(landmarks)


def _summary_backward(ctx, grad_summary):
    k, v, landmarks, key_mask = ctx.saved_tensors
    grads = key_summary_backward(grad_summary, k, v, landmarks, key_mask, *ctx.options)
    return *grads, None, *_no_grads(ctx)


key_summary_op.register_autograd(_summary_backward, setup_context=_save_inputs_and_options)


# ---- stage 3: query apply ------------------------------------------------------------------------------

@torch.library.custom_op("skyformer_ext::query_apply", mutates_args=())
def query_apply_op(q: Tensor, landmarks: Tensor, landmark_values: Tensor, scale: float,
                   deterministic: bool) -> Tensor:
    """deterministic only matters to the backward (dL and dY split over the query rows)."""
    return query_apply.forward(q, landmarks, landmark_values, scale)


@query_apply_op.register_fake
def _(q, landmarks, landmark_values, scale, deterministic):
    return _empty_like_shape(q, (*q.shape[:3], landmark_values.shape[3]))


@torch.library.custom_op("skyformer_ext::query_apply_backward", mutates_args=())
def query_apply_backward(grad_out: Tensor, q: Tensor, landmarks: Tensor, landmark_values: Tensor,
                         scale: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return query_apply.backward(grad_out, q, landmarks, landmark_values, scale, deterministic)


@query_apply_backward.register_fake
def _(grad_out, q, landmarks, landmark_values, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(landmarks), torch.empty_like(landmark_values)


def _apply_backward(ctx, grad_out):
    q, landmarks, landmark_values = ctx.saved_tensors
    return *query_apply_backward(grad_out, q, landmarks, landmark_values, *ctx.options), *_no_grads(ctx)


query_apply_op.register_autograd(_apply_backward, setup_context=_save_inputs_and_options)


# ---- exact kernelized attention ------------------------------------------------------------------------

@torch.library.custom_op("skyformer_ext::kernelized_attention", mutates_args=())
def kernelized_attention_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
                            deterministic: bool) -> Tensor:
    """deterministic only matters to the backward (dK and dV split over the query rows)."""
    return kernelized.forward(q, k, v, key_mask, scale)


@kernelized_attention_op.register_fake
def _(q, k, v, key_mask, scale, deterministic):
    return _empty_like_shape(q, (*q.shape[:3], v.shape[3]))


@torch.library.custom_op("skyformer_ext::kernelized_attention_backward", mutates_args=())
def kernelized_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                                  scale: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return kernelized.backward(grad_out, q, k, v, key_mask, scale, deterministic)


@kernelized_attention_backward.register_fake
def _(grad_out, q, k, v, key_mask, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ka_backward(ctx, grad_out):
    q, k, v, key_mask = ctx.saved_tensors
    return *kernelized_attention_backward(grad_out, q, k, v, key_mask, *ctx.options), None, *_no_grads(ctx)


kernelized_attention_op.register_autograd(_ka_backward, setup_context=_save_inputs_and_options)


# ---- entry points used by api.py -----------------------------------------------------------------------

def kernelized_attention(q, k, v, attn_mask, scale: float, deterministic: bool = True) -> Tensor:
    check_inputs(q, v)
    return kernelized_attention_op(q, k, v, attn_mask, scale, deterministic)


def skyformer_attention(q, k, v, landmark_indices, attn_mask, ridge, inverse, ns_iters, scale,
                        deterministic: bool = True) -> Tensor:
    """Landmarks -> Gram -> landmark solve -> key summary -> query apply, all fused but the m x m solve."""
    check_inputs(q, v)
    landmarks = gather_landmarks(q, k, landmark_indices)
    gram_matrix = landmark_gram(landmarks, scale)
    summary = key_summary_op(k, v, landmarks, attn_mask, scale, deterministic)
    landmark_values = solve.landmark_solve(gram_matrix, summary, ridge, inverse, ns_iters)
    return query_apply_op(q, landmarks, landmark_values, scale, deterministic)
