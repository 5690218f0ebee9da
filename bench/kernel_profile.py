"""The most expensive kernels of one Skyformer forward+backward: ``python -m bench.kernel_profile``.

A torch.profiler table (CUDA: device time per kernel; CPU: CPU time per op) of one warmed-up call of
skyformer_attention plus torch.autograd.grad over q, k and v, followed by the device-side kernel count. The
GPU script runs it at n = 16k, b = 8, h = 16, p = 64, m = 128, bf16 (the defaults).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .launches import DTYPES, Config, skyformer_inputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "reference"))
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--p", type=int, default=64)
    parser.add_argument("--m", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rows", type=int, default=30, help="table rows")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from skyformer_ext import skyformer_attention

    args = parse_args(argv)
    device = torch.device(args.device)
    config = Config(backend=args.backend, n_q=args.n, n_k=args.n, batch=args.batch, heads=args.heads,
                    kv_heads=args.heads, p=args.p, m=args.m, dtype=args.dtype)
    inputs = skyformer_inputs(config, device)
    q, k, v, kwargs = inputs["q"], inputs["k"], inputs["v"], inputs["kwargs"]

    def forward_backward():
        out = skyformer_attention(q, k, v, **kwargs)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    forward_backward()  # compile and warm up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        forward_backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"one forward+backward, {config}")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        print(f"device-side events (kernels, memsets, memcopies): {len(kernels)}, busy {busy_us / 1000:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
