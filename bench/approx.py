"""Approximation report: how close Skyformer gets to exact Kernelized Attention (the paper's Figure 1).

``python -m bench.approx`` measures the relative spectral-norm error ||O~ - O||_2 / ||O||_2 per (batch, head)
output matrix (n x p), where O = kappa(Q, K) V is exact Kernelized Attention and O~ is skyformer_attention,

- against the number of landmarks m (16 ... 512) at n = 2048, and against n (256 ... 8k) at m = 128;
- for random (the paper) and strided landmarks, and for both inverses (Newton-Schulz, exact Cholesky);
- on two input families (below), averaged over seeds (mean, with the min..max spread over seeds);
- with Nystromformer (segment-mean landmarks on softmax attention, our own transcription of the method of
  Xiong et al. 2021) against exact softmax attention at the same m, for context.

Inputs (heads are independent draws; p = 64, default scale p^-1/2 in both attentions):
- "gaussian": q, k, v i.i.d. N(0, 1). The hard case for any low-rank method: |q - k|^2 concentrates around
  2p, so kappa(Q, K) is a noise-like matrix of nearly constant small entries with a flat spectrum.
- "structured": q and k drawn around 16 shared cluster centres in a random rank-8 subspace (centres
  N(0, 2^2) in the subspace, within-cluster spread 0.25, plus isotropic noise 0.1); v i.i.d. N(0, 1).
  Clustered, low-rank queries and keys are what trained attention layers produce; kappa(Q, K) is then close
  to a block matrix of rank ~16, which Nystrom landmarks can capture.

Everything runs in float64 so that what is measured is the approximation, not rounding. The exact
attentions are computed here, independently of the library, in query chunks (never all n x n at once).
Results: bench/results/approx/approx.{json,csv,md,png} (--quick: bench/results/_scratch/approx unless --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from skyformer_ext import skyformer_attention

from .progress import progress

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
VARIANTS = [(landmarks, inverse) for landmarks in ("random", "strided") for inverse in ("newton_schulz", "cholesky")]
NYSTROMFORMER = "nystromformer (vs softmax)"
INPUTS = ("gaussian", "structured")
QUERY_CHUNK = 1024


# ---- inputs ----------------------------------------------------------------------------------------------

def gaussian_inputs(heads: int, n: int, p: int, generator: torch.Generator):
    return tuple(torch.randn(1, heads, n, p, generator=generator, dtype=torch.float64) for _ in range(3))


def structured_inputs(heads: int, n: int, p: int, generator: torch.Generator, clusters: int = 16, rank: int = 8,
                      centre_std: float = 2.0, cluster_std: float = 0.25, noise_std: float = 0.1):
    """Queries and keys around shared cluster centres in a random rank-``rank`` subspace, per head."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    basis = torch.linalg.qr(randn(heads, p, rank)).Q                      # (heads, p, rank), orthonormal
    centres = centre_std * randn(heads, clusters, rank)

    def tokens():
        assignment = torch.randint(clusters, (heads, n), generator=generator)
        latent = centres.gather(1, assignment[..., None].expand(heads, n, rank)) + cluster_std * randn(heads, n, rank)
        return (latent @ basis.transpose(1, 2) + noise_std * randn(heads, n, p))[None]

    return tokens(), tokens(), randn(1, heads, n, p)


def make_inputs(kind: str, heads: int, n: int, p: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (gaussian_inputs if kind == "gaussian" else structured_inputs)(heads, n, p, generator)


# ---- exact attentions and Nystromformer ------------------------------------------------------------------

def exact_kernelized(q, k, v) -> torch.Tensor:
    """kappa(Q, K) V with kappa(a, b) = exp(-scale |a - b|^2 / 2), scale = p^-1/2, in query chunks."""
    scale = q.shape[-1] ** -0.5
    batch, heads, n_q, p = q.shape
    keys = k.reshape(batch * heads, -1, p)
    key_bias = (-0.5 * scale) * (keys * keys).sum(-1)[:, None, :]
    chunks = []
    for start in range(0, n_q, QUERY_CHUNK):
        chunk = q[:, :, start:start + QUERY_CHUNK].reshape(batch * heads, -1, p)
        exponent = torch.baddbmm(key_bias, chunk, keys.transpose(1, 2), alpha=scale)
        exponent.sub_((0.5 * scale) * (chunk * chunk).sum(-1, keepdim=True))
        chunks.append((exponent.exp_() @ v.reshape(batch * heads, -1, v.shape[-1])).reshape(batch, heads, -1, v.shape[-1]))
    return torch.cat(chunks, dim=2)


def exact_softmax(q, k, v) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    chunks = [torch.softmax(scale * q[:, :, s:s + QUERY_CHUNK] @ k.transpose(-1, -2), dim=-1) @ v
              for s in range(0, q.shape[2], QUERY_CHUNK)]
    return torch.cat(chunks, dim=2)


def segment_means(x: torch.Tensor, segments: int) -> torch.Tensor:
    """Means of ``segments`` contiguous, nearly equal runs of rows: (b, h, n, p) -> (b, h, segments, p)."""
    n = x.shape[2]
    segment_of_row = torch.arange(n) * segments // n
    sums = torch.zeros(*x.shape[:2], segments, x.shape[3], dtype=x.dtype).index_add_(2, segment_of_row, x)
    counts = torch.bincount(segment_of_row, minlength=segments).to(x.dtype)
    return sums / counts[:, None]


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Nystromformer's Moore-Penrose iteration: Z0 = A^T / (max row-sum * max col-sum), then
    Z <- Z (13I - AZ(15I - AZ(7I - AZ))) / 4."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    magnitude = matrix.abs()
    norm_product = magnitude.sum(-1).amax(-1) * magnitude.sum(-2).amax(-1)
    approx = matrix.transpose(-1, -2) / norm_product[..., None, None]
    for _ in range(iterations):
        product = matrix @ approx
        approx = 0.25 * approx @ (13 * eye - product @ (15 * eye - product @ (7 * eye - product)))
    return approx


def nystromformer_attention(q, k, v, num_landmarks: int, pinv_iterations: int = 6) -> torch.Tensor:
    """softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V with segment-mean landmarks Q~, K~."""
    scale = q.shape[-1] ** -0.5
    q_landmarks, k_landmarks = segment_means(q, num_landmarks), segment_means(k, num_landmarks)
    left = torch.softmax(scale * q @ k_landmarks.transpose(-1, -2), dim=-1)
    middle = torch.softmax(scale * q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1)
    right = torch.softmax(scale * q_landmarks @ k.transpose(-1, -2), dim=-1)
    return left @ (iterative_pinv(middle, pinv_iterations) @ (right @ v))


def relative_spectral_errors(approx: torch.Tensor, exact: torch.Tensor) -> list[float]:
    """||approx - exact||_2 / ||exact||_2 per (batch, head) n x p matrix, via the p x p Gram matrices."""
    def spectral(x):
        return torch.linalg.eigvalsh(x.transpose(-1, -2) @ x)[..., -1].clamp_min(0).sqrt()

    return (spectral(approx - exact) / spectral(exact)).flatten().tolist()


# ---- the experiment --------------------------------------------------------------------------------------

def settings(quick: bool) -> dict:
    if quick:
        return {"ms": [8, 32, 128], "n_for_m": 256, "ns": [128, 256], "m_for_n": 32, "seeds": 2, "heads": 1,
                "p": 32}
    return {"ms": [16, 32, 64, 128, 256, 512], "n_for_m": 2048, "ns": [256, 512, 1024, 2048, 4096, 8192],
            "m_for_n": 128, "seeds": 3, "heads": 1, "p": 64}


def run(config: dict, show_progress: bool = True) -> list[dict]:
    """Rows {input, sweep ("m" or "n"), method, landmarks, inverse, n, m, errors (per seed: mean over heads)}."""
    points = ([("m", config["n_for_m"], m) for m in config["ms"]]
              + [("n", n, config["m_for_n"]) for n in config["ns"]])
    bar = progress(len(INPUTS) * len(points) * config["seeds"], "approx", show_progress)
    errors: dict[tuple, list[float]] = {}
    exact_cache: dict[tuple, tuple] = {}  # only the current input set, to bound memory
    try:
        for kind in INPUTS:
            for seed in range(config["seeds"]):
                for sweep, n, m in points:
                    bar.set_postfix_str(f"{kind} seed={seed} n={n} m={m}")
                    key = (kind, n, seed)
                    if key not in exact_cache:  # the m sweep reuses one input set (and its truth) for every m
                        q, k, v = make_inputs(kind, config["heads"], n, config["p"], 1000 * seed + n)
                        exact_cache = {key: (q, k, v, exact_kernelized(q, k, v), exact_softmax(q, k, v))}
                    q, k, v, kernel_truth, softmax_truth = exact_cache[key]
                    for landmarks, inverse in VARIANTS:
                        generator = torch.Generator().manual_seed(seed)
                        out = skyformer_attention(q, k, v, num_landmarks=m, landmarks=landmarks, inverse=inverse,
                                                  generator=generator)
                        errors.setdefault((kind, sweep, "skyformer", landmarks, inverse, n, m), []).append(
                            statistics.fmean(relative_spectral_errors(out, kernel_truth)))
                    if m <= n:
                        errors.setdefault((kind, sweep, NYSTROMFORMER, "segment_means", "iterative_pinv", n, m),
                                          []).append(statistics.fmean(relative_spectral_errors(
                                              nystromformer_attention(q, k, v, m), softmax_truth)))
                    bar.update(1)
    finally:
        bar.close()
    rows = []
    for (kind, sweep, method, landmarks, inverse, n, m), values in errors.items():
        rows.append({"input": kind, "sweep": sweep, "method": method, "landmarks": landmarks, "inverse": inverse,
                     "n": n, "m": m, "mean": statistics.fmean(values), "min": min(values), "max": max(values),
                     "std": statistics.pstdev(values), "errors": values})
    return rows


def label(row: dict) -> str:
    return row["method"] if row["method"] != "skyformer" else f"skyformer {row['landmarks']} {row['inverse']}"


def markdown(rows: list[dict], config: dict) -> str:
    lines = [f"Relative spectral-norm error, mean over {config['seeds']} seeds (min..max), "
             f"{config['heads']} head(s) per seed, p={config['p']}, float64.", ""]
    for kind in INPUTS:
        for sweep, fixed in (("m", f"n={config['n_for_m']}"), ("n", f"m={config['m_for_n']}")):
            chosen = [r for r in rows if r["input"] == kind and r["sweep"] == sweep]
            axis = sorted({r[sweep] for r in chosen})
            methods = list(dict.fromkeys(label(r) for r in chosen))
            lines += [f"**{kind}** inputs, error vs {sweep} ({fixed})", "",
                      f"| method | " + " | ".join(f"{sweep}={x}" for x in axis) + " |",
                      "|---|" + "---|" * len(axis)]
            for method in methods:
                cells = []
                for x in axis:
                    r = next((r for r in chosen if label(r) == method and r[sweep] == x), None)
                    cells.append("-" if r is None else f"{r['mean']:.3g} ({r['min']:.2g}..{r['max']:.2g})")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), dpi=90, sharey="row")
    for i, kind in enumerate(INPUTS):
        for j, (sweep, fixed) in enumerate((("m", f"n={config['n_for_m']}"), ("n", f"m={config['m_for_n']}"))):
            ax = axes[i][j]
            chosen = [r for r in rows if r["input"] == kind and r["sweep"] == sweep]
            for index, method in enumerate(dict.fromkeys(label(r) for r in chosen)):
                mine = sorted((r for r in chosen if label(r) == method), key=lambda r: r[sweep])
                xs = [r[sweep] for r in mine]
                style = "--" if method == NYSTROMFORMER else "-"
                ax.plot(xs, [r["mean"] for r in mine], style, marker="o", markersize=3, color=f"C{index}",
                        label=method)
                ax.fill_between(xs, [r["min"] for r in mine], [r["max"] for r in mine], color=f"C{index}",
                                alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{kind} inputs, vs {sweep} ({fixed})", fontsize=9)
            ax.set_xlabel(sweep)
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].set_ylabel("relative spectral error")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Skyformer vs exact kernelized attention; Nystromformer vs exact softmax "
                 f"(mean over {config['seeds']} seeds, band = min..max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.approx", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used in CI)")
    parser.add_argument("--seeds", type=int, help="seeds to average over (default 3)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/approx)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, 0 = leave unchanged (default 1: nothing here is timed, and one thread per process "
                             "avoids OpenMP oversubscription, which slows small ops ~3x on a shared machine)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = settings(args.quick)
    if args.seeds is not None:
        config["seeds"] = args.seeds
    out = args.out or (RESULTS_ROOT / "_scratch" / "approx" if args.quick else RESULTS_ROOT / "approx")
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    if args.threads:
        # Set once and never restored: toggling MKL's thread count back and forth inside one process
        # breaks later torch.linalg.solve calls (torch 2.14.1, m=257: "Pivots given to lu_solve...").
        torch.set_num_threads(args.threads)
    rows = run(config, not args.no_progress)
    meta = {"command": ("python -m bench.approx " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
            "started_utc": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - start, 1),
            "torch": torch.__version__, "threads": args.threads, "settings": config}
    if any(not math.isfinite(v) for r in rows for v in r["errors"]):
        raise RuntimeError("non-finite approximation error; see the rows above")
    (out / "approx.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1, allow_nan=False) + "\n")
    with (out / "approx.csv").open("w") as handle:
        handle.write("input,sweep,method,landmarks,inverse,n,m,mean,min,max,std\n")
        for r in rows:
            handle.write(",".join(str(r[k]) for k in ("input", "sweep", "method", "landmarks", "inverse", "n", "m"))
                         + "," + ",".join(f"{r[k]:.6g}" for k in ("mean", "min", "max", "std")) + "\n")
    table = markdown(rows, config)
    (out / "approx.md").write_text(f"Command: `{meta['command']}` ({meta['started_utc']}, {meta['wall_s']} s)\n\n"
                                   + table)
    if not args.no_plots:
        plot(rows, config, out / "approx.png")
    print(table)
    print(f"wrote {out}/approx.json, .csv, .md" + ("" if args.no_plots else ", .png") + f" in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
