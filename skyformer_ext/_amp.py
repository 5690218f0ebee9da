"""The autocast policy of skyformer_attention and kernelized_attention (the one SDPA follows).

Inside a torch.autocast region for the inputs' device (CPU or CUDA): float32 q, k, v are cast to the region's
dtype (float16 or bfloat16); float64 inputs are left alone, as autocast leaves them. The call then runs with
autocast disabled, so every stage keeps its own precision rules for that input dtype (float32 accumulation,
float32 landmark solve) instead of autocast recasting single matmuls inside; the output has the (cast) input
dtype. Backwards disable autocast too, since loss.backward() is often called inside the region.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    device_type = tensors[0].device.type
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)


def without_autocast(device: torch.device):
    """Disables autocast for ``device`` (a no-op context on devices autocast does not cover)."""
    if device.type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
