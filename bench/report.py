"""Turning benchmark rows into the console table, JSON, CSV, a Markdown table and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

RESULT_FIELDS = [
    "suite", "method", "family", "mode", "batch", "heads", "n", "head_dim", "num_landmarks", "dtype",
    "status", "note", "time_ms", "times_ms", "peak_mib", "cuda_peak_mib", "est_time_ms",
    "sdpa_reference", "speedup_vs_sdpa", "speedup_estimated", "bandwidth_gbs",
]


def size_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _format_time(row: dict) -> str:
    if row["status"] == "ok":
        return f"{row['time_ms']:.2f}" if row["time_ms"] < 100 else f"{row['time_ms']:.0f}"
    return "-"


def _format_speedup(row: dict) -> str:
    value = row.get("speedup_vs_sdpa")
    if value is None:
        return "-"
    return ("~" if row.get("speedup_estimated") else "") + f"{value:.1f}x"


def _note(row: dict) -> str:
    if row["status"] == "ok":
        return row.get("note") or ""
    return f"{row['status']}" + (f" ({row['note']})" if row.get("note") else "")


def table_lines(rows: list[dict], with_bandwidth: bool) -> list[str]:
    """Fixed-width console lines, one block per suite."""
    header = ["method", "mode", "n", "ms", "peak MiB", "vs SDPA"] + (["GB/s"] if with_bandwidth else []) + ["note"]
    lines = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        body = []
        for r in (r for r in rows if r["suite"] == suite):
            cells = [r["method"], r["mode"], size_label(r["n"]), _format_time(r),
                     f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "-", _format_speedup(r)]
            if with_bandwidth:
                cells.append(f"{r['bandwidth_gbs']:.0f}" if r.get("bandwidth_gbs") else "-")
            cells.append(_note(r))
            body.append(cells)
        widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
        lines.append(f"== {suite}")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        lines.extend("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body)
        lines.append("")
    return lines


def markdown_table(rows: list[dict], with_bandwidth: bool) -> str:
    header = ["suite", "method", "n", "ms", "peak MiB", "vs SDPA"] + (["GB/s"] if with_bandwidth else []) + ["note"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["suite"], r["method"], size_label(r["n"]), _format_time(r),
                 f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "-", _format_speedup(r)]
        if with_bandwidth:
            cells.append(f"{r['bandwidth_gbs']:.0f}" if r.get("bandwidth_gbs") else "-")
        cells.append(_note(r))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = dict(r)
            flat["times_ms"] = ";".join(f"{t:.3f}" for t in r.get("times_ms") or [])
            writer.writerow(flat)


def _plot_setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_suite(rows: list[dict], suite: str, directory: Path, title: str) -> list[Path]:
    """time_vs_n_<suite>.png (log-log, speed-up vs SDPA annotated at each method's largest measured n) and
    memory_vs_n_<suite>.png. Estimated (skipped) points are drawn hollow, joined by a dotted line."""
    plt = _plot_setup()
    suite_rows = [r for r in rows if r["suite"] == suite]
    methods = list(dict.fromkeys(r["method"] for r in suite_rows))
    written = []
    for quantity, ylabel, stem in (("time_ms", "time per call (ms)", "time_vs_n"),
                                   ("peak_mib", "peak extra memory (MiB)", "memory_vs_n")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for index, method in enumerate(methods):
            colour = f"C{index % 10}"
            mine = [r for r in suite_rows if r["method"] == method]
            measured = [(r["n"], r[quantity]) for r in mine if r["status"] == "ok" and r.get(quantity)]
            if measured:
                ax.plot(*zip(*measured), marker="o", color=colour, label=method)
            if quantity == "time_ms":
                estimated = [(r["n"], r["est_time_ms"]) for r in mine if r["status"] != "ok" and r.get("est_time_ms")]
                if estimated:
                    chain = measured[-1:] + estimated
                    ax.plot(*zip(*chain), linestyle=":", color=colour)
                    ax.plot(*zip(*estimated), linestyle="none", marker="o", markerfacecolor="none", color=colour,
                            label=None if measured else f"{method} (est.)")
                annotated = [r for r in mine if r["status"] == "ok" and r.get("speedup_vs_sdpa")
                             and r["family"] != "sdpa"]
                if annotated:
                    last = annotated[-1]
                    ax.annotate(f"{_format_speedup(last)} vs SDPA", (last["n"], last["time_ms"]),
                                textcoords="offset points", xytext=(-6, 5), ha="right", fontsize=7, color=colour)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({r["n"] for r in suite_rows})
        ax.set_xticks(sizes, [size_label(n) for n in sizes])
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        if quantity == "time_ms" and any(r["status"] != "ok" and r.get("est_time_ms") for r in suite_rows):
            ax.text(0.99, 0.01, "hollow, dotted: predicted (skipped)", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=7, color="0.4")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / f"{stem}_{suite}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def finite_or_none(value):
    return value if value is None or math.isfinite(value) else None
