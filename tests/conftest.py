"""Shared test set-up: Triton's interpreter on GPU-less machines, seeds, and the accuracy rule.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at collection time,
whenever no CUDA device is visible.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_within_low_precision_rule(actual, truth, same_dtype_baseline, *, name="output", floor=1e-6):
    """The flash-attention rule: error vs the float64 truth <= 2x the error of the plain PyTorch reference
    computed in the same low precision (plus a tiny floor for when that error is exactly zero)."""
    err = max_error(actual, truth)
    base = max_error(same_dtype_baseline, truth)
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x same-dtype reference error {base:.3e}"


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so an element a kernel forgets to write fails the
    comparison (the library allocates every output and buffer with torch.empty)."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
