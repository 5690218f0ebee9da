"""Timing and peak memory of one (method, problem, mode) point.

- GPU: a warm-up call under ``torch.cuda.max_memory_allocated`` (peak memory above what was allocated
  before the call) and one under ``PeakMemory`` (cross-check), then ``triton.testing.do_bench`` (median,
  with its L2 flush; CUDA events when Triton is missing or a call is slow), rotating over three input sets
  so consecutive calls do not reuse cached inputs.
- CPU: the warm-up call runs under ``PeakMemory`` (peak of live bytes allocated inside the call; it adds
  Python work per op, so it is never timed), then wall-clock samples, fewer as calls get slower (at least
  one; two or more below 10 s per call); the median is reported.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import torch

from skyformer_ext._memory import PeakMemory

from .methods import Method, Problem

MIB = float(1 << 20)
SLOW_GPU_CALL_S = 0.05


@dataclass
class Measurement:
    times_ms: list[float]
    peak_mib: float              # PeakMemory (every device)
    cuda_peak_mib: float | None  # torch.cuda.max_memory_allocated above the starting point (GPU only)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(method: Method, problem: Problem, sets: int, backward: bool, seed: int) -> list[tuple]:
    """``sets`` independent (args, grad_out or None) pairs, already in the method's layout."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (problem.batch, problem.heads, problem.n, problem.head_dim)
    inputs = []
    for _ in range(sets):
        q, k, v = (torch.randn(shape, generator=generator).to(problem.device, problem.dtype).requires_grad_(backward)
                   for _ in range(3))
        args = method.prepare(q, k, v)
        # dO has the output's shape, which is q's in the method's own layout (p_v = p here).
        grad_out = torch.randn_like(args[0], requires_grad=False) if backward else None
        inputs.append((args, grad_out))
    return inputs


def make_step(method: Method, problem: Problem, inputs: list[tuple], backward: bool):
    """A no-argument callable running one call on the next input set (forward, or forward + backward)."""
    cycle = itertools.cycle(inputs)

    def step():
        args, grad_out = next(cycle)
        if not backward:
            with torch.no_grad():
                return method.run(problem, args)
        out = method.run(problem, args)
        return torch.autograd.grad(out, [a for a in args if a.requires_grad], grad_out)

    return step


def _memory_run(step, device: torch.device) -> tuple[float, float | None, float]:
    """The warm-up call(s), under the memory trackers: (PeakMemory MiB, CUDA peak MiB or None, seconds of
    the plain CUDA call, a rough cost used to choose the timing method)."""
    cuda_peak, seconds = None, 0.0
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        seconds = time.perf_counter() - start
        cuda_peak = (torch.cuda.max_memory_allocated(device) - start_bytes) / MIB
    with PeakMemory() as tracker:
        result = step()
        _synchronize(device)
    outputs = result if isinstance(result, tuple) else (result,)
    if not all(bool(t.isfinite().all()) for t in outputs):
        raise FloatingPointError("non-finite output or gradient")
    return tracker.peak_bytes / MIB, cuda_peak, seconds


def warm_up_tracker() -> None:
    """One-time costs of a process, paid before timing: the first PeakMemory block's set-up, and the first
    call of a torch.library custom op (the torch and triton paths are built of them), which imports
    torch._dynamo (seconds)."""
    import torch._dynamo  # noqa: F401

    with PeakMemory():
        torch.ones(2) + 1


def _gpu_times_ms(step, seconds_per_call: float) -> list[float]:
    """do_bench's median for fast calls; for calls of >= SLOW_GPU_CALL_S (where do_bench's five estimate
    calls plus warm-up would cost seconds) three CUDA-event timed calls after one warm-up."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None and seconds_per_call < SLOW_GPU_CALL_S:
        return [float(do_bench(step, warmup=25, rep=100, return_mode="median"))]
    step()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3 if seconds_per_call >= SLOW_GPU_CALL_S else 10):
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def _cpu_extra_repetitions(seconds_per_call: float) -> int:
    """Timed calls after the first: ~2 s worth for fast calls, fewer as they get slow (the slow baselines
    would otherwise dominate the run)."""
    if seconds_per_call < 0.5:
        return min(9, max(2, int(2.0 / max(seconds_per_call, 1e-4))))
    if seconds_per_call < 3.0:
        return 2
    return 1 if seconds_per_call < 10.0 else 0


def measure(method: Method, problem: Problem, backward: bool, seed: int = 0, max_calls: int = 10) -> Measurement:
    """Times one point; raises whatever the method raises (the caller turns OOM into a table entry).
    ``max_calls`` bounds the timed CPU calls (quick mode)."""
    device = problem.device
    sets = 3 if device.type == "cuda" else 2
    inputs = make_inputs(method, problem, sets, backward, seed)
    step = make_step(method, problem, inputs, backward)
    peak_mib, cuda_peak, first_s = _memory_run(step, device)
    if device.type == "cuda":
        return Measurement(_gpu_times_ms(step, first_s), peak_mib, cuda_peak)
    times = [_wall_ms(step)]
    times += [_wall_ms(step) for _ in range(min(_cpu_extra_repetitions(times[0] / 1e3), max_calls - 1))]
    return Measurement(times, peak_mib, cuda_peak)


def _wall_ms(step) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3
