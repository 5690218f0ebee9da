"""First-derivative-only backwards: their gradients raise a clear error when differentiated again.

The fused and tiled backwards compute gradients with hand-written kernels that have no derivative of their
own. Without this, double backward would either fail inside torch with an internal op's name or, for the
torch path, silently return wrong second derivatives.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

from ._amp import without_autocast


def _message(backend: str) -> bytes:
    return (f"skyformer_ext: backend={backend!r} computes first derivatives only; differentiating its gradients "
            f"(double backward, e.g. a gradient penalty built with create_graph=True) is not supported. "
            f"backend='reference' is plain autograd and supports it.").encode()


def first_order_only(backend: str, grads: tuple, inputs) -> tuple:
    """``grads`` as they are, or, when the backward runs with create_graph=True and an input requires grad,
    aliases whose own backward raises the error above. The aliases' graph node also takes the differentiable
    inputs, so that any later gradient toward those inputs must pass through it (and raise)."""
    differentiable = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not torch.is_grad_enabled() or not differentiable:
        return grads
    present = [g for g in grads if g is not None]
    aliases = iter(_functions.DelayedError(_message(backend), len(present) + len(differentiable))(
        *present, *differentiable)[:len(present)])
    return tuple(None if g is None else next(aliases) for g in grads)


def backward_without_graph(backend: str):
    """Decorates an autograd.Function backward: runs it without recording and without autocast (see _amp),
    then first_order_only."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad(), without_autocast(grad_outputs[0].device):
                grads = backward(ctx, *grad_outputs)
            return first_order_only(backend, grads, (*ctx.saved_tensors, *grad_outputs))
        return wrapper
    return decorate
