"""Public entry points: validation, landmark choice and backend dispatch."""

from __future__ import annotations

import warnings

import torch

from . import _checks, reference, torch_backend
from ._amp import autocast_inputs, without_autocast
from ._stages import stage
from .landmarks import landmark_draws, sample_landmarks

BACKENDS = _checks.BACKENDS
_many_landmarks_warned = False


def _empty_result(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like the output (q's shape with v's last dim: dense or packed), connected to q, k, v so that
    backward gives them zero gradients: the result of a call with batch 0 or no heads (as SDPA returns), or of
    a pack without queries or keys."""
    empty = q.new_zeros(*q.shape[:-1], v.shape[-1])
    return empty + 0 * (q.sum() + k.sum() + v.sum()).to(q.dtype)


def _warn_many_landmarks(m: int, rows: int) -> None:
    global _many_landmarks_warned
    if m > rows and not _many_landmarks_warned:
        _many_landmarks_warned = True
        warnings.warn(f"skyformer_attention: {m} landmarks for {rows} rows of [q; k]: landmarks repeat (sampling "
                      f"with replacement) and the landmark solve still costs O(m^2) memory and O(m^3) time per "
                      f"(batch, head). num_landmarks = n_q + n_k already gives exact kernelized attention (up to "
                      f"ridge); this warning is shown once.", RuntimeWarning, stacklevel=3)


def _resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor, num_landmarks: int = 0) -> str:
    """"auto" -> the fused Triton kernels for CUDA tensors they cover (fp16/bf16/fp32, head dims up to 256,
    up to 256 landmarks) when triton imports, else the tiled PyTorch path."""
    _checks.check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    if q.is_cuda:
        try:
            from . import triton_backend
        except ImportError:
            return "torch"
        if triton_backend.supports(q, v, num_landmarks):
            return "triton"
    return "torch"


def skyformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_landmarks: int = 128,
                        attn_mask: torch.Tensor | None = None, landmarks: str = "random",
                        landmark_indices: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        ridge: float = 0.1, inverse: str = "newton_schulz", ns_iters: int = 6,
                        scale: float | None = None, backend: str = "auto",
                        deterministic: bool = True, landmark_refine: int = 0) -> torch.Tensor:
    """Skyformer attention: a Nystrom approximation of Gaussian-kernel attention with m landmarks.

    Args:
        q: (batch, heads, n_q, p). k: (batch, kv_heads, n_k, p). v: (batch, kv_heads, n_k, p_v).
            heads % kv_heads == 0 (GQA/MQA); n_q may differ from n_k.
        num_landmarks: m, the number of landmarks drawn when ``landmark_indices`` is None (>= 2).
        attn_mask: optional bool (batch, n_k), True = key takes part (the SDPA convention).
        landmarks: "random" (the paper) or "strided"; see :func:`sample_landmarks`.
        landmark_indices: optional (batch, m) int rows of [q; k] (0..n_q-1 queries, then keys); when given
            no sampling happens.
        generator: torch.Generator for reproducible sampling.
        ridge: gamma >= 0 added to the landmark Gram matrix's diagonal.
        inverse: "newton_schulz" (the paper, ``ns_iters`` iterations) or "cholesky" (exact solve).
        scale: SDPA meaning (multiplies q.k), default p^-1/2; the kernel is exp(-scale |q - k|^2 / 2).
        backend: "auto" (fastest available: "triton" on CUDA, else "torch"), "triton" (fused kernels; CUDA
            tensors, or CPU under TRITON_INTERPRET=1), "torch" (tiled PyTorch), "reference" (plain,
            materialising).
        deterministic: True (default): bit-identical outputs and gradients for the same inputs. False lets
            the triton backend add its split-over-the-sequence partial sums with atomics (no per-split
            buffers; the last bits vary run to run). No effect on "torch" and "reference" (always
            deterministic).
        landmark_refine: the number of Lloyd (k-means) steps that move the landmarks (drawn, or given by
            ``landmark_indices``) to the means of their clusters before the solve; 0 (default) is the paper.
            Per (batch, query head), the points are the valid rows of [q; k] (padded keys excluded, padded
            queries too in self-attention with a mask); a step assigns each point to its nearest landmark
            (ties: the lower index) and moves every landmark that got points to their mean. Gradients flow
            through the means. On real encoder inputs two steps at m = 32 match the paper's accuracy at m = 128
            (README, "Refined landmarks").

    Returns:
        (batch, heads, n_q, p_v) in q's dtype.

    Edge behaviour: a batch row whose keys are all masked returns zeros; NaN inputs give NaN outputs; more
    landmarks than valid rows is allowed (sampling with replacement, as in the paper). Query rows are never
    masked (their outputs are defined for every row). Under torch.autocast, float32 inputs are cast to the
    autocast dtype first (see README "Edge cases and guarantees").
    """
    _checks.check_qkv(q, k, v)
    batch, _, n_q, _ = q.shape
    n_k = k.shape[2]
    _checks.check_key_mask(attn_mask, batch, n_k, q.device)
    _checks.check_skyformer_options(num_landmarks, landmarks, ridge, inverse, ns_iters, scale, deterministic,
                                    backend, landmark_refine)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if landmark_indices is not None:
        _checks.check_landmark_indices(landmark_indices, batch, n_q + n_k, q.device)
    m = num_landmarks if landmark_indices is None else landmark_indices.shape[1]
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return _empty_result(q, k, v)
    _warn_many_landmarks(m, n_q + n_k)
    backend = _resolve_backend(backend, q, v, m)
    scale = _checks.default_scale(scale, q.shape[-1])
    with without_autocast(q.device):
        return _skyformer(q, k, v, attn_mask, num_landmarks, landmarks, landmark_indices, generator, ridge, inverse,
                          ns_iters, scale, backend, deterministic, landmark_refine)


def _skyformer(q, k, v, attn_mask, num_landmarks, landmarks, landmark_indices, generator, ridge, inverse,
               ns_iters, scale, backend, deterministic, landmark_refine) -> torch.Tensor:
    batch, _, n_q, _ = q.shape
    n_k = k.shape[2]
    if backend == "triton":  # samples inside its landmark kernel, from the same draws as sample_landmarks
        from . import triton_backend
        draws = None
        if landmark_indices is None and landmarks == "random":
            with stage("landmarks"):
                draws = landmark_draws(batch, num_landmarks, generator, q.device)
        return triton_backend.skyformer_attention(q, k, v, attn_mask, num_landmarks, landmark_indices, draws,
                                                  ridge, inverse, ns_iters, scale, deterministic, landmark_refine)
    if landmark_indices is None:
        landmark_indices = sample_landmarks(batch, n_q, n_k, num_landmarks, attn_mask=attn_mask,
                                            strategy=landmarks, generator=generator, device=q.device)

    if backend == "reference":
        return reference.skyformer_attention(q, k, v, landmark_indices, attn_mask=attn_mask, ridge=ridge,
                                             inverse=inverse, ns_iters=ns_iters, scale=scale,
                                             landmark_refine=landmark_refine)
    return torch_backend.skyformer_attention(q, k, v, landmark_indices, attn_mask, ridge, inverse, ns_iters,
                                             scale, landmark_refine)


def kernelized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         attn_mask: torch.Tensor | None = None, scale: float | None = None,
                         backend: str = "auto", deterministic: bool = True) -> torch.Tensor:
    """Exact Kernelized Attention kappa(Q, K) V (the model Skyformer approximates), no normalisation.

    Same shapes, mask, ``scale`` and ``deterministic`` conventions as :func:`skyformer_attention`. backend
    "triton" is the fused FlashAttention-style kernel and "torch" tiles the computation (both O(n) extra
    memory, no n_q x n_k matrix); "reference" materialises it. A batch row whose keys are all masked returns
    zeros.
    """
    _checks.check_qkv(q, k, v)
    _checks.check_key_mask(attn_mask, q.shape[0], k.shape[2], q.device)
    _checks.check_scale(scale)
    _checks.check_bool("deterministic", deterministic)
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return _empty_result(q, k, v)
    backend = _resolve_backend(backend, q, v)
    with without_autocast(q.device):
        if backend == "reference":
            return reference.kernelized_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        if backend == "triton":
            from . import triton_backend
            return triton_backend.kernelized_attention(q, k, v, attn_mask,
                                                       _checks.default_scale(scale, q.shape[-1]), deterministic)
        return torch_backend.kernelized_attention(q, k, v, attn_mask, _checks.default_scale(scale, q.shape[-1]))


# ---- packed variable-length sequences ----------------------------------------------------------------------

def skyformer_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                               num_landmarks: int = 128, landmarks: str = "random",
                               landmark_indices: torch.Tensor | None = None,
                               generator: torch.Generator | None = None, ridge: float = 0.1,
                               inverse: str = "newton_schulz", ns_iters: int = 6, scale: float | None = None,
                               backend: str = "auto", deterministic: bool = True,
                               landmark_refine: int = 0) -> torch.Tensor:
    """Skyformer on packed variable-length sequences, in flash-attn's varlen layout.

    Args:
        q: (total_q, heads, p); k: (total_k, kv_heads, p); v: (total_k, kv_heads, p_v).
        cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,) on q's device: sequence s holds query rows
            cu_seqlens_q[s]:cu_seqlens_q[s + 1] and key rows cu_seqlens_k[s]:cu_seqlens_k[s + 1]. They start
            at 0, never decrease and end at total_q / total_k.
        max_seqlen_q, max_seqlen_k: Python ints bounding the sequence lengths.
        landmark_indices: optional (num_seqs, m) rows of each sequence's own [q_s; k_s] (0..len_q - 1 its
            queries, then its keys): a packed call then equals a loop of dense calls with those landmarks.
        Every other option as in :func:`skyformer_attention` (``landmark_refine``: Lloyd steps per
        sequence, over its own rows).

    Returns:
        (total_q, heads, p_v) in q's dtype. Each sequence is its own Skyformer problem (its own landmarks,
        Gram, solve and key summary); a sequence without keys gets zeros, a sequence shorter than m repeats
        landmark rows (sampling with replacement).
    """
    from . import varlen

    varlen.check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _checks.check_skyformer_options(num_landmarks, landmarks, ridge, inverse, ns_iters, scale, deterministic,
                                    backend, landmark_refine)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if landmark_indices is not None:
        varlen.check_packed_landmark_indices(landmark_indices, cu_seqlens_q, cu_seqlens_k, q.device)
    m = num_landmarks if landmark_indices is None else landmark_indices.shape[1]
    backend = _resolve_backend(backend, q, v, m)
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[0] == 0 or k.shape[0] == 0 or q.shape[1] == 0:  # no query, no key at all, or no head: zeros
        return _empty_result(q, k, v)
    scale = _checks.default_scale(scale, q.shape[-1])
    num_seqs = cu_seqlens_q.shape[0] - 1
    draws = None
    if landmark_indices is None and landmarks == "random":
        with stage("landmarks"):
            draws = landmark_draws(num_seqs, num_landmarks, generator, q.device)
    if backend == "triton":  # the dense kernels, addressed by sequence; they sample from the draws themselves
        from . import triton_backend
        with without_autocast(q.device):
            return triton_backend.skyformer_attention(
                q, k, v, None, num_landmarks, landmark_indices, draws, ridge, inverse, ns_iters, scale,
                deterministic, landmark_refine, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    if landmark_indices is None:
        landmark_indices = varlen.sample_packed_landmarks(cu_seqlens_q, cu_seqlens_k, num_landmarks, landmarks,
                                                          draws)
    with without_autocast(q.device):
        if backend == "reference":
            return varlen.skyformer_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, landmark_indices, ridge, inverse,
                                              ns_iters, scale, landmark_refine)
        return varlen.skyformer_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, landmark_indices, ridge, inverse,
                                      ns_iters, scale, landmark_refine)


def kernelized_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                                scale: float | None = None, backend: str = "auto",
                                deterministic: bool = True) -> torch.Tensor:
    """Exact kernelized attention per packed sequence, layout and conventions of
    :func:`skyformer_attention_varlen`; a sequence without keys gets zeros."""
    from . import varlen

    varlen.check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _checks.check_scale(scale)
    _checks.check_bool("deterministic", deterministic)
    backend = _resolve_backend(backend, q, v)
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[0] == 0 or k.shape[0] == 0 or q.shape[1] == 0:
        return _empty_result(q, k, v)
    scale = _checks.default_scale(scale, q.shape[-1])
    with without_autocast(q.device):
        if backend == "triton":
            from . import triton_backend
            return triton_backend.kernelized_attention(q, k, v, None, scale, deterministic,
                                                       (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        if backend == "reference":
            return varlen.kernelized_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
        return varlen.kernelized_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
