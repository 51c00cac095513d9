"""The three PosGen subtasks: one token rule each, written once as dependency indices.

Every token after the seed prefix follows x_l = h(x_{a(l)}, x_{l-3}, x_{l-2}, x_{l-1}) with
h = sum mod 17 (the paper's j = 1 long-range and k = 3 recent dependencies). The subtasks differ only in
the long-range index a(l):

    recursive        a(l) = l - 4             (the rule looks at a fixed window: easy to extrapolate)
    cot              a(l) = 0                 (always the first token)
    semi_recursive   a(l) = floor((l - 4) / 2) (drifts back at half speed: the hardest)

The rule has the same difficulty at every position, so accuracy lost beyond the training length is lost to
position generalization alone. :func:`dependencies` is the single source of truth: generation
(:func:`generate`), the rule checker (:func:`rule_satisfied`) and the benchmark's analysis all read it.
"""

from __future__ import annotations

from typing import Callable

import torch

VOCAB_SIZE = 17
"""Tokens are 0..16; h reduces mod this."""
PREFIX_LENGTH = 4
"""The random seed prefix x_0..x_3; every later token follows the task's rule."""
NUM_RECENT = 3
"""k: the rule reads the k tokens just before position l."""
MIN_LENGTH = PREFIX_LENGTH + 1
"""Shortest useful sequence: the prefix plus one rule token."""

_LONG_RANGE: dict[str, Callable[[int], int]] = {
    "recursive": lambda position: position - 4,
    "cot": lambda position: 0,
    "semi_recursive": lambda position: (position - 4) // 2,
}
TASKS = tuple(_LONG_RANGE)
"""Subtask names, as the CLI and the benchmark spell them."""


def _check_task(task: str) -> None:
    if task not in _LONG_RANGE:
        raise ValueError(f"unknown PosGen task {task!r} (expected one of {', '.join(TASKS)})")


def dependencies(task: str, position: int) -> tuple[int, int, int, int]:
    """Indices that token ``position`` (>= 4) is computed from: (long-range, l-3, l-2, l-1)."""
    _check_task(task)
    if position < PREFIX_LENGTH:
        raise ValueError(f"position {position} is in the seed prefix (positions 0..{PREFIX_LENGTH - 1})")
    return (_LONG_RANGE[task](position), position - 3, position - 2, position - 1)


def dependency_table(task: str, length: int) -> torch.Tensor:
    """LongTensor [length - 4, 4]: row r holds :func:`dependencies` of position r + 4."""
    _check_task(task)
    if length < PREFIX_LENGTH:
        raise ValueError(f"length must be >= {PREFIX_LENGTH}, got {length}")
    rows = [dependencies(task, p) for p in range(PREFIX_LENGTH, length)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, PREFIX_LENGTH)


def combine(values: torch.Tensor) -> torch.Tensor:
    """h: the sum of the last dimension mod 17."""
    return values.sum(dim=-1) % VOCAB_SIZE


def generate(prefixes: torch.Tensor, task: str, length: int) -> torch.Tensor:
    """Extend seed prefixes (LongTensor [N, 4], values 0..16) to LongTensor [N, length] by the task's rule."""
    _check_task(task)
    if length < MIN_LENGTH:
        raise ValueError(f"length must be >= {MIN_LENGTH} (seed prefix + one rule token), got {length}")
    prefixes = torch.as_tensor(prefixes, dtype=torch.long)
    if prefixes.dim() != 2 or prefixes.shape[1] != PREFIX_LENGTH:
        raise ValueError(f"prefixes must have shape [N, {PREFIX_LENGTH}], got {list(prefixes.shape)}")
    if prefixes.numel() and (prefixes.min() < 0 or prefixes.max() >= VOCAB_SIZE):
        raise ValueError(f"prefix tokens must be in 0..{VOCAB_SIZE - 1}")
    tokens = torch.empty(prefixes.shape[0], length, dtype=torch.long)
    tokens[:, :PREFIX_LENGTH] = prefixes
    # One step per position, vectorized over sequences: each position depends only on earlier ones.
    for position, deps in enumerate(dependency_table(task, length).tolist(), start=PREFIX_LENGTH):
        tokens[:, position] = combine(tokens[:, deps])
    return tokens


def expected_tokens(tokens: torch.Tensor, task: str) -> torch.Tensor:
    """The rule's value at every position l >= 4, read from ``tokens``' own earlier positions.

    ``tokens``: LongTensor [..., L]. Returns the same shape; prefix positions are copied from ``tokens``.
    With ground-truth context this is the teacher-forced target a model should predict.
    """
    _check_task(task)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    expected = tokens.clone()
    length = tokens.shape[-1]
    if length > PREFIX_LENGTH:
        table = dependency_table(task, length)  # [L - 4, 4]
        expected[..., PREFIX_LENGTH:] = combine(tokens[..., table])
    return expected


def rule_satisfied(tokens: torch.Tensor, task: str) -> torch.Tensor:
    """BoolTensor like ``tokens``: True where the token follows the task's rule (prefix positions: True)."""
    return expected_tokens(tokens, task) == torch.as_tensor(tokens, dtype=torch.long)
