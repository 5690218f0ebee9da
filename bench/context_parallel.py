"""Context-parallel Skyformer, weak scaling: ``python -m bench.context_parallel``.

P = 1, 2, 4 processes (``--ranks``) on one machine, each holding ``--tokens-per-rank`` tokens of one sequence
(self-attention, batch 1, heads 2, head dim 32, m = 128 random landmarks, float32, backend="torch", one torch
thread per rank), run ``skyformer_ext.parallel.context_parallel_attention`` over gloo (CPU; ``--device cuda``:
NCCL, one GPU per rank). Per P, after a warm-up forward+backward:

- **time**: forward+backward wall clock per rank, ``--reps`` calls (median), the slowest rank reported;
- **peak memory per rank**: ``skyformer_ext._memory.PeakMemory`` over the warm-up call (the peak of the live
  bytes allocated inside the call: output, saved tensors, gradients, communication buffers; inputs excluded);
- **bytes sent per rank** and collectives, counted on the c10d calls of one forward+backward
  (``CollectiveCounter``: the tensor each rank hands to a collective);
- beside them, ring attention's bytes for the same shapes (computed, not run): its forward passes every
  K and V shard around the ring, (P - 1) * n_local * kv_heads * (p + p_v) numbers sent per rank, and its
  backward passes K, V and the dK, dV accumulators, twice that: 3 (P - 1) n_local kv_heads (p + p_v) numbers.

``--quick``: tiny sizes and P = 1, 2 (seconds; CI: tests/test_bench_context_parallel.py), writes
bench/results/_scratch/context_parallel unless --out. Full results: bench/results/context_parallel/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
MIB = float(1 << 20)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "send",
               "isend", "all_to_all", "reduce", "gather", "scatter")


class CollectiveCounter:
    """Counts the torch.distributed collectives issued inside the block and the bytes this rank hands to each
    (its send volume): wraps the functions of torch.distributed for the duration."""

    def __init__(self):
        self.calls, self.bytes = 0, 0
        self._originals = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(first, *args, _original=original, _name=name, **kwargs):
                self.calls += 1
                sent = args[0] if _name in ("all_gather", "all_gather_into_tensor") else first
                self.bytes += sent.numel() * sent.element_size()
                return _original(first, *args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def settings(quick: bool) -> dict:
    return dict(ranks=[1, 2] if quick else [1, 2, 4], tokens_per_rank=2048 if quick else 262144, heads=2, kv_heads=2, p=32,
                m=16 if quick else 128, reps=1 if quick else 3, dtype="float32")


def ring_attention_bytes(world: int, tokens_per_rank: int, kv_heads: int, p: int, p_v: int, elem: int) -> int:
    """Bytes ring attention sends per rank for one forward+backward (see the module docstring)."""
    return 3 * (world - 1) * tokens_per_rank * kv_heads * (p + p_v) * elem


def _worker(rank, world, port, config, device_type, out_dir):
    from skyformer_ext._memory import PeakMemory
    from skyformer_ext.parallel import context_parallel_attention

    torch.set_num_threads(1)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        gen = torch.Generator().manual_seed(100 + rank)
        n, dtype = config["tokens_per_rank"], getattr(torch, config["dtype"])
        q, k, v = (torch.randn(1, heads, n, config["p"], generator=gen).to(device, dtype).requires_grad_()
                   for heads in (config["heads"], config["kv_heads"], config["kv_heads"]))
        grad = torch.randn(1, config["heads"], n, config["p"], generator=gen).to(device, dtype)

        def call():
            out = context_parallel_attention(q, k, v, num_landmarks=config["m"],
                                             generator=torch.Generator().manual_seed(0))
            torch.autograd.grad(out, (q, k, v), grad)

        with PeakMemory() as tracker, CollectiveCounter() as counter:
            call()
        times = []
        for _ in range(config["reps"]):
            dist.barrier()
            if device_type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device_type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result = dict(rank=rank, ms=statistics.median(times) * 1e3, peak_mib=tracker.peak_bytes / MIB,
                      collectives=counter.calls, bytes_sent=counter.bytes)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, config: dict, device_type: str, scratch: Path) -> dict:
    scratch.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, _free_port(), config, device_type, str(scratch)), nprocs=world,
                       start_method="spawn")
    ranks = [json.loads((scratch / f"rank{r}.json").read_text()) for r in range(world)]
    elem = torch.empty(0, dtype=getattr(torch, config["dtype"])).element_size()
    return dict(ranks=world, total_tokens=world * config["tokens_per_rank"],
                ms=max(r["ms"] for r in ranks), peak_mib_per_rank=max(r["peak_mib"] for r in ranks),
                collectives=ranks[0]["collectives"], bytes_sent_per_rank=max(r["bytes_sent"] for r in ranks),
                ring_attention_bytes_per_rank=ring_attention_bytes(world, config["tokens_per_rank"],
                                                                   config["kv_heads"], config["p"], config["p"],
                                                                   elem),
                per_rank=ranks)


def markdown(meta: dict, rows: list[dict]) -> str:
    c = meta["settings"]
    lines = [f"Context-parallel Skyformer, weak scaling ({meta['command']}; {meta['device']}, {meta['started_utc']}): "
             f"{c['tokens_per_rank']} tokens per rank, heads {c['heads']}, p {c['p']}, m {c['m']}, {c['dtype']}, "
             f"forward+backward.", "",
             "| ranks | total tokens | time / call (slowest rank) | peak memory per rank | collectives | "
             "bytes sent per rank | ring attention bytes per rank |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['total_tokens']:,} | {r['ms']:.0f} ms | {r['peak_mib_per_rank']:.1f} MiB | "
                     f"{r['collectives']} | {r['bytes_sent_per_rank'] / 1024:.1f} KiB | "
                     f"{r['ring_attention_bytes_per_rank'] / MIB:.1f} MiB |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax, b_ax) = plt.subplots(1, 3, figsize=(13, 3.6), dpi=90)
    ranks = [r["ranks"] for r in rows]
    t_ax.plot(ranks, [r["ms"] / 1e3 for r in rows], "o-")
    t_ax.set_ylabel("forward+backward (s), slowest rank")
    m_ax.plot(ranks, [r["peak_mib_per_rank"] for r in rows], "o-")
    m_ax.set_ylabel("peak memory per rank (MiB)")
    b_ax.plot(ranks, [max(r["bytes_sent_per_rank"], 1) for r in rows], "o-", label="Skyformer (measured)")
    b_ax.plot(ranks, [max(r["ring_attention_bytes_per_rank"], 1) for r in rows], "s--", label="ring attention")
    b_ax.set_yscale("log")
    b_ax.set_ylabel("bytes sent per rank")
    b_ax.legend(fontsize=8)
    for ax in (t_ax, m_ax, b_ax):
        ax.set_xlabel("ranks (fixed tokens per rank)")
        ax.set_xticks(ranks)
        ax.set_ylim(bottom=0 if ax is not b_ax else None)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.context_parallel", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used in CI)")
    parser.add_argument("--ranks", type=int, nargs="+", help="world sizes (default 1 2 4)")
    parser.add_argument("--tokens-per-rank", type=int, help="tokens per rank (default 262144; 2048 with --quick)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu: gloo; cuda: NCCL")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/context_parallel)")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from .throughput import cpu_model

    args = parse_args(argv)
    config = settings(args.quick)
    if args.ranks:
        config["ranks"] = args.ranks
    if args.tokens_per_rank:
        config["tokens_per_rank"] = args.tokens_per_rank
    out = args.out or (RESULTS_ROOT / "_scratch" / "context_parallel" if args.quick
                       else RESULTS_ROOT / "context_parallel")
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    rows = []
    for world in config["ranks"]:
        rows.append(run_world(world, config, args.device, out / "_ranks"))
        print(f"P={world}: {rows[-1]['ms']:.0f} ms, {rows[-1]['bytes_sent_per_rank']} bytes sent per rank",
              flush=True)
    for stale in (out / "_ranks").glob("rank*.json"):
        stale.unlink()
    (out / "_ranks").rmdir()
    command = ("python -m bench.context_parallel " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    device = (torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model())
    meta = {"command": command, "started_utc": started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "python": platform.python_version(), "device": device, "cpu_count": os.cpu_count(),
            "process_group": "nccl" if args.device == "cuda" else "gloo", "settings": config,
            "ring_attention_bytes": "computed: 3 (P - 1) n_local kv_heads (p + p_v) numbers per rank, fwd+bwd"}
    (out / "context_parallel.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    fields = ("ranks", "total_tokens", "ms", "peak_mib_per_rank", "collectives", "bytes_sent_per_rank",
              "ring_attention_bytes_per_rank")
    with (out / "context_parallel.csv").open("w") as handle:
        handle.write(",".join(fields) + "\n")
        for r in rows:
            handle.write(",".join(f"{r[f]:.6g}" if isinstance(r[f], float) else str(r[f]) for f in fields) + "\n")
    table = markdown(meta, rows)
    (out / "context_parallel.md").write_text(table)
    if not args.no_plots:
        plot(rows, out / "context_parallel.png",
             f"Context-parallel Skyformer, {config['tokens_per_rank']} tokens per rank, m {config['m']}, "
             f"{meta['process_group']} on {device}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
