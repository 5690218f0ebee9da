"""Kernel launches and host syncs of one Skyformer forward and one backward: ``python -m bench.launches``.

Counting rule (issue 12), applied to a torch.profiler trace of the call:
- every Triton kernel launch counts once (launches are bracketed by a profiler range, ``triton::<kernel>``,
  and nothing inside that range counts: on CPU that is the interpreter's own work);
- every ATen op that computes or writes memory counts once (copy_, fill_, zero_ included, also the ops
  nested inside compiled C++ operators such as torch.ops.skyformer.newton_schulz_solve). Only the innermost
  such op counts (aten::zeros -> aten::zero_ -> aten::fill_ is one launch, fill_), and views, reshapes,
  allocations and metadata queries never count;
- host syncs: aten::_local_scalar_dense (.item(), int(tensor)), nonzero, masked_select, unique. They count
  as launches too (each moves data to the host).

On CPU (Triton's interpreter) this rule is the launch count a CUDA run would see, up to how ATen decomposes
an op per device. On a CUDA device the command also reports what really ran: the CUDA kernels, memsets and
memcopies of the profiler's device trace.

Stages: work inside ``skyformer_ext._stages.stage(name)`` counts for that stage; unlabelled work falls back
to the outermost custom operator around it (``skyformer_ext::key_summary``), then to the autograd node
that ran it, else ``(unlabelled)``.

Library use (tests): ``count_launches(fn)`` -> :class:`LaunchCount` (``.total``, ``.syncs``,
``.by_stage``, ``.by_kernel``); :func:`count_skyformer` counts a forward and a backward of one configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():  # the kernels must be defined under the interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.autograd import DeviceType  # noqa: E402

from skyformer_ext._stages import STAGE_PREFIX  # noqa: E402

TRITON_PREFIX = "triton::"
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
            "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
            "aten::unique_dim_consecutive"}
# ATen ops that neither compute nor write memory: views, reshapes, allocations, metadata, and the composites
# that are no-ops when nothing needs converting (when they do convert, the copy_ below them counts).
NON_COMPUTE_OPS = {
    "aten::" + name for name in (
        "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "set_",
        "view", "_unsafe_view", "view_as", "reshape", "_reshape_alias", "as_strided", "expand", "expand_as",
        "permute", "transpose", "t", "select", "slice", "narrow", "unsqueeze", "squeeze", "flatten",
        "unflatten", "diagonal", "detach", "detach_", "alias", "lift_fresh", "unbind", "split",
        "split_with_sizes", "chunk", "movedim", "real", "view_as_real", "view_as_complex", "resolve_conj",
        "resolve_neg", "_conj", "to", "type_as", "contiguous", "numel", "size", "stride", "dim",
        "is_nonzero", "item", "result_type", "_has_compatible_shallow_copy_type", "is_same_size",
    )
}
REPORT_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class LaunchCount:
    """What one counted call launched. ``total`` and ``syncs`` follow the counting rule; ``by_stage`` and
    ``by_kernel`` split ``total``; on CUDA ``device_kernels`` is the profiler's device-side count (kernels,
    memsets, memcopies) with its own ``device_by_stage`` and ``device_by_kernel``."""

    total: int = 0
    syncs: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)
    by_kernel: dict[str, int] = field(default_factory=dict)
    sync_ops: dict[str, int] = field(default_factory=dict)
    device_kernels: int | None = None
    device_by_stage: dict[str, int] | None = None
    device_by_kernel: dict[str, int] | None = None


# ---- Triton launches -------------------------------------------------------------------------------------

def _kernel_name(kernel) -> str:
    """The Python function behind a JITFunction, InterpretedFunction or autotuner/heuristics wrapper."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", type(kernel).__name__)


@contextlib.contextmanager
def bracket_triton_launches():
    """Every ``kernel[grid](...)`` inside runs in a ``triton::<name>`` profiler range.

    ``KernelInterface.__getitem__`` is the launch syntax shared by compiled kernels, interpreted kernels
    and autotuners in triton >= 3.x; triton's launch_enter_hook would miss the interpreter. An autotuner's
    benchmarking runs go through ``fn.run`` directly, so one user launch is one range.
    """
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def bracketed(self, grid):
        launch = original(self, grid)
        name = TRITON_PREFIX + _kernel_name(self)

        def run(*args, **kwargs):
            with torch.profiler.record_function(name):
                return launch(*args, **kwargs)
        return run

    KernelInterface.__getitem__ = bracketed
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


# ---- the profiler trace -> counts --------------------------------------------------------------------------

def _is_aten(name: str) -> bool:
    return name.startswith("aten::")


def _is_custom_op(name: str) -> bool:
    namespace = name.split("::", 1)[0] if "::" in name else ""
    return namespace not in ("", "aten", "autograd", "profiler", "triton") and not name.startswith(STAGE_PREFIX)


def _stage_of(event) -> str:
    """Innermost stage label, else outermost custom op, else the autograd node that ran the event."""
    custom_op = autograd_node = None
    node = event
    while node is not None:
        name = node.name
        if name.startswith(STAGE_PREFIX):
            return name[len(STAGE_PREFIX):]
        if _is_custom_op(name):
            custom_op = name
        if autograd_node is None and name.startswith("autograd::engine::evaluate_function: "):
            autograd_node = name.split(": ", 1)[1]
        node = node.cpu_parent
    return custom_op or autograd_node or "(unlabelled)"


def _inside_triton_launch(event) -> bool:
    node = event.cpu_parent
    while node is not None:
        if node.name.startswith(TRITON_PREFIX):
            return True
        node = node.cpu_parent
    return False


def _counted_events(events) -> tuple[list, list]:
    """(launches, syncs): the CPU events that count by the rule."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not _inside_triton_launch(e)]
    computes = {id(e) for e in cpu if _is_aten(e.name) and e.name not in NON_COMPUTE_OPS}

    def has_counted_descendant(event) -> bool:
        return any(id(c) in computes or c.name.startswith(TRITON_PREFIX) or has_counted_descendant(c)
                   for c in event.cpu_children)

    launches = [e for e in cpu if e.name.startswith(TRITON_PREFIX)
                or (id(e) in computes and not has_counted_descendant(e))]
    syncs = [e for e in cpu if e.name in SYNC_OPS]
    return launches, syncs


def _launch_name(event) -> str:
    """The kernel or op name; an op nested in another ATen op is named after the outermost one, e.g.
    ``aten::sum/fill_`` (CPU reductions initialise their output) or ``aten::to/copy_``."""
    outer = None
    node = event.cpu_parent
    while node is not None and not _is_custom_op(node.name) and not node.name.startswith(STAGE_PREFIX):
        if _is_aten(node.name):
            outer = node.name
        node = node.cpu_parent
    return event.name if outer is None else f"{outer}/{event.name[len('aten::'):]}"


def _device_events(events) -> list:
    return [e for e in events if e.device_type == DeviceType.CUDA]


def _device_by_stage(events) -> dict[str, int]:
    """Device kernels per stage, through the CPU event each kernel was correlated with."""
    by_stage = Counter()
    for event in events:
        if event.device_type == DeviceType.CPU and event.kernels:
            by_stage[_stage_of(event)] += len(event.kernels)
    attributed = sum(by_stage.values())
    missing = len(_device_events(events)) - attributed
    if missing > 0:
        by_stage["(unattributed)"] += missing
    return dict(by_stage)


def count_launches(fn: Callable[[], object], *, device: str | torch.device = "cpu") -> LaunchCount:
    """Counts the launches and host syncs of ``fn()`` by the rule above; ``device="cuda"`` also records the
    real device-side kernels (the function is synchronised before the trace closes)."""
    device = torch.device(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with bracket_triton_launches(), torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    launches, syncs = _counted_events(events)
    count = LaunchCount(
        total=len(launches), syncs=len(syncs),
        by_stage=dict(Counter(_stage_of(e) for e in launches)),
        by_kernel=dict(Counter(_launch_name(e) for e in launches)),
        sync_ops=dict(Counter(e.name for e in syncs)))
    if device.type == "cuda":
        kernels = _device_events(events)
        count.device_kernels = len(kernels)
        count.device_by_stage = _device_by_stage(events)
        count.device_by_kernel = dict(Counter(e.name for e in kernels))
    return count


# ---- one Skyformer configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    backend: str = "triton"
    n_q: int = 1024
    n_k: int = 1024
    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    p: int = 64
    m: int = 128
    dtype: str = "bf16"
    mask: bool = True
    landmarks: str = "random"   # "random" (sampled in the call) or "given" (landmark_indices passed in)
    inverse: str = "newton_schulz"
    deterministic: bool = True
    landmark_refine: int = 0  # Lloyd steps on the landmarks (issue 18)
    ns_iters: int = 6  # inside the one solve kernel: no effect on the counts, only on interpreter time
    packed: bool = False  # skyformer_attention_varlen on `batch` packed sequences of different lengths (issue 14)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def skyformer_inputs(config: Config, device: torch.device, seed: int = 0) -> dict:
    """Inputs and keyword arguments of one call (keys 1/8 padded in every batch row when masked)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[config.dtype]

    def tensor(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    if config.packed:
        return _packed_inputs(config, device, gen, tensor)
    q = tensor(config.batch, config.heads, config.n_q, config.p)
    k = tensor(config.batch, config.kv_heads, config.n_k, config.p)
    v = tensor(config.batch, config.kv_heads, config.n_k, config.p)
    mask = None
    if config.mask:
        mask = torch.ones(config.batch, config.n_k, dtype=torch.bool)
        mask[:, config.n_k - config.n_k // 8:] = False
        mask = mask.to(device)
    kwargs = dict(num_landmarks=config.m, attn_mask=mask, inverse=config.inverse, backend=config.backend,
                  deterministic=config.deterministic, landmark_refine=config.landmark_refine,
                  ns_iters=config.ns_iters)
    if config.landmarks == "given":
        from skyformer_ext import sample_landmarks
        kwargs["landmark_indices"] = sample_landmarks(config.batch, config.n_q, config.n_k, config.m,
                                                      attn_mask=mask, generator=gen, device=device)
    return {"q": q, "k": k, "v": v, "kwargs": kwargs}


def packed_lengths(config: Config) -> tuple[list[int], list[int]]:
    """Query and key lengths of the packed configuration's sequences: n_q and n_k shrinking by a ninth per
    sequence (mixed lengths, none empty)."""
    return ([max(1, config.n_q - s * config.n_q // 9) for s in range(config.batch)],
            [max(1, config.n_k - s * config.n_k // 9) for s in range(config.batch)])


def _packed_inputs(config: Config, device: torch.device, gen: torch.Generator, tensor) -> dict:
    """A packed call's inputs (no key mask: packing drops the padding)."""
    lengths_q, lengths_k = packed_lengths(config)
    q = tensor(sum(lengths_q), config.heads, config.p)
    k = tensor(sum(lengths_k), config.kv_heads, config.p)
    v = tensor(sum(lengths_k), config.kv_heads, config.p)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for lengths in (lengths_q, lengths_k))
    kwargs = dict(num_landmarks=config.m, inverse=config.inverse, backend=config.backend,
                  deterministic=config.deterministic, landmark_refine=config.landmark_refine,
                  ns_iters=config.ns_iters)
    if config.landmarks == "given":
        from skyformer_ext import varlen
        draws = torch.rand(config.batch, config.m, generator=gen, dtype=torch.float64).to(device)
        kwargs["landmark_indices"] = varlen.sample_packed_landmarks(cu_q, cu_k, config.m, "random", draws)
    return {"q": q, "k": k, "v": v, "kwargs": kwargs,
            "packing": (cu_q, cu_k, max(lengths_q), max(lengths_k))}


def count_skyformer(config: Config, device: str | torch.device = "cpu") -> tuple[LaunchCount, LaunchCount]:
    """(forward, backward) counts of one skyformer_attention call and torch.autograd.grad over q, k, v.

    One uncounted call first, so that one-time work (Triton compilation, lazy imports, warnings) is not
    counted.
    """
    from skyformer_ext import skyformer_attention, skyformer_attention_varlen

    device = torch.device(device)
    inputs = skyformer_inputs(config, device)
    q, k, v, kwargs = inputs["q"], inputs["k"], inputs["v"], inputs["kwargs"]
    grad_out = torch.ones(q.shape, dtype=q.dtype, device=device)

    def forward():
        if config.packed:
            return skyformer_attention_varlen(q, k, v, *inputs["packing"], **kwargs)
        return skyformer_attention(q, k, v, **kwargs)

    torch.autograd.grad(forward(), (q, k, v), grad_out)  # warm-up
    result = {}

    def counted_forward():
        result["out"] = forward()

    fwd = count_launches(counted_forward, device=device)
    bwd = count_launches(lambda: torch.autograd.grad(result["out"], (q, k, v), grad_out), device=device)
    return fwd, bwd


# ---- the command -------------------------------------------------------------------------------------------

def _table(title: str, fwd: dict[str, int], bwd: dict[str, int]) -> list[str]:
    names = sorted(set(fwd) | set(bwd), key=lambda s: (-(fwd.get(s, 0) + bwd.get(s, 0)), s))
    lines = [f"| {title} | forward | backward |", "|---|---|---|"]
    lines += [f"| {name} | {fwd.get(name, 0)} | {bwd.get(name, 0)} |" for name in names]
    return lines


def report_lines(config: Config, fwd: LaunchCount, bwd: LaunchCount, by_kernel: bool) -> list[str]:
    lines = [f"configuration: {asdict(config)}", ""]
    lines += _table("stage (counting rule)", fwd.by_stage, bwd.by_stage)
    lines.append(f"| **total launches** | **{fwd.total}** | **{bwd.total}** |")
    lines.append(f"| **host syncs** | **{fwd.syncs}** | **{bwd.syncs}** |")
    if fwd.syncs or bwd.syncs:
        lines.append(f"sync ops: forward {fwd.sync_ops}, backward {bwd.sync_ops}")
    if by_kernel:
        lines += [""] + _table("op / kernel (counting rule)", fwd.by_kernel, bwd.by_kernel)
    if fwd.device_kernels is not None:
        lines += ["", "CUDA device trace (what really ran: kernels, memsets, memcopies):", ""]
        lines += _table("stage (CUDA kernels)", fwd.device_by_stage, bwd.device_by_stage)
        lines.append(f"| **CUDA kernels** | **{fwd.device_kernels}** | **{bwd.device_kernels}** |")
        if by_kernel:
            lines += [""] + _table("CUDA kernel", fwd.device_by_kernel, bwd.device_by_kernel)
    return lines


def parse_args(argv=None):
    defaults = Config()
    parser = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU with Triton's "
                                                         "interpreter), cpu, cuda")
    parser.add_argument("--backend", default=defaults.backend, choices=("triton", "torch", "reference"))
    parser.add_argument("--n-q", type=int, default=defaults.n_q)
    parser.add_argument("--n-k", type=int, default=defaults.n_k)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    parser.add_argument("--p", type=int, default=defaults.p, help="head dim (q, k and v)")
    parser.add_argument("--m", type=int, default=defaults.m, help="landmarks")
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES))
    parser.add_argument("--no-mask", action="store_true", help="no key padding mask")
    parser.add_argument("--landmarks", default=defaults.landmarks, choices=("random", "given"),
                        help="random: sampled inside the call; given: landmark_indices passed in")
    parser.add_argument("--inverse", default=defaults.inverse, choices=("newton_schulz", "cholesky"))
    parser.add_argument("--nondeterministic", action="store_true", help="deterministic=False (atomics)")
    parser.add_argument("--landmark-refine", type=int, default=defaults.landmark_refine,
                        help="Lloyd steps on the landmarks (landmark_refine)")
    parser.add_argument("--packed", action="store_true", help="skyformer_attention_varlen on --batch packed "
                        "sequences of mixed lengths (up to --n-q / --n-k; no key mask)")
    parser.add_argument("--by-kernel", action="store_true", help="also list every op / kernel")
    parser.add_argument("--json", type=Path, help="also write the counts to this JSON file")
    parser.add_argument("--label", default="", help="a note stored in the JSON (e.g. which code was counted)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    config = Config(backend=args.backend, n_q=args.n_q, n_k=args.n_k, batch=args.batch, heads=args.heads,
                    kv_heads=args.kv_heads, p=args.p, m=args.m, dtype=args.dtype,
                    mask=not (args.no_mask or args.packed),
                    landmarks=args.landmarks, inverse=args.inverse, deterministic=not args.nondeterministic,
                    landmark_refine=args.landmark_refine, packed=args.packed)
    fwd, bwd = count_skyformer(config, device)
    print("\n".join(report_lines(config, fwd, bwd, args.by_kernel)))
    before = RESULTS_DIR / "launches_before.json"
    if before.exists():
        for old in json.loads(before.read_text()):
            print(f"\nbefore: {old['label']}, {old['config']['inverse']}: forward {old['forward']['total']} launches "
                  f"/ {old['forward']['syncs']} syncs, backward {old['backward']['total']} / "
                  f"{old['backward']['syncs']} ({old['command']}, {old['device']}, {old['date']})")
    if args.json:
        payload = {"version": REPORT_VERSION, "command": "python -m bench.launches " + " ".join(
            sys.argv[1:] if argv is None else argv), "date": datetime.date.today().isoformat(),
            "label": args.label, "device": str(device), "torch": torch.__version__, "config": asdict(config),
            "forward": asdict(fwd), "backward": asdict(bwd)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
