"""Packed (varlen) vs padded Skyformer on a long-tailed batch: time and peak memory for the same tokens.

``python -m bench.varlen`` measures what flash-attn's packed layout (``skyformer_attention_varlen``) saves
over the padded batch (``skyformer_attention`` with a key mask) when the sequence lengths are long-tailed:

- **Lengths**: per configuration, ``num_seqs - 1`` lengths drawn log-uniform on [min_len, max_len]
  (round(exp(U(ln min_len, ln max_len))), ``torch.Generator`` seed 0) plus one sequence pinned at max_len,
  so the padded batch is exactly num_seqs x max_len rows: the batch a long-tailed stream produces once its
  longest sequence arrives. Configurations: "long" = 12 sequences, 64..16384; "medium" = 16 sequences,
  64..4096. The total tokens, the padded rows and their ratio (the work padding adds) are reported.
- **Problem**: self-attention, heads 4, head dim 64, m = 128 random landmarks (drawn inside every timed call,
  as users run it, from a seeded generator), float32, backend="torch", one torch thread. q, k, v ~ N(0, 1)
  are packed (total, heads, 64); the padded tensors (num_seqs, heads, max_len, 64) are built from the same
  rows with zeros in the padding, and the mask (num_seqs, max_len) marks the valid rows (in self-attention
  it marks the valid queries too). The output gradient dO of the padded call is the packed one scattered the
  same way (zeros on padded rows).
- **Timing**: forward (``torch.no_grad()``) and forward+backward (``torch.autograd.grad`` of the output
  over q, k, v against dO), wall clock. Per mode a warm-up call of each layout (under ``PeakMemory``, never
  timed), then 7 rounds (``--rounds``) in which the packed and the padded call alternate (packed first in even
  rounds, padded first in odd ones, so load drift on a shared machine hits both alike); median per layout
  and the ratio padded / packed of the medians.
- **Peak memory**: ``skyformer_ext._memory.PeakMemory`` over the warm-up call (the peak of the live bytes
  of every tensor allocated inside the call, output, saved tensors and gradients included, inputs and dO
  excluded); ratio padded / packed.
- **Correctness**: one forward+backward of each layout with the SAME landmarks: packed ``landmark_indices``
  (num_seqs, m) are rows of each sequence's own [q_s; k_s] (a seeded ``sample_landmarks`` per sequence),
  converted for the padded call to rows of [q; k] with n_q = max_len (key rows offset by max_len - len_s).
  Reported: the max abs difference of the outputs on the valid rows (and of dq, dk, dv on the valid rows),
  next to the largest |output| (|gradient|); passes when every difference is at most 1e-4 of that scale.

``--quick`` runs tiny sizes (seconds; CI: tests/test_bench_varlen.py) and writes
bench/results/_scratch/varlen unless --out. Full results: bench/results/varlen/varlen.{json,csv,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from skyformer_ext import sample_landmarks, skyformer_attention, skyformer_attention_varlen
from skyformer_ext._memory import PeakMemory

from .progress import progress
from .throughput import cpu_model

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
MIB = float(1 << 20)
MODES = ("fwd", "fwd+bwd")
LAYOUTS = ("packed", "padded")
TOLERANCE = 1e-4  # max abs difference / largest magnitude, float32
DISTRIBUTION = ("log-uniform on [min_len, max_len] (round(exp(U(ln min_len, ln max_len))), torch.Generator seed "
                "{seed}), num_seqs - 1 draws plus one sequence pinned at max_len")


def settings(quick: bool) -> dict:
    if quick:
        return {"configs": [{"name": "quick", "num_seqs": 5, "min_len": 16, "max_len": 256}],
                "heads": 2, "p": 16, "m": 16, "rounds": 2, "seed": 0}
    return {"configs": [{"name": "long", "num_seqs": 12, "min_len": 64, "max_len": 16384},
                        {"name": "medium", "num_seqs": 16, "min_len": 64, "max_len": 4096}],
            "heads": 4, "p": 64, "m": 128, "rounds": 7, "seed": 0}


# ---- inputs ----------------------------------------------------------------------------------------------

def draw_lengths(num_seqs: int, min_len: int, max_len: int, seed: int) -> list[int]:
    """num_seqs - 1 log-uniform lengths on [min_len, max_len] and one of max_len (last)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(num_seqs - 1, generator=generator, dtype=torch.float64)
    logs = math.log(min_len) + u * (math.log(max_len) - math.log(min_len))
    lengths = logs.exp().round().long().clamp(min_len, max_len).tolist()
    return lengths + [max_len]


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)


def pad_index(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq, pos) of every packed row, and the (num_seqs, max_len) mask of valid rows."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    starts = cu_seqlens(lengths)[:-1].long()
    pos = torch.arange(seq.shape[0]) - starts[seq]
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return seq, pos, mask


def to_padded(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, num_seqs: int, max_len: int) -> torch.Tensor:
    """Packed (total, heads, d) -> padded (num_seqs, heads, max_len, d), zeros in the padding."""
    out = x.new_zeros(num_seqs, max_len, *x.shape[1:])
    out[seq, pos] = x
    return out.transpose(1, 2).contiguous()


def from_padded(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Padded (num_seqs, heads, max_len, d) -> its valid rows, packed (total, heads, d)."""
    return x.transpose(1, 2)[seq, pos]


def padded_landmark_indices(packed: torch.Tensor, lengths: list[int], max_len: int) -> torch.Tensor:
    """Rows of each sequence's own [q_s; k_s] (0..len_s - 1 queries, then keys) -> rows of the padded
    [q; k] with n_q = max_len (a key row r >= len_s becomes max_len + r - len_s)."""
    length = torch.tensor(lengths)[:, None]
    return torch.where(packed < length, packed, packed - length + max_len)


def make_problem(config: dict, heads: int, p: int, seed: int) -> dict:
    lengths = draw_lengths(config["num_seqs"], config["min_len"], config["max_len"], seed)
    num_seqs, max_len, total = len(lengths), max(lengths), sum(lengths)
    generator = torch.Generator().manual_seed(seed + 1)
    q, k, v, grad = (torch.randn(total, heads, p, generator=generator) for _ in range(4))
    seq, pos, mask = pad_index(lengths)
    padded = [to_padded(t, seq, pos, num_seqs, max_len) for t in (q, k, v, grad)]
    return {"lengths": lengths, "num_seqs": num_seqs, "max_len": max_len, "total": total,
            "cu": cu_seqlens(lengths), "seq": seq, "pos": pos, "mask": mask,
            "packed": (q, k, v), "packed_grad": grad, "padded": tuple(padded[:3]), "padded_grad": padded[3]}


# ---- the calls -------------------------------------------------------------------------------------------

def call(problem: dict, layout: str, m: int, backward: bool, generator: torch.Generator | None = None,
         landmark_indices: torch.Tensor | None = None):
    """One call of a layout: the output (forward) or (output, dq, dk, dv) (forward+backward)."""
    inputs = problem[layout]
    if backward:
        inputs = tuple(t.detach().requires_grad_() for t in inputs)
    options = {"num_landmarks": m, "generator": generator, "landmark_indices": landmark_indices, "backend": "torch"}

    def forward():
        if layout == "packed":
            cu, longest = problem["cu"], problem["max_len"]
            return skyformer_attention_varlen(*inputs, cu, cu, longest, longest, **options)
        return skyformer_attention(*inputs, attn_mask=problem["mask"], **options)

    if not backward:
        with torch.no_grad():
            return forward()
    out = forward()
    return (out.detach(), *torch.autograd.grad(out, inputs, problem[f"{layout}_grad"]))


def correctness(problem: dict, m: int, seed: int) -> dict:
    """Packed vs padded forward+backward with the same landmarks, compared on the valid rows."""
    generator = torch.Generator().manual_seed(seed + 2)
    packed_idx = torch.cat([sample_landmarks(1, n, n, m, generator=generator) for n in problem["lengths"]])
    padded_idx = padded_landmark_indices(packed_idx, problem["lengths"], problem["max_len"])
    packed = call(problem, "packed", m, True, landmark_indices=packed_idx)
    padded = call(problem, "padded", m, True, landmark_indices=padded_idx)
    result = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), packed, padded):
        b = from_padded(b, problem["seq"], problem["pos"])
        diff = (a - b).abs().max().item()
        scale = max(a.abs().max().item(), b.abs().max().item())
        result[name] = {"max_abs_diff": diff, "max_abs": scale, "rel": diff / scale if scale else diff}
    # Padded key rows take no part: their gradients must be exactly zero.
    padding = ~problem["mask"]
    result["padded_key_grad_max_abs"] = max(padded[i].transpose(1, 2)[padding].abs().max().item()
                                            if padding.any() else 0.0 for i in (2, 3))
    result["tolerance_rel"] = TOLERANCE
    result["pass"] = (all(result[name]["rel"] <= TOLERANCE for name in ("out", "dq", "dk", "dv"))
                      and result["padded_key_grad_max_abs"] == 0.0)
    return result


def measure(problem: dict, m: int, rounds: int, seed: int, bar) -> dict:
    """Per mode: PeakMemory warm-up of each layout, then alternating timed rounds."""
    generator = torch.Generator().manual_seed(seed + 3)
    results = {}
    for mode in MODES:
        backward = mode == "fwd+bwd"
        peak = {}
        for layout in LAYOUTS:
            bar.set_postfix_str(f"{mode} {layout}: memory (warm-up)")
            with PeakMemory() as tracker:
                outputs = call(problem, layout, m, backward, generator)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            if not all(bool(t.isfinite().all()) for t in outputs):
                raise FloatingPointError(f"non-finite output or gradient ({mode}, {layout})")
            del outputs
            peak[layout] = tracker.peak_bytes / MIB
            bar.update(1)
        times = {layout: [] for layout in LAYOUTS}
        for round_index in range(rounds):
            for layout in (LAYOUTS if round_index % 2 == 0 else LAYOUTS[::-1]):
                bar.set_postfix_str(f"{mode} round {round_index + 1}/{rounds}: {layout}")
                start = time.perf_counter()
                call(problem, layout, m, backward, generator)
                times[layout].append(1e3 * (time.perf_counter() - start))
                bar.update(1)
        medians = {layout: statistics.median(times[layout]) for layout in LAYOUTS}
        results[mode] = {"packed_ms": medians["packed"], "padded_ms": medians["padded"],
                         "time_ratio": medians["padded"] / medians["packed"],
                         "packed_peak_mib": peak["packed"], "padded_peak_mib": peak["padded"],
                         "memory_ratio": peak["padded"] / peak["packed"],
                         "packed_times_ms": times["packed"], "padded_times_ms": times["padded"]}
    return results


def warm_up() -> None:
    """One-time costs of the process (PeakMemory's set-up, the first custom-op call importing torch._dynamo),
    paid before anything is measured."""
    import torch._dynamo  # noqa: F401

    with PeakMemory():
        torch.ones(2) + 1
    tiny = make_problem({"num_seqs": 2, "min_len": 4, "max_len": 8}, 1, 8, 0)
    for layout in LAYOUTS:
        call(tiny, layout, 4, True)


def run(config: dict, show_progress: bool) -> list[dict]:
    steps = len(config["configs"]) * (1 + len(MODES) * (2 + 2 * config["rounds"]))
    bar = progress(steps, "varlen", show_progress)
    rows = []
    try:
        warm_up()
        for c in config["configs"]:
            bar.set_postfix_str(f"{c['name']}: inputs")
            problem = make_problem(c, config["heads"], config["p"], config["seed"])
            bar.set_postfix_str(f"{c['name']}: correctness")
            check = correctness(problem, config["m"], config["seed"])
            bar.update(1)
            modes = measure(problem, config["m"], config["rounds"], config["seed"], bar)
            padded_rows = problem["num_seqs"] * problem["max_len"]
            rows.append({"config": c["name"], "num_seqs": problem["num_seqs"], "min_len": c["min_len"],
                         "max_len": c["max_len"], "lengths": problem["lengths"], "total_tokens": problem["total"],
                         "padded_rows": padded_rows, "padding_ratio": padded_rows / problem["total"],
                         "modes": modes, "correctness": check})
            del problem
    finally:
        bar.close()
    return rows


# ---- reporting -------------------------------------------------------------------------------------------

CSV_FIELDS = ("config", "mode", "num_seqs", "total_tokens", "padded_rows", "padding_ratio", "packed_ms",
              "padded_ms", "time_ratio", "packed_peak_mib", "padded_peak_mib", "memory_ratio")


def csv_rows(rows: list[dict]) -> list[dict]:
    return [{"config": r["config"], "mode": mode, "num_seqs": r["num_seqs"], "total_tokens": r["total_tokens"],
             "padded_rows": r["padded_rows"], "padding_ratio": r["padding_ratio"],
             **{f: r["modes"][mode][f] for f in CSV_FIELDS[6:]}} for r in rows for mode in MODES]


def markdown(meta: dict, rows: list[dict]) -> str:
    s = meta["settings"]
    lines = [f"Command: `{meta['command']}` ({meta['started_utc']}, {meta['wall_s']} s, {meta['cpu_model']}, "
             f"{meta['cpu_count']} cores, {meta['torch_threads']} torch thread(s), torch {meta['torch']}; load average "
             f"before {meta['load_average_before']}, after {meta['load_average_after']})", "",
             f"Self-attention, heads {s['heads']}, head dim {s['p']}, m = {s['m']} random landmarks (drawn in the "
             f"call), float32, backend=torch. Lengths: {meta['distribution']}. Packed = `skyformer_attention_varlen`, "
             f"padded = `skyformer_attention` with the key mask, on the same tokens. Time: median of "
             f"{s['rounds']} alternating rounds after a warm-up; memory: PeakMemory over the warm-up call (extra "
             f"bytes allocated inside the call, inputs excluded).", "",
             "| config | mode | sequences | tokens | padded rows (ratio) | packed | padded | time padded / packed "
             "| packed peak | padded peak | memory padded / packed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in csv_rows(rows):
        lines.append(f"| {r['config']} | {r['mode']} | {r['num_seqs']} | {r['total_tokens']} | {r['padded_rows']} "
                     f"({r['padding_ratio']:.2f}x) | {r['packed_ms']:.1f} ms | {r['padded_ms']:.1f} ms | "
                     f"**{r['time_ratio']:.2f}** | {r['packed_peak_mib']:.1f} MiB | {r['padded_peak_mib']:.1f} MiB | "
                     f"**{r['memory_ratio']:.2f}** |")
    lines += ["", "**Lengths** (in order; the last is pinned at max_len)", ""]
    for r in rows:
        lines.append(f"- {r['config']}: {r['lengths']}")
    lines += ["", f"**Correctness** (same landmarks, forward+backward, valid rows; pass = every max abs difference "
              f"<= {TOLERANCE:g} x the largest magnitude, and zero gradients on padded key rows)", "",
              "| config | out: max abs diff (max abs) | dq | dk | dv | padded key grads | result |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["correctness"]
        cells = [f"{c[n]['max_abs_diff']:.2e} ({c[n]['max_abs']:.3g})" for n in ("out", "dq", "dk", "dv")]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {c['padded_key_grad_max_abs']:.1g} | "
                     f"{'pass' if c['pass'] else 'FAIL'} |")
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.3 * len(rows)), dpi=90, squeeze=False)
    colors = {"packed": "C0", "padded": "C1"}
    width = 0.38
    for ax_row, r in zip(axes, rows):
        hist, t_ax, m_ax = ax_row
        edges = torch.logspace(math.log10(r["min_len"]), math.log10(r["max_len"]), 13).tolist()
        hist.hist(r["lengths"], bins=edges, color="0.5", edgecolor="k")
        hist.set_xscale("log")
        powers = [2 ** e for e in range(int(math.log2(r["min_len"])), int(math.log2(r["max_len"])) + 1)]
        ticks = powers[::math.ceil(len(powers) / 5)]
        hist.set_xticks(ticks, [str(x) for x in ticks])
        hist.minorticks_off()
        hist.yaxis.get_major_locator().set_params(integer=True)
        hist.set_xlabel("sequence length")
        hist.set_ylabel("sequences")
        hist.set_title(f"{r['config']}: {r['num_seqs']} sequences, {r['total_tokens']} tokens, padded "
                       f"{r['padded_rows']} rows ({r['padding_ratio']:.2f}x)", fontsize=8)
        for ax, field, unit, ratio in ((t_ax, "ms", "time (ms)", "time_ratio"),
                                       (m_ax, "peak_mib", "peak extra memory (MiB)", "memory_ratio")):
            for i, layout in enumerate(LAYOUTS):
                values = [r["modes"][mode][f"{layout}_{field}"] for mode in MODES]
                xs = [j + (i - 0.5) * width for j in range(len(MODES))]
                ax.bar(xs, values, width, color=colors[layout], label=layout)
            for j, mode in enumerate(MODES):
                top = max(r["modes"][mode][f"{layout}_{field}"] for layout in LAYOUTS)
                ax.annotate(f"{r['modes'][mode][ratio]:.2f}x", (j, top), textcoords="offset points", xytext=(0, 2),
                            ha="center", fontsize=8)
            ax.set_xticks(range(len(MODES)), MODES)
            ax.set_ylabel(unit)
            ax.set_title(f"{r['config']}: {unit.split(' (')[0]}, padded / packed annotated", fontsize=8)
            ax.margins(y=0.15)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.varlen", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used in CI)")
    parser.add_argument("--rounds", type=int, help="timed rounds per mode (default 7; 2 with --quick)")
    parser.add_argument("--seed", type=int, help="seed of the lengths, inputs and landmarks (default 0)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/varlen)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, 0 = leave unchanged (default 1)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = settings(args.quick)
    if args.rounds is not None:
        config["rounds"] = args.rounds
    if args.seed is not None:
        config["seed"] = args.seed
    out = args.out or (RESULTS_ROOT / "_scratch" / "varlen" if args.quick else RESULTS_ROOT / "varlen")
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.threads:
        torch.set_num_threads(args.threads)  # once, never restored (see bench/approx.py)

    rows = run(config, not args.no_progress)
    command = ("python -m bench.varlen " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    meta = {"command": command, "started_utc": started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average_before": None if load_before is None else [round(x, 2) for x in load_before],
            "load_average_after": None if load_before is None else [round(x, 2) for x in os.getloadavg()],
            "settings": config, "distribution": DISTRIBUTION.format(seed=config["seed"]),
            "timing": "wall clock, float32, backend=torch, landmarks drawn inside the call; packed and padded "
                      "alternate per round (order flipped every round) after a warm-up; median per layout",
            "memory": "skyformer_ext._memory.PeakMemory over the warm-up call: peak of live bytes allocated inside "
                      "the call (output, saved tensors, gradients), inputs and dO excluded"}
    payload = {"meta": meta, "results": rows}
    (out / "varlen.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    with (out / "varlen.csv").open("w") as handle:
        handle.write(",".join(CSV_FIELDS) + "\n")
        for r in csv_rows(rows):
            handle.write(",".join(f"{r[f]:.6g}" if isinstance(r[f], float) else str(r[f]) for f in CSV_FIELDS) + "\n")
    table = markdown(meta, rows)
    (out / "varlen.md").write_text(table)
    if not args.no_plots:
        plot(rows, out / "varlen.png",
             f"Skyformer packed (varlen) vs padded+mask, same tokens: heads {config['heads']}, p {config['p']}, "
             f"m {config['m']}, float32, backend=torch, {meta['cpu_model']}, {meta['torch_threads']} thread")
    print(table)
    print(f"wrote {out}/varlen.json, .csv, .md" + ("" if args.no_plots else ", .png") + f" in {meta['wall_s']} s")
    failed = [r["config"] for r in rows if not r["correctness"]["pass"]]
    if failed:
        print(f"correctness check FAILED for {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
