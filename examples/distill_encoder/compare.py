"""One table from several distill runs: quality after distillation and time per training step, per run.

    python -m examples.distill_encoder.compare DIR [DIR ...] [--out FILE]

Each DIR holds a distill.json (``python -m examples.distill_encoder.distill --out DIR ...``). Issue 18's
comparison: the paper's landmarks at m = 128 against one Lloyd step at m = 32, trained and timed the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _label(settings: dict) -> str:
    refine = settings.get("landmark_refine", 0)
    return f"m = {settings['num_landmarks']}, " + (f"refine {refine}" if refine else "paper (no refine)")


def table(runs: list[dict]) -> str:
    lengths = sorted(set.intersection(*(set(run["settings"]["lengths"]) for run in runs)))  # measured by all
    head = (["landmarks", "steps", "s / step"] + [f"cos@{n}" for n in lengths] + [f"MRR@{n}" for n in lengths]
            + [f"fwd ms@{n} (x sdpa)" for n in lengths])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        quality, cost = run["quality"], run["cost"]
        cells = [_label(run["settings"]), str(run["settings"]["steps"]),
                 f"{run['training']['seconds_per_step']:.2f}"]
        cells += [f"{quality[str(n)]['after']['cosine_mean']:.3f}" for n in lengths]
        cells += [f"{quality[str(n)]['after']['retrieval_student']['mrr']:.3f}" for n in lengths]
        cells += [f"{1000 * cost[str(n)]['skyformer']['median_s']:.0f} ({cost[str(n)]['time_ratio_skyformer_over_sdpa']:.2f}x)"
                  for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    teacher = runs[0]["quality"]
    lines.append("| teacher (sdpa) | | | " + " | ".join("1" for _ in lengths) + " | "
                 + " | ".join(f"{teacher[str(n)]['teacher']['mrr']:.3f}" for n in lengths) + " | "
                 + " | ".join("(1x)" for _ in lengths) + " |")
    commands = "\n".join(f"- `{run['command']}` ({run['started_at']})" for run in runs)
    note = ("cos: mean cosine to the teacher's embeddings on held-out documents after distillation; MRR: retrieval "
            "of each passage's continuation; s / step: one training step (teacher forward, student forward and "
            "backward, 1024 tokens); fwd: the student's encoder forward (batch 4), in parentheses over sdpa's "
            "measured in the same run (runs made at different times compare best by that ratio).")
    return "\n".join(lines) + "\n\n" + note + "\n\nRuns:\n" + commands + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="folders holding distill.json")
    parser.add_argument("--out", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    runs = [json.loads((folder / "distill.json").read_text()) for folder in args.runs]
    text = table(runs)
    if args.out:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
