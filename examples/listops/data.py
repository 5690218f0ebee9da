"""ListOps, generated here: nested bracketed list operations on digits, with an exact solver.

An expression is a digit 0-9 or ``[OP a1 a2 ... ]`` with OP one of

- ``MAX`` / ``MIN``: the largest / smallest argument;
- ``MED``: the median; for an even count, the floor of the mean of the two middle values (what the
  original ListOps generator computes as ``int(np.median(args))``);
- ``SM``: the sum modulo 10.

Text form: space-separated tokens, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (= 9). A tree is an ``int`` (a digit)
or a tuple ``(op, [children])``. Everything random is drawn from a ``random.Random(seed)``, so a dataset is a
pure function of its arguments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

OPERATORS = ("MAX", "MIN", "MED", "SM")
PAD = "<pad>"
CLOSE = "]"
VOCAB = (PAD,) + tuple(str(d) for d in range(10)) + tuple("[" + op for op in OPERATORS) + (CLOSE,)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD_ID = TOKEN_ID[PAD]
NUM_CLASSES = 10


def apply(op: str, args: list[int]) -> int:
    """The value of ``[op *args ]`` for digit arguments."""
    if not args:
        raise ValueError(f"{op} needs at least one argument")
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":
        ordered = sorted(args)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")


def evaluate(tree) -> int:
    """Value of a tree (iterative, so depth is not limited by Python's recursion limit)."""
    if isinstance(tree, int):
        return tree
    # Post-order walk with an explicit stack of (op, children, evaluated values).
    stack = [(tree[0], tree[1], [])]
    while True:
        op, children, values = stack[-1]
        if len(values) < len(children):
            child = children[len(values)]
            if isinstance(child, int):
                values.append(child)
            else:
                stack.append((child[0], child[1], []))
            continue
        result = apply(op, values)
        stack.pop()
        if not stack:
            return result
        stack[-1][2].append(result)


def solve(text: str) -> int:
    """Value of an expression in text form, e.g. ``solve("[SM 3 [MAX 9 1 ] ]") == 2``.

    Raises ValueError on malformed input (unknown token, unbalanced brackets, empty operator).
    """
    stack: list[tuple[str, list[int]]] = []
    result = None
    for token in text.split():
        if result is not None:
            raise ValueError(f"trailing token {token!r} after a complete expression")
        if token.startswith("["):
            if token[1:] not in OPERATORS:
                raise ValueError(f"unknown operator token {token!r}")
            stack.append((token[1:], []))
            continue
        if token == CLOSE:
            if not stack:
                raise ValueError("']' without an open operator")
            op, args = stack.pop()
            value = apply(op, args)
        elif token.isdigit() and len(token) == 1:
            value = int(token)
        else:
            raise ValueError(f"unknown token {token!r}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if stack or result is None:
        raise ValueError("incomplete expression (unclosed '[' or empty input)")
    return result


def to_text(tree) -> str:
    return " ".join(tokens(tree))


def tokens(tree) -> list[str]:
    out: list[str] = []
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, int):
            out.append(str(item))
        elif isinstance(item, str):  # a pending ']'
            out.append(item)
        else:
            out.append("[" + item[0])
            stack.append(CLOSE)
            stack.extend(reversed(item[1]))
    return out


def random_tree(rng: random.Random, max_depth: int, max_args: int, leaf_probability: float):
    """A random expression: the root is an operator; below it, each argument is a digit with probability
    ``leaf_probability`` (always at ``max_depth``), else an operator with 2..max_args arguments."""

    def node(depth: int):
        if depth > 0 and (depth >= max_depth or rng.random() < leaf_probability):
            return rng.randrange(10)
        return (rng.choice(OPERATORS), [node(depth + 1) for _ in range(rng.randint(2, max_args))])

    return node(0)


@dataclass(frozen=True)
class ListOpsConfig:
    """Generator settings. Expressions are drawn until their token count lies in [min_length, max_length]
    (LRA: max_depth 10, max_args 10, lengths 500-2000)."""

    min_length: int = 256
    max_length: int = 512
    max_depth: int = 4
    max_args: int = 8
    leaf_probability: float = 0.3

    def __post_init__(self):
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.max_depth < 1 or self.max_args < 2:
            raise ValueError(f"need max_depth >= 1 and max_args >= 2, got {self.max_depth}, {self.max_args}")
        if not 0.0 <= self.leaf_probability < 1.0:
            raise ValueError(f"leaf_probability must be in [0, 1), got {self.leaf_probability}")
        if self.min_length > 2 + self._max_tokens():
            raise ValueError(f"min_length {self.min_length} is unreachable with max_depth={self.max_depth}, "
                             f"max_args={self.max_args}")

    def _max_tokens(self) -> int:
        count, width = 0, 1
        for _ in range(self.max_depth):
            count, width = count + 2 * width, width * self.max_args
        return count + width


def generate(num_examples: int, seed: int, config: ListOpsConfig = ListOpsConfig(),
             max_tries: int = 10_000_000) -> list[tuple[list[str], int]]:
    """``num_examples`` (tokens, label) pairs, deterministic in (seed, config)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(max_tries):
        if len(examples) == num_examples:
            return examples
        tree = random_tree(rng, config.max_depth, config.max_args, config.leaf_probability)
        toks = tokens(tree)
        if config.min_length <= len(toks) <= config.max_length:
            examples.append((toks, evaluate(tree)))
    raise RuntimeError(f"only {len(examples)} of {num_examples} expressions fell in the length range after "
                       f"{max_tries} tries; widen [min_length, max_length]")


def encode(examples: list[tuple[list[str], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, max_len) int64 token ids right-padded with PAD_ID, and (num,) labels."""
    width = max(len(toks) for toks, _ in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    for row, (toks, _) in enumerate(examples):
        ids[row, :len(toks)] = torch.tensor([TOKEN_ID[t] for t in toks])
    return ids, torch.tensor([label for _, label in examples])
