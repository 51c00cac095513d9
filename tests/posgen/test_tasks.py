"""PosGen token rules, checked against the issue's formulas written out independently."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_resonance.posgen import (
    PAPER_SIZES,
    TASKS,
    dependencies,
    dependency_table,
    expected_tokens,
    generate,
    make_split,
    rule_satisfied,
)


def reference_token(x: list[int], task: str, n: int) -> int:
    """x_n from the issue text (which writes l for n): h(a, b, c, d) = (a + b + c + d) mod 17."""
    first = {"recursive": x[n - 4], "cot": x[0], "semi_recursive": x[(n - 4) // 2]}[task]
    return (first + x[n - 3] + x[n - 2] + x[n - 1]) % 17


def reference_sequence(prefix: list[int], task: str, length: int) -> list[int]:
    x = list(prefix)
    for n in range(4, length):
        x.append(reference_token(x, task, n))
    return x


def test_task_names():
    assert TASKS == ("recursive", "cot", "semi_recursive")


@pytest.mark.parametrize("task", TASKS)
def test_paper_train_split_follows_rules(task):
    tokens = make_split(task, "train", PAPER_SIZES["train"], 64, seed=0)
    assert tokens.shape == (10_000, 64) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() <= 16
    # Every token l >= 4 satisfies the rule, recomputed position by position from the formula.
    rows = tokens.tolist()
    for row in rows[:500]:
        assert row == reference_sequence(row[:4], task, 64)
    # All rows, vectorized: the same formula with tensor indexing.
    for n in range(4, 64):
        first = {"recursive": n - 4, "cot": 0, "semi_recursive": (n - 4) // 2}[task]
        want = (tokens[:, first] + tokens[:, n - 3] + tokens[:, n - 2] + tokens[:, n - 1]) % 17
        assert torch.equal(tokens[:, n], want), f"position {n}"
    assert rule_satisfied(tokens, task).all()


@pytest.mark.parametrize("task", TASKS)
def test_prefixes_look_random(task):
    tokens = make_split(task, "test", PAPER_SIZES["test"], 256, seed=0)
    prefixes = tokens[:, :4]
    for column in range(4):
        counts = torch.bincount(prefixes[:, column], minlength=17)
        assert (counts > 0).all(), f"column {column} misses a token value"
        # 1,000 draws over 17 values: expect ~59 each; a uniform draw stays well inside [25, 100].
        assert counts.min() >= 25 and counts.max() <= 100, counts.tolist()
    # Unlike the reference implementation, prefixes are not sorted combinations.
    assert not (prefixes[:, :-1] <= prefixes[:, 1:]).all(dim=1).all()


def test_dependencies_match_formulas():
    assert dependencies("recursive", 4) == (0, 1, 2, 3)
    assert dependencies("recursive", 10) == (6, 7, 8, 9)
    assert dependencies("cot", 10) == (0, 7, 8, 9)
    assert dependencies("semi_recursive", 4) == (0, 1, 2, 3)
    assert dependencies("semi_recursive", 5) == (0, 2, 3, 4)
    assert dependencies("semi_recursive", 255) == (125, 252, 253, 254)
    table = dependency_table("cot", 8)
    assert table.tolist() == [[0, 1, 2, 3], [0, 2, 3, 4], [0, 3, 4, 5], [0, 4, 5, 6]]


def test_known_sequence():
    # Worked by hand: 1+2+3+4 = 10; cot: x_0 + x_2 + x_3 + x_4 = 1 + 3 + 4 + 10 = 18 = 1 (mod 17).
    prefix = torch.tensor([[1, 2, 3, 4]])
    assert generate(prefix, "recursive", 6).tolist() == [[1, 2, 3, 4, 10, 2]]
    assert generate(prefix, "cot", 6).tolist() == [[1, 2, 3, 4, 10, 1]]
    assert generate(prefix, "semi_recursive", 6).tolist() == [[1, 2, 3, 4, 10, 1]]


@pytest.mark.parametrize("task", TASKS)
def test_rule_checker_flags_a_corrupted_token(task):
    tokens = make_split(task, "validation", 8, 32, seed=3)
    bad = tokens.clone()
    bad[5, 20] = (bad[5, 20] + 1) % 17
    ok = rule_satisfied(bad, task)
    assert not ok[5, 20]
    assert ok[:5].all() and ok[6:].all() and ok[5, :20].all()
    # Teacher-forced targets from the true context equal the data itself.
    assert torch.equal(expected_tokens(tokens, task), tokens)


def test_bad_arguments():
    prefix = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="unknown PosGen task"):
        generate(prefix, "fibonacci", 8)
    with pytest.raises(ValueError, match="length must be >= 5"):
        generate(prefix, "cot", 4)
    with pytest.raises(ValueError, match="shape"):
        generate(torch.tensor([[1, 2, 3]]), "cot", 8)
    with pytest.raises(ValueError, match="0..16"):
        generate(torch.tensor([[1, 2, 3, 17]]), "cot", 8)
    with pytest.raises(ValueError, match="seed prefix"):
        dependencies("cot", 3)


@settings(max_examples=150, deadline=None)
@given(
    task=st.sampled_from(TASKS),
    prefixes=st.lists(st.lists(st.integers(0, 16), min_size=4, max_size=4), min_size=1, max_size=4),
    length=st.integers(5, 300),
)
def test_rules_hold_for_any_prefix_and_length(task, prefixes, length):
    tokens = generate(torch.tensor(prefixes), task, length)
    assert tokens.shape == (len(prefixes), length)
    assert tokens.tolist() == [reference_sequence(p, task, length) for p in prefixes]
    assert rule_satisfied(tokens, task).all()
