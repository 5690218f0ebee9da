"""The ListOps example: solver on hand-written cases, generator invariants, model, and a training smoke test."""

import json
import random

import numpy as np
import pytest
import torch

from examples.listops import data, train
from examples.listops.model import ListOpsClassifier
from skyformer_ext.nn import ATTENTIONS


@pytest.mark.parametrize("text,value", [
    ("7", 7),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 [MAX 1 2 ] 5 ]", 2),
    ("[MED 1 9 5 ]", 5),
    ("[MED 1 2 3 4 ]", 2),       # even count: floor of the mean of the middle two (2, 3)
    ("[MED 8 9 ]", 8),
    ("[MED 3 3 9 9 ]", 6),
    ("[SM 9 8 7 ]", 4),
    ("[SM [MAX 9 1 ] [MIN 5 6 ] [MED 0 2 4 ] ]", 6),
    ("[MIN [SM 5 5 ] 4 ]", 0),
    ("[MAX [MED [SM 1 2 ] [MIN 9 8 7 ] 0 ] [SM 4 4 ] ]", 8),
])
def test_solver_on_hand_written_cases(text, value):
    assert data.solve(text) == value


def test_solver_handles_deep_nesting():
    depth = 5000  # far beyond Python's recursion limit
    assert data.solve("[MAX " * depth + "3 4" + " ]" * depth) == 4
    tree = 6
    for _ in range(depth):
        tree = ("SM", [tree, 1])
    assert data.evaluate(tree) == (6 + depth) % 10
    assert data.solve(data.to_text(tree)) == (6 + depth) % 10


@pytest.mark.parametrize("text", ["", "[FOO 1 ]", "[MAX 1 2", "]", "[MAX ]", "1 2", "[MAX 12 ]", "[MAX 1 ] 3"])
def test_solver_rejects_malformed_text(text):
    with pytest.raises(ValueError):
        data.solve(text)


def _numpy_value(tree):
    """An independent evaluator in the style of the original ListOps generator (numpy median, int())."""
    if isinstance(tree, int):
        return tree
    op, args = tree[0], [_numpy_value(child) for child in tree[1]]
    return {"MAX": max, "MIN": min, "MED": lambda a: int(np.median(a)), "SM": lambda a: sum(a) % 10}[op](args)


def _depth_and_widths(tokens):
    depth, deepest, widths, counts = 0, 0, [], []
    for token in tokens:
        if counts and token != "]":
            counts[-1] += 1
        if token.startswith("["):
            depth += 1
            deepest = max(deepest, depth)
            counts.append(0)
        elif token == "]":
            depth -= 1
            widths.append(counts.pop())
    return deepest, widths


def test_generator_is_deterministic_in_range_and_labelled_by_the_solver():
    config = data.ListOpsConfig(min_length=40, max_length=90, max_depth=3, max_args=5, leaf_probability=0.3)
    examples = data.generate(60, seed=3, config=config)
    assert examples == data.generate(60, seed=3, config=config)
    assert examples != data.generate(60, seed=4, config=config)
    for tokens, label in examples:
        assert 40 <= len(tokens) <= 90
        assert label == data.solve(" ".join(tokens))
        deepest, widths = _depth_and_widths(tokens)
        assert 1 <= deepest <= 3 and all(2 <= w <= 5 for w in widths)
    assert len({label for _, label in examples}) > 3


def test_evaluate_agrees_with_an_independent_evaluator():
    rng = random.Random(0)
    for _ in range(300):
        tree = data.random_tree(rng, max_depth=4, max_args=6, leaf_probability=0.4)
        assert data.evaluate(tree) == _numpy_value(tree) == data.solve(data.to_text(tree))


def test_encode_pads_and_round_trips():
    examples = [(["[MAX", "1", "2", "]"], 2), (["5"], 5)]
    ids, labels = data.encode(examples)
    assert ids.tolist() == [[data.TOKEN_ID[t] for t in examples[0][0]], [data.TOKEN_ID["5"]] + [data.PAD_ID] * 3]
    assert labels.tolist() == [2, 5]
    assert [data.VOCAB[i] for i in ids[0].tolist()] == examples[0][0]


@pytest.mark.parametrize("kwargs", [dict(min_length=10, max_length=5), dict(max_depth=0), dict(max_args=1),
                                    dict(leaf_probability=1.0), dict(min_length=500, max_depth=1, max_args=3)])
def test_config_errors(kwargs):
    with pytest.raises(ValueError):
        data.ListOpsConfig(**kwargs)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_model_ignores_padding(attention):
    torch.manual_seed(0)
    model = ListOpsClassifier(len(data.VOCAB), data.NUM_CLASSES, 64, attention=attention, num_landmarks=8).eval()
    ids, _ = data.encode(data.generate(3, seed=0, config=data.ListOpsConfig(min_length=10, max_length=30,
                                                                             max_depth=2, max_args=4)))
    logits = model(ids)
    assert logits.shape == (3, data.NUM_CLASSES) and logits.isfinite().all()
    padded = torch.cat([ids, torch.full((3, 17), data.PAD_ID)], dim=1)
    assert (model(padded) - logits).abs().max() < 1e-5


def test_model_parameters_do_not_depend_on_attention():
    shapes = [{k: v.shape for k, v in ListOpsClassifier(16, 10, 32, attention=a).state_dict().items()}
              for a in ATTENTIONS]
    assert shapes[0] == shapes[1] == shapes[2]


def _tiny(tmp_path, *extra):
    return ["--train-size", "24", "--val-size", "8", "--min-length", "8", "--max-length", "40", "--max-depth", "2",
            "--max-args", "4", "--batch-size", "4", "--num-landmarks", "4", "--eval-interval", "0",
            "--time-budget", "600", "--dropout", "0.1", "--quiet", "--threads", "0",  # keep pytest's threads
            "--checkpoint-dir", str(tmp_path / "checkpoints"), "--results-dir", str(tmp_path / "results"), *extra]


def test_training_smoke_writes_checkpoints_curves_and_plot(tmp_path):
    result = train.main(_tiny(tmp_path, "--attention", "all", "--steps", "3", "--plot"))
    assert [run["attention"] for run in result["runs"]] == ["softmax", "kernelized", "skyformer"]
    curves = json.loads((tmp_path / "results" / train.CURVES_FILE).read_text())
    assert set(curves["runs"]) == set(ATTENTIONS) and 0 < curves["majority_baseline"] <= 1
    for attention, run in curves["runs"].items():
        assert run["steps"] == 3 and [h["step"] for h in run["history"]] == [0, 1, 2, 3]
        assert all(0 <= h["val_accuracy"] <= 1 and np.isfinite(h["val_loss"]) for h in run["history"])
        assert (tmp_path / "checkpoints" / f"listops_{attention}.pt").exists()
    assert (tmp_path / "results" / train.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    straight = train.main(_tiny(tmp_path / "a", "--attention", "skyformer", "--steps", "5"))
    train.main(_tiny(tmp_path / "b", "--attention", "skyformer", "--steps", "2"))
    resumed = train.main(_tiny(tmp_path / "b", "--attention", "skyformer", "--steps", "5", "--resume"))
    keys = ("step", "val_loss", "val_accuracy", "train_loss", "train_accuracy")
    assert [[h[k] for k in keys] for h in resumed["runs"][0]["history"]] == [
        [h[k] for k in keys] for h in straight["runs"][0]["history"]]
    final = [torch.load(d / "checkpoints" / "listops_skyformer.pt", weights_only=True)["model"]
             for d in (tmp_path / "a", tmp_path / "b")]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
    with pytest.raises(SystemExit, match="different configuration"):
        train.main(_tiny(tmp_path / "b", "--attention", "skyformer", "--steps", "6", "--resume", "--lr", "0.1"))
