"""Peak-memory accounting that works on every device, CPU included.

``PeakMemory`` is a TorchDispatchMode that tracks the bytes of every tensor storage created while it is
active and still alive, and records the peak of that sum. It sees what ATen allocates (outputs and
temporaries of every op), which is what "extra memory" means for an attention call; memory allocated
before the mode was entered (inputs, weights) does not count.

Python custom operators (torch.library.custom_op, e.g. the Triton stages) are entered: their bodies run with
the mode active, so the buffers they allocate count, not just their outputs. Compiled (C++) operators are
opaque to a dispatch mode and count by their outputs.
"""

from __future__ import annotations

import weakref

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode


class PeakMemory(TorchDispatchMode):
    """with PeakMemory() as pm: ...; pm.peak_bytes, pm.largest_bytes, pm.allocations (list of bytes)."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self.allocations: list[int] = []
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live_bytes -= nbytes

    def _track(self, tensor: torch.Tensor, input_storages: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._seen or key in input_storages:
            return  # empty, already counted, or a view / in-place result of an op's input
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live_bytes += nbytes
        self.allocations.append(nbytes)
        self.largest_bytes = max(self.largest_bytes, nbytes)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        input_storages = {t.untyped_storage().data_ptr()
                          for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        body = _custom_op_body(func)
        if body is None:
            out = func(*args, **kwargs)
        else:
            with self:
                out = body(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
                self._track(t, input_storages)
        return out


def _custom_op_body(func):
    """The Python function behind a torch.library.custom_op, or None (ATen and compiled operators)."""
    opdef = OPDEFS.get(func._schema.name)
    return None if opdef is None else opdef._init_fn
