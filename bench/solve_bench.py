"""Landmark-solve benchmark: the compiled extension vs torch.linalg.solve vs the PyTorch Newton-Schulz.

    python -m bench.solve_bench                  # CPU, batch*heads=256, m in {64, 128, 256}, p_v=64, fp32
    python -m bench.solve_bench --device cuda    # the GPU numbers (target on H200: m=128 under 50 us)
    python -m bench.solve_bench --backward       # adds forward+backward timings

M is a Gaussian-kernel Gram matrix of random landmarks (what Skyformer solves), ridge 0.1. Each time is the
median over repeats of one call on all batch*heads matrices (CUDA: CUDA events around each call). The table
is printed and written as JSON to bench/results/solve_bench_<device>.json with the command and environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import skyformer_ext
from skyformer_ext import reference, solve

RIDGE = 0.1
NS_ITERS = 6


def _methods(backward: bool):
    """name -> fn(gram, summary) returning the solution (and running backward when asked)."""
    def linalg_solve(gram, summary):
        return torch.linalg.solve(gram + RIDGE * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device),
                                  summary)

    def pytorch_newton_schulz(gram, summary):
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return reference.newton_schulz_inverse(gram + RIDGE * eye, NS_ITERS) @ summary

    methods = {
        "ext cholesky (op)": lambda g, z: torch.ops.skyformer.cholesky_solve(g, z, RIDGE)[0],
        "ext cholesky (landmark_solve, with status check)": lambda g, z: solve.landmark_solve(
            g, z, RIDGE, "cholesky", NS_ITERS),
        "torch.linalg.solve": linalg_solve,
        "ext newton_schulz (op)": lambda g, z: torch.ops.skyformer.newton_schulz_solve(g, z, RIDGE, NS_ITERS),
        "pytorch newton_schulz": pytorch_newton_schulz,
    }
    if not backward:
        return methods

    def with_backward(fn):
        def run(gram, summary):
            g, z = gram.detach().requires_grad_(), summary.detach().requires_grad_()
            fn(g, z).sum().backward()
        return run

    return {name + " fwd+bwd": with_backward(fn) for name, fn in methods.items()
            if "landmark_solve" not in name}


def _time_cpu(fn, min_seconds: float, min_repeats: int) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def _time_cuda(fn, min_seconds: float, min_repeats: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < max(min_repeats, 20) or time.perf_counter() - start < min_seconds:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
        if len(times) >= 500:
            break
    return statistics.median(times)


def run(device: str, batch_heads: int, sizes: list[int], value_dim: int, dtype: torch.dtype, backward: bool,
        min_seconds: float, min_repeats: int) -> list[dict]:
    timer = _time_cuda if device == "cuda" else _time_cpu
    rows = []
    generator = torch.Generator().manual_seed(0)
    for m in sizes:
        landmarks = torch.randn(batch_heads, m, 64, generator=generator, dtype=torch.float64)
        gram = reference.landmark_gram(landmarks, 64 ** -0.5).to(device=device, dtype=dtype)
        summary = torch.randn(batch_heads, m, value_dim, generator=generator, dtype=torch.float64).to(device, dtype)
        for name, fn in _methods(backward).items():
            seconds = timer(lambda: fn(gram, summary), min_seconds, min_repeats)
            rows.append({"m": m, "method": name, "seconds": seconds})
            print(f"  m={m:4d}  {name:52s} {seconds * 1e3:10.3f} ms", file=sys.stderr, flush=True)
    return rows


def _table(rows: list[dict], sizes: list[int]) -> str:
    names = list(dict.fromkeys(row["method"] for row in rows))
    lookup = {(row["method"], row["m"]): row["seconds"] for row in rows}
    unit, factor = ("us", 1e6) if max(lookup.values()) < 1e-2 else ("ms", 1e3)
    header = "| method | " + " | ".join(f"m={m} ({unit})" for m in sizes) + " |"
    lines = [header, "|" + "---|" * (len(sizes) + 1)]
    for name in names:
        cells = " | ".join(f"{lookup[(name, m)] * factor:.1f}" for m in sizes)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-heads", type=int, default=256)
    parser.add_argument("--m", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/solve_bench_<device>.json)")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    rows = run(args.device, args.batch_heads, args.m, args.value_dim, dtype, args.backward, args.min_seconds,
               args.min_repeats)
    table = _table(rows, args.m)
    print(f"landmark solve, batch*heads={args.batch_heads}, p_v={args.value_dim}, {args.dtype}, "
          f"ridge={RIDGE}, ns_iters={NS_ITERS}, device={args.device}")
    print(table)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"solve_bench_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    environment = {
        "command": "python -m bench.solve_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "build_info": skyformer_ext.build_info(), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    with open(out, "w") as f:
        json.dump({"environment": environment, "batch_heads": args.batch_heads, "value_dim": args.value_dim,
                   "dtype": args.dtype, "rows": rows, "table": table}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
