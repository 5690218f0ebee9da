"""Train the LRA ListOps model with softmax, kernelized or Skyformer attention and compare them over time.

    python -m examples.listops.train --attention skyformer          # one kernel
    python -m examples.listops.train --attention all --plot         # the three, then the PNG
    python -m examples.listops.train --attention skyformer --resume # continue from its checkpoint

The data are generated (examples/listops/data.py), deterministic in --seed. Every kernel trains for the
same --time-budget seconds; validation runs after every --eval-interval seconds of training and its time is
not counted as training time. Each kernel keeps a checkpoint in
--checkpoint-dir (model, optimizer, RNG state, step, history) and its curve in
<results-dir>/listops_curves.json; --plot draws validation accuracy against training time for every
kernel in that file (the paper's Figure 2 question) into <results-dir>/listops_val_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from skyformer_ext.nn import ATTENTIONS

from . import data
from .model import ListOpsClassifier

HERE = Path(__file__).resolve().parent
CURVES_FILE = "listops_curves.json"
PLOT_FILE = "listops_val_accuracy.png"
# Settings that must match for a checkpoint to be resumed.
MODEL_AND_DATA_KEYS = ("seed", "train_size", "val_size", "min_length", "max_length", "max_depth", "max_args",
                       "leaf_probability", "num_landmarks", "landmark_refine", "batch_size", "lr", "weight_decay",
                       "dropout")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", nargs="+", default=["skyformer"], choices=ATTENTIONS + ("all",),
                        help="kernel(s) to train, in order; 'all' = softmax kernelized skyformer")
    parser.add_argument("--time-budget", type=float, default=120.0,
                        help="training seconds per kernel (validation excluded); the comparison is at equal time")
    parser.add_argument("--steps", type=int, default=None, help="optional cap on optimizer steps per kernel")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--train-size", type=int, default=4800)
    parser.add_argument("--val-size", type=int, default=256)
    parser.add_argument("--min-length", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--max-args", type=int, default=10)
    parser.add_argument("--leaf-probability", type=float, default=0.2)
    parser.add_argument("--num-landmarks", type=int, default=32,
                        help="m for skyformer (the paper: 128 for lengths up to 2000; see README)")
    parser.add_argument("--landmark-refine", type=int, default=0,
                        help="Lloyd steps on the landmarks for skyformer (0: the paper's landmarks)")
    parser.add_argument("--eval-interval", type=float, default=20.0,
                        help="validate after every this many seconds of training (0: after every step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 1 by default because on a busy 2-core machine two spinning "
                             "OpenMP threads run several times slower than one (0: torch's default)")
    parser.add_argument("--checkpoint-dir", type=Path, default=HERE / "checkpoints")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--resume", action="store_true", help="continue each kernel from its checkpoint")
    parser.add_argument("--plot", action="store_true", help="write the validation-accuracy-vs-time PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    args = parser.parse_args(argv)
    if "all" in args.attention:
        if args.attention != ["all"]:
            parser.error("--attention all cannot be combined with other choices")
        args.attention = list(ATTENTIONS[::-1])
    for name in ("batch_size", "train_size", "val_size") + (("steps",) if args.steps is not None else ()):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.time_budget > 0 or args.eval_interval < 0:
        parser.error("--time-budget must be > 0 and --eval-interval >= 0")
    return args


def make_datasets(args):
    config = data.ListOpsConfig(min_length=args.min_length, max_length=args.max_length, max_depth=args.max_depth,
                                max_args=args.max_args, leaf_probability=args.leaf_probability)
    train = data.encode(data.generate(args.train_size, args.seed, config))
    val = data.encode(data.generate(args.val_size, args.seed + 1, config))
    return train, val


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> torch.Tensor:
    """Rows of the step-th batch: consecutive slices of one seeded permutation per epoch, so that a resumed
    run sees exactly the batches an uninterrupted one would."""
    start = step * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), num_examples)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows.extend(order[offset:offset + batch_size - len(rows)].tolist())
    return torch.tensor(rows)


def trimmed(ids: torch.Tensor) -> torch.Tensor:
    """Drops the columns that are padding in every row of the batch."""
    width = int((ids != data.PAD_ID).sum(1).max())
    return ids[:, :width]


@torch.no_grad()
def evaluate(model, ids, labels, batch_size) -> dict:
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        batch = trimmed(ids[start:start + batch_size])
        logits = model(batch)
        target = labels[start:start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(-1) == target).sum())
    model.train()
    return {"val_loss": total_loss / len(labels), "val_accuracy": correct / len(labels)}


def checkpoint_path(args, attention: str) -> Path:
    return args.checkpoint_dir / f"listops_{attention}.pt"


def run_config(args) -> dict:
    return {key: getattr(args, key) for key in MODEL_AND_DATA_KEYS}


def train_one(args, attention: str, train, val, log) -> dict:
    """Trains one kernel for args.time_budget seconds of training (at most args.steps steps), from its
    checkpoint with --resume; returns its run record."""
    (train_ids, train_labels), (val_ids, val_labels) = train, val
    torch.manual_seed(args.seed)
    model = ListOpsClassifier(len(data.VOCAB), data.NUM_CLASSES, args.max_length, pad_id=data.PAD_ID,
                              attention=attention, num_landmarks=args.num_landmarks,
                              landmark_refine=args.landmark_refine, dropout=args.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, train_time, history = 0, 0.0, []
    path = checkpoint_path(args, attention)
    if args.resume and path.exists():
        state = torch.load(path, weights_only=True)
        if state["config"] != run_config(args):
            raise SystemExit(f"{path} was trained with a different configuration: {state['config']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, train_time, history = state["step"], state["train_time_s"], state["history"]
        log(f"[{attention}] resumed from {path} at step {step} ({train_time:.1f} s trained)")

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                    "step": step, "train_time_s": train_time, "history": history, "config": run_config(args),
                    "attention": attention}, path)

    def validate(train_loss, train_accuracy):
        history.append({"step": step, "train_time_s": round(train_time, 3), "train_loss": train_loss,
                        "train_accuracy": train_accuracy, **evaluate(model, val_ids, val_labels, args.batch_size)})
        last = history[-1]
        trained = "-" if train_loss is None else f"{train_loss:.4f} / {train_accuracy:.3f}"
        log(f"[{attention}] step {step:5d}  time {train_time:7.1f} s  train loss/acc {trained}  "
            f"val loss/acc {last['val_loss']:.4f} / {last['val_accuracy']:.3f}")
        save()

    if not history:
        validate(None, None)
    model.train()

    def finished():
        return train_time >= args.time_budget or (args.steps is not None and step >= args.steps)

    recent_loss, recent_correct = [], []
    next_eval = history[-1]["train_time_s"] + args.eval_interval
    bar = tqdm(total=round(args.time_budget), initial=min(round(train_time), round(args.time_budget)),
               desc=attention, unit="s", disable=args.quiet, dynamic_ncols=True)
    while not finished():
        rows = batch_indices(step, args.batch_size, len(train_labels), args.seed)
        batch, target = trimmed(train_ids[rows]), train_labels[rows]
        started = time.perf_counter()
        logits = model(batch)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_time += time.perf_counter() - started
        step += 1
        recent_loss.append(loss.item())
        recent_correct.append((logits.argmax(-1) == target).float().mean().item())
        bar.update(min(train_time, args.time_budget) - bar.n)
        bar.set_postfix(step=step, loss=f"{recent_loss[-1]:.3f}")
        if train_time >= next_eval or finished():
            validate(sum(recent_loss) / len(recent_loss), sum(recent_correct) / len(recent_correct))
            recent_loss.clear()
            recent_correct.clear()
            next_eval = train_time + args.eval_interval
    bar.close()
    return {"attention": attention, "steps": step, "train_time_s": round(train_time, 3),
            "final_val_accuracy": history[-1]["val_accuracy"],
            "best_val_accuracy": max(h["val_accuracy"] for h in history), "history": history}


def write_curves(args, runs: list[dict], majority: float, wall_time: float) -> Path:
    """Merges these runs into the results file (one entry per kernel; same config required)."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / CURVES_FILE
    config = run_config(args) | {"time_budget_s": args.time_budget, "max_steps": args.steps,
                                 "threads": torch.get_num_threads()}
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("config") != config:
        results = {}
    results.update({"config": config, "majority_baseline": majority})
    results.setdefault("commands", {})[" ".join(args.attention)] = args.command
    results.setdefault("wall_time_s", {})[" ".join(args.attention)] = round(wall_time, 1)
    results.setdefault("runs", {}).update({run["attention"]: run for run in runs})
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def plot_curves(results_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((results_dir / CURVES_FILE).read_text())
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for attention in ATTENTIONS:
        run = results["runs"].get(attention)
        if run:
            history = run["history"]
            axis.plot([h["train_time_s"] for h in history], [h["val_accuracy"] for h in history], marker="o",
                      markersize=3, label=attention)
    axis.axhline(results["majority_baseline"], color="gray", linestyle="--", label="majority class")
    config = results["config"]
    axis.set_xlabel(f"training time (s), {config['threads']} CPU thread(s)")
    axis.set_ylabel("validation accuracy")
    axis.set_title(f"ListOps (ours), lengths {config['min_length']}-{config['max_length']}, "
                   f"depth <= {config['max_depth']}, m = {config['num_landmarks']}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = results_dir / PLOT_FILE
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None) -> dict:
    """The command line entry point. --threads sets the process-wide thread count and leaves it set: with
    torch 2.14's MKL, going 2 -> 1 -> 2 threads breaks torch.linalg.solve on 257 x 257 matrices."""
    args = parse_args(argv)
    args.command = " ".join(["python -m examples.listops.train", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda message: None) if args.quiet else tqdm.write
    started = time.perf_counter()
    train, val = make_datasets(args)
    counts = torch.bincount(val[1], minlength=data.NUM_CLASSES)
    majority = counts.max().item() / len(val[1])
    log(f"data: {args.train_size} train / {args.val_size} val expressions, "
        f"{args.min_length}-{args.max_length} tokens, made in {time.perf_counter() - started:.1f} s; "
        f"majority class {int(counts.argmax())} = {majority:.3f} of val")
    runs = [train_one(args, attention, train, val, log) for attention in args.attention]
    wall_time = time.perf_counter() - started
    curves = write_curves(args, runs, majority, wall_time)
    for run in runs:
        log(f"{run['attention']:>10}: val acc {run['final_val_accuracy']:.3f} (best {run['best_val_accuracy']:.3f}) "
            f"after {run['steps']} steps, {run['train_time_s']:.0f} s training")
    log(f"wall time {wall_time:.0f} s (data, training and validation); curves: {curves}")
    plot = plot_curves(args.results_dir) if args.plot else None
    if plot:
        log(f"plot: {plot}")
    return {"runs": runs, "majority_baseline": majority, "curves": curves, "plot": plot}


if __name__ == "__main__":
    main()
