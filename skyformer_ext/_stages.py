"""Stage labels for launch counting and profiles: ``with stage("key_summary"): ...``.

A label is a torch.profiler range named ``skyformer_stage::<name>``; ``python -m bench.launches`` (and any
torch.profiler trace) attributes every op and kernel launched inside it to that stage. When no profiler is
running the label is a no-op that costs one flag check, so it can stay on the hot path (and inside CUDA-graph
captures).
"""

from __future__ import annotations

import contextlib

import torch

STAGE_PREFIX = "skyformer_stage::"


def stage(name: str):
    """Context manager labelling the work inside it as stage ``name`` (only while a profiler runs)."""
    # torch.compile cannot trace the profiler flag; a compiled graph has its own profiler names anyway.
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(STAGE_PREFIX + name)
