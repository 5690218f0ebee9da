"""Throughput and peak memory of Skyformer against the baselines: ``python -m bench`` (``make bench``).

Without axis options it runs the default set for the device: on CPU b=1, h=8, p=64, m=128, float32,
forward, n = 1k..32k for skyformer[torch], the naive materialising Skyformer, kernelized[torch] and SDPA,
then forward+backward for skyformer and SDPA at 1k, 4k and 16k; on GPU every available method, forward
and forward+backward, bfloat16, n = 1k..64k. Any of --n/--p/--m/--dtype/--modes/--methods switches to the
cross product of the given axes. A point whose predicted cost exceeds --cap-s, or which no longer fits in
--budget-s, or whose predicted memory exceeds what the device has free, is skipped and the table says so
(with the predicted time); the points issue 2's acceptance ratios need (skyformer[torch] at 16k and 32k, the
naive baseline and SDPA at 16k, in the default CPU suite) are exempt from cap and budget. Results go to
bench/results/<device-name>/ (throughput.json/.csv/.md and the PNG plots); --quick writes a tiny run to
bench/results/_scratch/ unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report
from .measure import MIB, SLOW_GPU_CALL_S, measure, warm_up_tracker
from .methods import Method, Problem, available, candidate_methods
from .progress import progress

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
MODES = ("fwd", "fwd+bwd")
CPU_DEFAULT_METHODS = ["skyformer[torch]", "naive_skyformer", "kernelized[torch]", "sdpa"]
CPU_BACKWARD_METHODS = ["skyformer[torch]", "sdpa"]
SDPA_PREFERENCE = ["sdpa", "sdpa[flash]", "sdpa[efficient]", "sdpa[math]"]
# Tensors of b*h*n*p elements that a forward pass must move at least once: Q, K, V read and O written; a
# backward adds Q, K, V, dO read and dQ, dK, dV written (O-free formulation). See shared/skyformer-math.md.
FLOOR_TENSORS = {"fwd": 4, "fwd+bwd": 11}


@dataclass(frozen=True)
class Suite:
    mode: str
    batch: int
    heads: int
    head_dim: int
    num_landmarks: int
    dtype: str
    sizes: tuple[int, ...]
    methods: tuple[str, ...]

    @property
    def name(self) -> str:
        return (f"{self.mode.replace('+', '')}_b{self.batch}h{self.heads}_p{self.head_dim}_m{self.num_landmarks}"
                f"_{self.dtype}")


# ---- the device ------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A stable folder name: the GPU's name, or the CPU model and its core count."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(cpu_model())}-{os.cpu_count()}c"


def memory_limit_bytes(device: torch.device) -> float:
    """What one call may use before a point is skipped as not fitting."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024 ** 3


# ---- planning --------------------------------------------------------------------------------------------

def default_suites(device: torch.device, quick: bool) -> list[Suite]:
    if quick:
        sizes = (128, 256)
        names = tuple(m.name for m in candidate_methods(device))
        return [Suite(mode, 1, 2, 32, 16, "fp32", sizes, names) for mode in MODES]
    if device.type == "cuda":
        names = tuple(m.name for m in candidate_methods(device))
        sizes = tuple(1024 * 2 ** i for i in range(7))
        return [Suite(mode, 1, 8, 64, 128, "bf16", sizes, names) for mode in MODES]
    sizes = tuple(1024 * 2 ** i for i in range(6))
    return [Suite("fwd", 1, 8, 64, 128, "fp32", sizes, tuple(CPU_DEFAULT_METHODS)),
            Suite("fwd+bwd", 1, 8, 64, 128, "fp32", (1024, 4096, 16384), tuple(CPU_BACKWARD_METHODS))]


def custom_suites(args, device: torch.device) -> list[Suite]:
    names = tuple(args.methods or [m.name for m in candidate_methods(device)])
    sizes = tuple(args.n or default_suites(device, args.quick)[0].sizes)
    dtypes = args.dtype or ["bf16" if device.type == "cuda" else "fp32"]
    return [Suite(mode, args.batch, args.heads, p, m, dtype, sizes, names)
            for mode, p, m, dtype in itertools.product(args.modes or ["fwd"], args.p or [64], args.m or [128], dtypes)]


def acceptance_points(suite: Suite) -> set[tuple[str, int]]:
    """Points issue 2's acceptance ratios need: exempt from the cap and the budget (not from the memory check)."""
    if (suite.mode, suite.batch, suite.heads, suite.head_dim, suite.num_landmarks, suite.dtype) != \
            ("fwd", 1, 8, 64, 128, "fp32"):
        return set()
    return {("skyformer[torch]", 16384), ("skyformer[torch]", 32768), ("naive_skyformer", 16384),
            ("sdpa", 16384)}


def point_cost_s(seconds: float, device: torch.device) -> float:
    """Predicted wall time of one point (upper bound), mirroring measure(): warm-up/memory calls plus the
    timed calls (do_bench's ~0.3 s of estimate, warm-up and repetitions for fast GPU calls)."""
    if device.type == "cuda":
        return 6 * seconds if seconds >= SLOW_GPU_CALL_S else 0.3 + 7 * seconds
    if seconds >= 10.0:
        return 2 * seconds
    return seconds * (3 if seconds >= 3.0 else (4 if seconds >= 0.5 else 11))


# ---- running ---------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, device: torch.device, cap_s: float, budget_s: float, show_progress: bool, seed: int,
                 max_calls: int = 10):
        self.device, self.cap_s, self.budget_s, self.seed, self.max_calls = device, cap_s, budget_s, seed, max_calls
        self.show_progress = show_progress
        self.start = time.perf_counter()
        self.memory_limit = memory_limit_bytes(device)
        self.methods = {m.name: m for m in candidate_methods(device)}
        self._availability: dict[tuple[str, str, bool], str | None] = {}
        warm_up_tracker()

    def _availability_of(self, method: Method, dtype: str, backward: bool) -> str | None:
        key = (method.name, dtype, backward)
        if key not in self._availability:
            if self.device.type != "cuda" and method.name.startswith(("skyformer[triton]", "kernelized[triton]")):
                self._availability[key] = "Triton kernels need a CUDA device"
            else:
                self._availability[key] = available(method, DTYPES[dtype], self.device, backward)
        return self._availability[key]

    def run(self, suites: list[Suite]) -> list[dict]:
        rows = []
        total = sum(len(s.sizes) * len(s.methods) for s in suites)
        bar = progress(total, "bench", self.show_progress)
        try:
            for suite in suites:
                rows.extend(self._run_suite(suite, bar))
        finally:
            bar.close()
        add_speedups(rows)
        return rows

    def _row(self, suite: Suite, name: str, n: int, **values) -> dict:
        method = self.methods.get(name)
        row = {"suite": suite.name, "method": name, "family": method.family if method else "unknown",
               "mode": suite.mode, "batch": suite.batch, "heads": suite.heads, "n": n, "head_dim": suite.head_dim,
               "num_landmarks": suite.num_landmarks, "dtype": suite.dtype, "status": "ok", "note": "",
               "time_ms": None, "times_ms": [], "peak_mib": None, "cuda_peak_mib": None, "est_time_ms": None,
               "sdpa_reference": None, "speedup_vs_sdpa": None, "speedup_estimated": False, "bandwidth_gbs": None}
        row.update(values)
        return row

    def _run_suite(self, suite: Suite, bar) -> list[dict]:
        backward = suite.mode == "fwd+bwd"
        required = acceptance_points(suite)
        last: dict[str, tuple[int, float, float]] = {}  # method -> (n, seconds, peak bytes) last measured
        rows = []
        for n in sorted(suite.sizes):
            for name in suite.methods:
                bar.set_postfix_str(f"{suite.mode} {name} n={report.size_label(n)}")
                rows.append(self._run_point(suite, name, n, backward, (name, n) in required, last))
                bar.update(1)
        return rows

    def _run_point(self, suite: Suite, name: str, n: int, backward: bool, required: bool, last: dict) -> dict:
        method = self.methods.get(name)
        if method is None:
            return self._row(suite, name, n, status="unavailable", note="unknown on this device")
        reason = self._availability_of(method, suite.dtype, backward)
        if reason is not None:
            return self._row(suite, name, n, status="unavailable", note=reason)
        estimate_s = estimate_bytes = None
        if name in last:
            n0, seconds0, bytes0 = last[name]
            estimate_s = seconds0 * (n / n0) ** method.time_order
            estimate_bytes = bytes0 * (n / n0) ** method.memory_order
        if estimate_bytes is not None and estimate_bytes > self.memory_limit:
            return self._row(suite, name, n, status="skipped", est_time_ms=estimate_s * 1e3,
                             note=f"est. {estimate_bytes / 2 ** 30:.1f} GiB > {self.memory_limit / 2 ** 30:.1f} GiB free")
        if estimate_s is not None:
            cost = point_cost_s(estimate_s, self.device)
            elapsed = time.perf_counter() - self.start
            if cost > self.cap_s and not required:
                return self._row(suite, name, n, status="skipped", est_time_ms=estimate_s * 1e3,
                                 note=f"est. {estimate_s:.3g} s per call")
            if elapsed + cost > self.budget_s and not required:
                return self._row(suite, name, n, status="skipped", est_time_ms=estimate_s * 1e3,
                                 note=f"time budget (est. {estimate_s:.1f} s per call)")
        problem = Problem(suite.batch, suite.heads, n, suite.head_dim, suite.num_landmarks, DTYPES[suite.dtype],
                          self.device)
        try:
            result = measure(method, problem, backward, self.seed, self.max_calls)
        except torch.OutOfMemoryError as error:
            return self._row(suite, name, n, status="oom", note=str(error).splitlines()[0][:80])
        except (RuntimeError, FloatingPointError) as error:
            text = str(error)
            status = "oom" if ("out of memory" in text or "alloc" in text.lower()) else "error"
            return self._row(suite, name, n, status=status, note=text.splitlines()[0][:80] if text else "")
        finally:
            self._release()
        peak_bytes = (result.cuda_peak_mib if result.cuda_peak_mib is not None else result.peak_mib) * MIB
        last[name] = (n, result.median_ms / 1e3, max(peak_bytes, 1.0))
        row = self._row(suite, name, n, time_ms=result.median_ms, times_ms=result.times_ms,
                        peak_mib=result.peak_mib, cuda_peak_mib=result.cuda_peak_mib)
        if self.device.type == "cuda":
            element = torch.empty((), dtype=DTYPES[suite.dtype]).element_size()
            floor_bytes = FLOOR_TENSORS[suite.mode] * suite.batch * suite.heads * n * suite.head_dim * element
            row["bandwidth_gbs"] = floor_bytes / (result.median_ms * 1e-3) / 1e9
        return row

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def add_speedups(rows: list[dict]) -> None:
    """speed-up vs SDPA = SDPA time / method time at the same point; against SDPA's predicted time (marked
    estimated) where SDPA itself was skipped. The SDPA used is the first measured in SDPA_PREFERENCE."""
    by_point: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["suite"], r["n"]), {})[r["method"]] = r
    for point in by_point.values():
        reference = next((point[name] for name in SDPA_PREFERENCE if name in point and point[name]["status"] == "ok"),
                         None)
        estimated = reference is None
        if reference is None:
            reference = next((point[name] for name in SDPA_PREFERENCE if name in point and point[name]["est_time_ms"]),
                             None)
        if reference is None:
            continue
        reference_ms = reference["est_time_ms"] if estimated else reference["time_ms"]
        for r in point.values():
            if r["status"] == "ok":
                r["sdpa_reference"] = reference["method"]
                r["speedup_vs_sdpa"] = reference_ms / r["time_ms"]
                r["speedup_estimated"] = estimated


def acceptance(rows: list[dict]) -> list[dict]:
    """Issue 2's targets, from the fwd b=1 h=8 p=64 m=128 fp32 suite (empty when that suite did not run)."""
    def get(name, n):
        return next((r for r in rows if r["suite"] == "fwd_b1h8_p64_m128_fp32" and r["method"] == name
                     and r["n"] == n and r["status"] == "ok"), None)

    sky16, sky32, naive16, sdpa16 = get("skyformer[torch]", 16384), get("skyformer[torch]", 32768), \
        get("naive_skyformer", 16384), get("sdpa", 16384)
    checks = []

    def check(label, value, target, at_least):
        passed = None if value is None else (value >= target if at_least else value <= target)
        checks.append({"check": label, "value": value, "target": ("≥ " if at_least else "≤ ") + f"{target:g}",
                       "passed": passed})

    check("skyformer[torch] vs SDPA speed-up at n=16k", sdpa16 and sky16 and sdpa16["time_ms"] / sky16["time_ms"],
          20, True)
    check("skyformer[torch] vs naive speed-up at n=16k", naive16 and sky16 and naive16["time_ms"] / sky16["time_ms"],
          5, True)
    check("skyformer[torch] / naive peak memory at n=16k",
          naive16 and sky16 and sky16["peak_mib"] / max(naive16["peak_mib"], 1e-9), 0.25, False)
    check("skyformer[torch] t(32k) / t(16k)", sky16 and sky32 and sky32["time_ms"] / sky16["time_ms"], 2.2, False)
    return checks if any(c["value"] is not None for c in checks) else []


def acceptance_lines(checks: list[dict]) -> list[str]:
    lines = ["Acceptance (issue 2, b=1 h=8 p=64 m=128 fp32 forward):"] if checks else []
    for c in checks:
        verdict = "n/a" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")
        value = "-" if c["value"] is None else f"{c['value']:.3g}"
        lines.append(f"  {verdict:4}  {c['check']}: {value} (target {c['target']})")
    return lines


# ---- the command -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, every method (seconds; used in CI)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--methods", nargs="+", help="method names, e.g. skyformer[torch] sdpa naive_skyformer; "
                        "--list-methods shows them")
    parser.add_argument("--list-methods", action="store_true", help="print the methods on this device and exit")
    parser.add_argument("--n", type=int, nargs="+", help="sequence lengths")
    parser.add_argument("--p", type=int, nargs="+", help="head dims (e.g. 32 64 128)")
    parser.add_argument("--m", type=int, nargs="+", help="landmark counts (e.g. 64 128 256)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="input dtypes")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="fwd and/or fwd+bwd")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--cap-s", type=float, default=None,
                        help="skip a point whose predicted cost exceeds this (default 60 CPU, 120 GPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip points that no longer fit in this total (default 270 CPU, 300 GPU)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<device-name>)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, all cores)")
    return parser.parse_args(argv)


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.list_methods:
        for method in candidate_methods(device):
            print(method.name)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    is_gpu = device.type == "cuda"
    customised = any(getattr(args, a) for a in ("methods", "n", "p", "m", "dtype", "modes"))
    suites = custom_suites(args, device) if customised else default_suites(device, args.quick)
    cap_s = args.cap_s if args.cap_s is not None else (120.0 if is_gpu else 60.0)
    budget_s = args.budget_s if args.budget_s is not None else (300.0 if is_gpu else 270.0)
    name = device_name(device)
    out = args.out or (RESULTS_ROOT / "_scratch" / name if args.quick else RESULTS_ROOT / name)
    out.mkdir(parents=True, exist_ok=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    runner = Runner(device, cap_s, budget_s, not args.no_progress, args.seed, max_calls=3 if args.quick else 10)
    rows = runner.run(suites)
    wall_s = time.perf_counter() - runner.start
    checks = acceptance(rows)

    meta = {
        "command": ("python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "device": str(device), "device_name": name,
        "device_model": torch.cuda.get_device_name(device) if is_gpu else cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "triton": _version("triton"), "python": platform.python_version(), "platform": platform.platform(),
        "started_utc": started.isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg() if load_before else None,
        "cap_s": cap_s, "budget_s": budget_s, "memory_limit_gib": round(runner.memory_limit / 2 ** 30, 2),
        "timing": "CUDA: triton do_bench median (CUDA events without triton), rotating inputs" if is_gpu else
                  "CPU: wall-clock median; peak = PeakMemory (live bytes allocated inside the call)",
    }
    rows = [{k: report.finite_or_none(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    report.write_json(out / "throughput.json", {"meta": meta, "suites": [s.__dict__ | {"name": s.name} for s in suites],
                                                "results": rows, "acceptance": checks})
    report.write_csv(out / "throughput.csv", rows)
    load_text = "n/a" if load_before is None else ", ".join(f"{x:.1f}" for x in load_before)
    (out / "throughput.md").write_text(
        f"Command: `{meta['command']}` on {meta['device_model']} ({meta['cpu_count']} cores, "
        f"{meta['torch_threads']} torch threads, torch {meta['torch']}), {meta['started_utc']}, {wall_s:.0f} s; "
        f"load average before the run {load_text}\n\n" + report.markdown_table(rows, is_gpu)
        + ("\n```\n" + "\n".join(acceptance_lines(checks)) + "\n```\n" if checks else ""))
    for stale in [*out.glob("time_vs_n_*.png"), *out.glob("memory_vs_n_*.png")]:
        stale.unlink()  # plots of suites this run did not include would otherwise look current
    plots = []
    if not args.no_plots:
        for suite in suites:
            plots += report.plot_suite(rows, suite.name, out,
                                       f"{suite.name} on {meta['device_model']} ({meta['cpu_count']} cores)"
                                       if not is_gpu else f"{suite.name} on {meta['device_model']}")
    print("\n".join(report.table_lines(rows, is_gpu)))
    print("\n".join(acceptance_lines(checks)))
    print(f"\nwrote {out}/throughput.json, .csv, .md" + (f" and {len(plots)} plots" if plots else "")
          + f" in {wall_s:.0f} s")
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: just not reported
        return None
