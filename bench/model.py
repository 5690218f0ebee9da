"""A roofline PREDICTION of Skyformer's GPU time per stage, beside FlashAttention: ``python -m bench.model``.

Per stage (landmarks, key summary, landmark solve, query apply; their backward, plus the landmark-gradient
scatter) it counts bytes moved through HBM, FLOPs, exponentials and launches for the fused structure of issue
12, and predicts the H200 time as max(bytes / bandwidth, FLOPs / compute rate, exps / exp rate) + launches x
launch cost, at each n. Nothing here is measured: a measured GPU row (``bash bench/gpu_check.sh``) goes beside
it when one exists. Every figure used is in HARDWARE / FLASH_ATTENTION below, with its source.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

# H200 SXM (NVIDIA H200 datasheet; its SMs, clocks and tensor cores are the H100 SXM's): dense peaks.
HARDWARE = {
    "hbm_bytes_per_s": 4.8e12,         # HBM3e bandwidth
    "bf16_tensor_flops": 989e12,       # dense bf16 tensor-core peak
    "tf32_tensor_flops": 494e12,       # dense TF32 tensor-core peak
    "fp32_fma_flops": 67e12,           # fp32 on CUDA cores ("ieee" dots)
    "exp_per_s": 3.9e12,               # MUFU exp2 throughput (the FlashAttention-3 paper's H100 SXM5 figure)
    "sms": 132,
    "launch_s": 4e-6,                  # per launch, host + gaps between small kernels (3-5 us commonly seen)
}
# Fractions of those peaks a well-tuned kernel reaches (assumptions, to be replaced by measurements):
# streaming kernels reach ~80 % of HBM; thin GEMMs (p = 64, tiles of m = 128) ~50 % of the tensor peak;
# exponentials overlap with the rest only partly, so they are charged at 80 % of the MUFU rate; the solve
# runs one program (one SM) per matrix at ~50 % of that SM's share of the peak.
EFFICIENCY = {"hbm": 0.8, "tensor": 0.5, "exp": 0.8, "solve": 0.5}
# FlashAttention forward throughput, bf16, head dim 64, non-causal, H100 SXM5, TFLOP/s, from the
# FlashAttention-3 paper (Shah et al. 2024, arXiv 2407.08608, Fig. 5; batch x n = 16k tokens, 2048 model
# dim): compute-bound, so taken as is for the H200 (same tensor cores and clocks). 64k: the 16k plateau.
# Backward: FLOPs 2.5x the forward's (FlashAttention's count, 10 n^2 p), throughput assumed 0.8x the
# forward's (an assumption: the published backward figures are for head dims 64-128 and lie below forward).
FLASH_ATTENTION = {
    "FA2": {1024: 306, 4096: 321, 16384: 324, 65536: 324},
    "FA3": {1024: 392, 4096: 476, 16384: 497, 65536: 497},
}
FA_BACKWARD_FLOP_RATIO = 2.5
FA_BACKWARD_SPEED_RATIO = 0.8
SOLVE_BLOCK = 32  # the solve's tile (triton_kernels.landmark_solve.solve_config's BLOCK)
SOLVE_PRECISIONS = {"tf32x3": ("tf32_tensor_flops", 3), "tf32": ("tf32_tensor_flops", 1),
                    "ieee": ("fp32_fma_flops", 1), "bf16": ("bf16_tensor_flops", 1)}


@dataclass(frozen=True)
class Shape:
    bh: int = 128           # batch * heads
    batch: int = 8
    p: int = 64             # head dim of q, k and v
    m: int = 128            # landmarks
    elem: int = 2           # bytes per input element (bf16)
    ns_iters: int = 6
    solve_precision: str = "tf32"  # what triton_kernels.landmark_solve.solve_precision picks for bf16


@dataclass
class Stage:
    name: str
    pass_: str              # "fwd" or "bwd"
    bytes: float
    flops: float
    exps: float
    launches: int
    solve_flops: float = 0.0   # FLOPs of the one-program-per-matrix solve (their own rate)


def stages(n: int, s: Shape) -> list[Stage]:
    """The issue-12 structure: forward 5 launches, backward 6. Per call, all (batch, head) pairs."""
    bh, p, m, e = s.bh, s.p, s.m, s.elem
    tensor = bh * n * p * e                       # one (b, h, n, p) input/output tensor
    small = bh * m * p * 4                        # one float32 (b, h, m, p) tensor
    product = 2 * m ** 3                          # one m x m product
    tiles = -(-m // SOLVE_BLOCK)
    symmetric = (tiles + 1) / (2 * tiles)         # a symmetric product computes the upper tiles only
    gram = 2 * m * m * p                          # kappa(L, L)'s dot products
    small_product = 2 * m * m * p                 # (m x m) @ (m x p_v), p_v = p
    # Forward: Gram, 4 symmetric products per iteration, Y = W Z. Backward: the same forward again, then the
    # reverse of each iteration (8 general products), dZ and dV of Y = W Z, the Gram's kappa again and H @ L.
    solve_fwd = gram + 4 * s.ns_iters * symmetric * product + small_product
    solve_bwd = solve_fwd + 8 * s.ns_iters * product + 2 * small_product + 2 * gram
    return [
        Stage("landmarks (draw + sample)", "fwd", s.batch * m * 16, 0, 0, 2),
        Stage("key summary Z = B^T V", "fwd", 2 * tensor + s.batch * n, 4 * bh * n * m * p, bh * n * m, 1),
        Stage("landmark solve (Gram + Newton-Schulz + W Z)", "fwd", 3 * small, 0, bh * m * m, 1,
              bh * solve_fwd),
        Stage("query apply O = A Y", "fwd", 2 * tensor + small, 4 * bh * n * m * p, bh * n * m, 1),
        # Backward: two kernels per n-sized stage, each recomputing its kappa tile (see shared/skyformer-math.md).
        Stage("query apply backward (dQ; dY, dL)", "bwd", 5 * tensor, 14 * bh * n * m * p, 2 * bh * n * m, 2),
        Stage("landmark solve backward", "bwd", 4 * small, 0, 2 * bh * m * m, 1, bh * solve_bwd),
        Stage("key summary backward (dK; dV, dL)", "bwd", 6 * tensor + 2 * s.batch * n, 14 * bh * n * m * p,
              2 * bh * n * m, 2),
        Stage("landmark gradient scatter", "bwd", 3 * small, 0, 0, 1),
    ]


def stage_time_s(stage: Stage, s: Shape, hw=HARDWARE, eff=EFFICIENCY) -> float:
    memory = stage.bytes / (hw["hbm_bytes_per_s"] * eff["hbm"])
    compute = stage.flops / (hw["bf16_tensor_flops"] * eff["tensor"])
    exps = stage.exps / (hw["exp_per_s"] * eff["exp"])
    solve = 0.0
    if stage.solve_flops:
        peak_key, passes = SOLVE_PRECISIONS[s.solve_precision]
        per_sm = hw[peak_key] / hw["sms"] * eff["solve"] / passes
        waves = -(-s.bh // hw["sms"])             # one program per matrix, one SM each
        solve = waves * (stage.solve_flops / s.bh) / per_sm
    return max(memory, compute, exps) + solve + stage.launches * hw["launch_s"]


def flash_time_s(name: str, n: int, s: Shape, backward: bool) -> float:
    tflops = FLASH_ATTENTION[name][n] * 1e12
    forward_flops = 4 * n * n * s.p * s.bh
    time = forward_flops / tflops
    if backward:
        time += FA_BACKWARD_FLOP_RATIO * forward_flops / (FA_BACKWARD_SPEED_RATIO * tflops)
    return time


def predict(sizes, s: Shape) -> dict:
    rows = []
    for n in sizes:
        per_stage = [dict(asdict(st), time_us=stage_time_s(st, s) * 1e6) for st in stages(n, s)]
        fwd = sum(st["time_us"] for st in per_stage if st["pass_"] == "fwd")
        total = sum(st["time_us"] for st in per_stage)
        row = {"n": n, "stages": per_stage, "skyformer_fwd_us": fwd, "skyformer_fwdbwd_us": total,
               "memory_floor_fwd_us": 4 * s.bh * n * s.p * s.elem / HARDWARE["hbm_bytes_per_s"] * 1e6}
        for name in FLASH_ATTENTION:
            row[f"{name}_fwd_us"] = flash_time_s(name, n, s, False) * 1e6
            row[f"{name}_fwdbwd_us"] = flash_time_s(name, n, s, True) * 1e6
        rows.append(row)
    return {"prediction": True, "shape": asdict(s), "hardware": HARDWARE, "efficiency": EFFICIENCY,
            "flash_attention_tflops": FLASH_ATTENTION, "rows": rows,
            "crossover_n": {f"{pass_} vs {name}": crossover_n(s, name, pass_ == "fwd+bwd")
                            for pass_ in ("fwd", "fwd+bwd") for name in FLASH_ATTENTION}}


def crossover_n(s: Shape, name: str, backward: bool) -> int | None:
    """The smallest power-of-two n in 256..64k (FlashAttention's 1k throughput used below 1k, the nearest
    published size in between) where Skyformer is predicted faster."""
    published = sorted(FLASH_ATTENTION[name])
    for n in (2 ** i for i in range(8, 17)):
        nearest = min(published, key=lambda x: abs(x - n))
        tflops = FLASH_ATTENTION[name][nearest] * 1e12
        flash = 4 * n * n * s.p * s.bh / tflops
        if backward:
            flash *= 1 + FA_BACKWARD_FLOP_RATIO / FA_BACKWARD_SPEED_RATIO
        ours = sum(stage_time_s(st, s) for st in stages(n, s) if backward or st.pass_ == "fwd")
        if ours < flash:
            return n
    return None


def _n_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown(result: dict) -> str:
    s = Shape(**result["shape"])
    rows = result["rows"]
    lines = [f"PREDICTION (roofline, not measured), H200, b·h = {s.bh}, p = {s.p}, m = {s.m}, bf16, Newton–Schulz "
             f"{s.ns_iters} iterations in {s.solve_precision}; µs per call", ""]
    head = "| | " + " | ".join(f"n={_n_label(r['n'])}" for r in rows) + " |"
    lines += [head, "|---" * (len(rows) + 1) + "|"]

    def line(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    for index, stage in enumerate(rows[0]["stages"]):
        line(f"{stage['pass_']}: {stage['name']} ({stage['launches']} launch{'es' if stage['launches'] > 1 else ''})",
             [f"{r['stages'][index]['time_us']:.1f}" for r in rows])
    line("**Skyformer fwd**", [f"**{r['skyformer_fwd_us']:.0f}**" for r in rows])
    for name in FLASH_ATTENTION:
        line(f"{name} fwd (published TFLOP/s)", [f"{r[f'{name}_fwd_us']:.0f}" for r in rows])
    line("**Skyformer fwd+bwd**", [f"**{r['skyformer_fwdbwd_us']:.0f}**" for r in rows])
    for name in FLASH_ATTENTION:
        line(f"{name} fwd+bwd (assumed bwd rate)", [f"{r[f'{name}_fwdbwd_us']:.0f}" for r in rows])
    line("memory floor fwd (Q, K, V, O once at 4.8 TB/s)", [f"{r['memory_floor_fwd_us']:.1f}" for r in rows])
    cross = ", ".join(f"{k}: n = {_n_label(v) if v else '> 64k'}" for k, v in result["crossover_n"].items())
    lines += ["", f"Predicted crossover (smallest power-of-two n where Skyformer is faster): {cross}."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536],
                        choices=sorted(FLASH_ATTENTION["FA3"]), help="sequence lengths (n_q = n_k)")
    parser.add_argument("--m", type=int, default=Shape.m)
    parser.add_argument("--ns-iters", type=int, default=Shape.ns_iters)
    parser.add_argument("--solve-precision", default=Shape.solve_precision, choices=sorted(SOLVE_PRECISIONS),
                        help="how the m x m products of the solve run: tf32x3 = 3 TF32 MMAs per product")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = Shape(m=args.m, ns_iters=args.ns_iters, solve_precision=args.solve_precision)
    result = predict(args.n, shape)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
