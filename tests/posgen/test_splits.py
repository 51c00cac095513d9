"""Splits: disjoint seed prefixes across train / validation / test, deterministic for a seed."""

from __future__ import annotations

import pytest
import torch

from megatron_resonance.posgen import (
    NUM_PREFIXES,
    PAPER_SIZES,
    POOL_SIZES,
    SPLITS,
    TASKS,
    make_split,
    prefix_ids,
    prefix_pool,
    prefix_tokens,
    sample_prefix_ids,
)


def prefix_set(tokens: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in tokens[:, :4].tolist()}


def test_pools_partition_all_prefixes():
    assert NUM_PREFIXES == 17**4 == 83_521
    assert POOL_SIZES == {"train": 66_817, "validation": 8_352, "test": 8_352}
    pools = {s: set(prefix_pool(s).tolist()) for s in SPLITS}
    assert {s: len(p) for s, p in pools.items()} == POOL_SIZES
    assert set.union(*pools.values()) == set(range(NUM_PREFIXES))


@pytest.mark.parametrize("seeds", [(0, 0, 0), (0, 1, 2), (7, 123456789, 2**64 - 1)])
def test_paper_sizes_never_share_a_prefix(seeds):
    """Disjoint even when each split has its own seed and length: the partition ignores the seed."""
    lengths = {"train": 64, "validation": 256, "test": 256}
    data = {
        split: make_split("semi_recursive", split, PAPER_SIZES[split], lengths[split], seed)
        for split, seed in zip(SPLITS, seeds)
    }
    prefixes = {split: prefix_set(tokens) for split, tokens in data.items()}
    for split in SPLITS:
        assert len(prefixes[split]) == PAPER_SIZES[split], "prefixes repeat within a split"
    assert not prefixes["train"] & prefixes["validation"]
    assert not prefixes["train"] & prefixes["test"]
    assert not prefixes["validation"] & prefixes["test"]


def test_whole_pools_are_disjoint():
    ids = {s: set(sample_prefix_ids(s, POOL_SIZES[s], seed=5).tolist()) for s in SPLITS}
    assert sum(map(len, ids.values())) == NUM_PREFIXES
    assert len(set.union(*ids.values())) == NUM_PREFIXES


def test_deterministic_for_a_seed():
    for task in TASKS:
        a = make_split(task, "train", 1000, 64, seed=11)
        b = make_split(task, "train", 1000, 64, seed=11)
        assert torch.equal(a, b)
    c = make_split("cot", "train", 1000, 64, seed=12)
    assert not torch.equal(make_split("cot", "train", 1000, 64, seed=11), c)
    # Another seed gives mostly other prefixes, not just a reordering.
    assert len(prefix_set(c) & prefix_set(make_split("cot", "train", 1000, 64, seed=11))) < 100


def test_same_prefixes_for_every_task_and_nested_sizes():
    small = sample_prefix_ids("test", 100, seed=4)
    assert torch.equal(sample_prefix_ids("test", 1000, seed=4)[:100], small)
    for task in TASKS:
        assert torch.equal(prefix_ids(make_split(task, "test", 100, 16, seed=4)), small)


def test_scheme_is_pinned():
    """The hashing scheme fixes every published split; changing it is a breaking change."""
    assert sample_prefix_ids("train", 5, seed=0).tolist() == PINNED_TRAIN_SEED0
    assert sample_prefix_ids("test", 5, seed=0).tolist() == PINNED_TEST_SEED0


PINNED_TRAIN_SEED0 = [23263, 67901, 29564, 9395, 79451]
PINNED_TEST_SEED0 = [49162, 27038, 82111, 74360, 25632]


def mix64(x: int) -> int:
    """splitmix64 finalizer in plain Python integers: an independent check of the numpy version."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_scheme_matches_its_documentation():
    from megatron_resonance.posgen.splits import PARTITION_SALT, SAMPLE_SALT

    order = sorted(range(NUM_PREFIXES), key=lambda i: (mix64(i ^ PARTITION_SALT), i))
    train, validation, test = order[:66_817], order[66_817:75_169], order[75_169:]
    assert prefix_pool("train").tolist() == sorted(train)
    assert prefix_pool("validation").tolist() == sorted(validation)
    assert prefix_pool("test").tolist() == sorted(test)
    key = mix64(9 ^ SAMPLE_SALT)
    want = sorted(test, key=lambda i: (mix64(i ^ key), i))[:50]
    assert sample_prefix_ids("test", 50, seed=9).tolist() == want


def test_prefix_id_round_trip():
    ids = torch.arange(NUM_PREFIXES)
    prefixes = prefix_tokens(ids)
    assert prefixes.shape == (NUM_PREFIXES, 4)
    assert prefixes.min() == 0 and prefixes.max() == 16
    assert prefixes[17**3 + 2].tolist() == [1, 0, 0, 2]
    assert torch.equal(prefix_ids(prefixes), ids)


def test_bad_requests():
    with pytest.raises(ValueError, match="split 'test' has 8352 distinct seed prefixes; cannot draw 8353"):
        make_split("cot", "test", 8353, 64, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        make_split("cot", "dev", 10, 64, seed=0)
    with pytest.raises(ValueError, match="positive"):
        make_split("cot", "train", 0, 64, seed=0)
    with pytest.raises(ValueError, match="seed"):
        make_split("cot", "train", 10, 64, seed=-1)
    # The largest request each pool can serve works.
    assert make_split("recursive", "validation", POOL_SIZES["validation"], 5, seed=0).shape == (8352, 5)


# ----------------------------------------------------------------------------------------------------------
# The reference protocol's rows (the paper's reference code)
# ----------------------------------------------------------------------------------------------------------


def test_reference_rows_are_the_cycled_combinations():
    """All C(17, 4) = 2,380 sets of 4 distinct tokens, ascending within a prefix and lexicographic across
    them, cycled: row 2,380 is row 0 again."""
    from itertools import combinations

    from megatron_resonance.posgen import NUM_REFERENCE_PREFIXES, reference_prefixes

    assert NUM_REFERENCE_PREFIXES == 2380
    train = reference_prefixes("train", 10_000, 1_000, 1_000)
    assert train.shape == (10_000, 4)
    assert [tuple(r) for r in train[:2380].tolist()] == list(combinations(range(17), 4))
    assert train[:3].tolist() == [[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 2, 5]]
    assert train[2379].tolist() == [13, 14, 15, 16]
    assert torch.equal(train[2380:4760], train[:2380]) and torch.equal(train[9520:], train[:480])
    assert len(prefix_set(train)) == 2380


def test_reference_validation_and_test_rows_are_training_rows():
    """Validation: training rows 0..V-1; test: training rows V..V+T-1; the same rows for every seed and task."""
    from megatron_resonance.posgen import make_reference_split, reference_prefixes

    sizes = (4_000, 200, 1_000)
    train = reference_prefixes("train", *sizes)
    assert torch.equal(reference_prefixes("validation", *sizes), train[:200])
    assert torch.equal(reference_prefixes("test", *sizes), train[200:1200])
    for task in TASKS:
        test = make_reference_split(task, "test", 80, 500, 20, 100)
        assert test.shape == (100, 80) and torch.equal(test[:, :4], train[20:120])
        assert torch.equal(make_reference_split(task, "train", 80, 500, 20, 100)[20:120], test)
    with pytest.raises(ValueError, match=r"need validation \+ test <= train, got 200 \+ 3900 > 4000"):
        reference_prefixes("test", 4_000, 200, 3_900)
    with pytest.raises(ValueError, match="number of test sequences must be positive"):
        reference_prefixes("train", 4_000, 200, 0)
