"""Argument validation shared by every entry point.

Every check raises before any computation so that a bad call never reaches a kernel: TypeError for a wrong
kind of object or dtype, ValueError for a wrong value or shape. Messages name the argument.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INVERSES = ("newton_schulz", "cholesky")
BACKENDS = ("auto", "triton", "torch", "reference")
STRATEGIES = ("random", "strided")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_qkv(q, k, v) -> None:
    """Validates (batch, heads, seq, dim) q and (batch, kv_heads, seq, dim) k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), got rank {t.dim()} "
                             f"shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype ({t.dtype}) must equal q.dtype ({q.dtype})")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {k.shape[1]}, v {v.shape[1]}")
    if (k.shape[1] == 0 and q.shape[1] != 0) or (k.shape[1] != 0 and q.shape[1] % k.shape[1] != 0):
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) (GQA/MQA)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head_dim ({k.shape[3]}) must equal q head_dim ({q.shape[3]})")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError("head_dim of q and v must be at least 1")
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (seq length 0 given)")


def check_key_mask(attn_mask, batch: int, n_k: int, device) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a bool torch.Tensor of shape (batch, n_k), got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must have dtype torch.bool (True = key takes part), got {attn_mask.dtype}")
    if tuple(attn_mask.shape) != (batch, n_k):
        raise ValueError(f"attn_mask must have shape (batch, n_k) = {(batch, n_k)}, got {tuple(attn_mask.shape)}")
    if attn_mask.device != torch.device(device):
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive float or None, got {type(scale).__name__}")
    if not 0 < scale < math.inf:  # inf or NaN would make every output NaN (comparisons: torch.compile traces them)
        raise ValueError(f"scale must be positive and finite (the Gaussian uses sqrt(scale)), got {scale}")


def check_positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_ridge(ridge) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge must be a float, got {type(ridge).__name__}")
    if not 0 <= ridge < math.inf:  # NaN or inf would make every output NaN
        raise ValueError(f"ridge must be >= 0 and finite, got {ridge}")


def reads_values(t: torch.Tensor) -> bool:
    """Whether argument checks may read tensor values (not while compiling or capturing a CUDA graph)."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_landmark_indices(idx, batch: int, n_total: int, device) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"landmark_indices must be an integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"landmark_indices must have dtype int64 or int32, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"landmark_indices must have shape (batch, num_landmarks) with batch={batch}, "
                         f"got {tuple(idx.shape)}")
    if idx.shape[1] < 2:
        raise ValueError(f"landmark_indices must hold at least 2 landmarks per batch row, got {idx.shape[1]}")
    if idx.device != torch.device(device):
        raise ValueError(f"landmark_indices is on {idx.device} but q is on {device}")
    # The range check reads index values (two host syncs), which neither torch.compile nor a CUDA-graph
    # capture allows; both skip it.
    if idx.numel() and reads_values(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n_total):
        raise ValueError(f"landmark_indices must lie in [0, n_q + n_k) = [0, {n_total}), "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")


def check_skyformer_options(num_landmarks, landmarks, ridge, inverse, ns_iters, scale, deterministic,
                            backend, landmark_refine=0) -> None:
    """The options skyformer_attention takes beyond its tensors (also checked by nn.SkyformerAttention at
    construction, so a bad module fails before its first forward)."""
    check_choice("backend", backend, BACKENDS)
    check_positive_int("num_landmarks", num_landmarks, 2)
    check_choice("landmarks", landmarks, STRATEGIES)
    check_ridge(ridge)
    check_choice("inverse", inverse, INVERSES)
    check_positive_int("ns_iters", ns_iters, 1)
    check_scale(scale)
    check_bool("deterministic", deterministic)
    check_positive_int("landmark_refine", landmark_refine, 0)


def default_scale(scale, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
