"""The attention implementations the throughput benchmark compares, discovered at run time.

Each ``Method`` turns plain (batch, heads, n, p) inputs into the arguments it wants (``prepare``, untimed)
and then runs one call (``call``, timed). Availability is decided by trying a tiny call on the device and
dtype in question, so backends that land later (Triton kernels, a compiled solve) appear without code
changes here, and a backend that cannot run (flash SDPA on float32, flash_attn without a GPU) is simply
absent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from skyformer_ext import api, kernelized_attention, sample_landmarks, skyformer_attention

from .naive_skyformer import naive_skyformer_attention


@dataclass(frozen=True)
class Problem:
    batch: int
    heads: int
    n: int
    head_dim: int
    num_landmarks: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Method:
    """name: shown in tables; family: what it computes; time/memory order: growth in n used to predict the
    cost of the next size from the last one measured (1 = linear, 2 = quadratic)."""

    name: str
    family: str
    call: Callable[..., torch.Tensor]
    time_order: int
    memory_order: int
    prepare: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple] = field(default=lambda q, k, v: (q, k, v))
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)

    def run(self, problem: Problem, args: tuple) -> torch.Tensor:
        with self.context():
            return self.call(problem, *args)


def _sdpa_context(backend_name: str | None):
    if backend_name is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    return lambda: sdpa_kernel(backend)


def _skyformer(backend: str):
    def call(problem: Problem, q, k, v):
        return skyformer_attention(q, k, v, num_landmarks=problem.num_landmarks, backend=backend)
    return call


def _kernelized(backend: str):
    def call(problem: Problem, q, k, v):
        return kernelized_attention(q, k, v, backend=backend)
    return call


def _naive(problem: Problem, q, k, v):
    # Sampling happens inside the call, as in skyformer_attention, so both pay for it.
    idx = sample_landmarks(q.shape[0], q.shape[2], k.shape[2], problem.num_landmarks, device=q.device)
    return naive_skyformer_attention(q, k, v, idx)


def _sdpa(problem: Problem, q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _to_flash_layout(q, k, v):
    """flash_attn wants (batch, n, heads, p); the transposed copies are made before timing."""
    return tuple(t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))


def _flash_attn(problem: Problem, q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def implementation_backends() -> list[str]:
    """Our backends other than the dispatchers: "torch" today, "triton" once it lands."""
    return [b for b in api.BACKENDS if b not in ("auto", "reference")]


def candidate_methods(device: torch.device) -> list[Method]:
    """Every method that might run on ``device``; :func:`available` filters by a tiny trial call."""
    methods = []
    for backend in implementation_backends():
        methods.append(Method(f"skyformer[{backend}]", "skyformer", _skyformer(backend), 1, 1))
    methods.append(Method("naive_skyformer", "naive_skyformer", _naive, 1, 1))
    for backend in implementation_backends():
        methods.append(Method(f"kernelized[{backend}]", "kernelized", _kernelized(backend), 2, 1))
    if device.type == "cuda":
        for label, backend_name, memory_order in (("flash", "FLASH_ATTENTION", 1),
                                                  ("efficient", "EFFICIENT_ATTENTION", 1), ("math", "MATH", 2)):
            methods.append(Method(f"sdpa[{label}]", "sdpa", _sdpa, 2, memory_order,
                                  context=_sdpa_context(backend_name)))
        methods.append(Method("flash_attn", "flash_attn", _flash_attn, 2, 1, prepare=_to_flash_layout))
    else:
        methods.append(Method("sdpa", "sdpa", _sdpa, 2, 1))
    return methods


def available(method: Method, dtype: torch.dtype, device: torch.device, backward: bool) -> str | None:
    """None when ``method`` runs (and differentiates, if asked) on a tiny problem; otherwise the reason."""
    problem = Problem(1, 2, 64, 32, 16, dtype, device)
    q, k, v = (torch.randn(1, 2, 64, 32, dtype=dtype, device=device, requires_grad=backward) for _ in range(3))
    try:
        args = method.prepare(q, k, v)
        out = method.run(problem, args)
        if backward:
            torch.autograd.grad(out, [a for a in args if a.requires_grad], torch.ones_like(out))
    except Exception as error:  # noqa: BLE001 - any failure means "not available here"
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    return None
