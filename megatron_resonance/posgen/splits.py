"""Train / validation / test splits that never share a seed prefix.

A sequence is fixed by its task and its seed prefix x_0..x_3, so a test sequence whose prefix was seen in
training is a memorized sequence, not a test of position generalization. (The reference implementation
draws prefixes from only C(17, 4) = 2,380 sorted combinations, and all its test prefixes occur in its
training set.)

Scheme, in two steps, both pure integer hashing (splitmix64), so results do not depend on a library's
random-number stream and stay the same across torch / numpy versions and machines:

1. **Partition (fixed, independent of the seed).** Each of the 17^4 = 83,521 prefixes has an id
   ``x_0*17^3 + x_1*17^2 + x_2*17 + x_3``. The ids are ordered by ``mix64(id ^ PARTITION_SALT)`` and the
   order is cut into three disjoint pools: the first 66,817 are train, the next 8,352 validation, the last
   8,352 test (80 / 10 / 10 %). Because the seed plays no part, splits drawn with *different* seeds, by
   different processes or at different lengths still never share a prefix.
2. **Sample (seeded).** A split of N sequences takes the N prefixes of its pool with the smallest
   ``mix64(mix64(seed ^ SAMPLE_SALT) ^ id)``, in that order: distinct prefixes, deterministic for a seed,
   different for another seed, and a larger N extends a smaller one. The same seed picks the same
   prefixes for every task, so the three subtasks are compared on the same starting points.

Asking a split for more sequences than its pool holds is an error (there would be repeated sequences).

The reference protocol's rows (:func:`make_reference_split`) follow the paper's reference code instead,
so its numbers can be compared like for like: the C(17, 4) = 2,380 sets of 4 distinct tokens, each in
ascending order and the sets in lexicographic order, cycled to fill the rows; training takes the first
``train`` rows, validation the first ``validation`` of those and test the next ``test`` ones. Every
validation and test sequence is a training sequence, and the rows are the same for every seed.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch

from megatron_resonance.posgen.tasks import PREFIX_LENGTH, VOCAB_SIZE, generate

NUM_PREFIXES = VOCAB_SIZE**PREFIX_LENGTH
"""17^4 = 83,521 possible seed prefixes."""
SPLITS = ("train", "validation", "test")
_HELD_OUT = NUM_PREFIXES // 10
POOL_SIZES = {"train": NUM_PREFIXES - 2 * _HELD_OUT, "validation": _HELD_OUT, "test": _HELD_OUT}
"""How many distinct seed prefixes each split can draw from (66,817 / 8,352 / 8,352)."""
PAPER_SIZES = {"train": 10_000, "validation": 1_000, "test": 1_000}
"""Sequences per split in the paper's PosGen setup."""

NUM_REFERENCE_PREFIXES = math.comb(VOCAB_SIZE, PREFIX_LENGTH)
"""C(17, 4) = 2,380 distinct seed prefixes in the reference protocol."""

PARTITION_SALT = 0x5D1A_2F6B_0E3C_9A47
SAMPLE_SALT = 0x243F_6A88_85A3_08D3
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic): a stable bijective hash."""
    z = x.astype(np.uint64) + np.uint64(0x9E37_79B9_7F4A_7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
    return z ^ (z >> np.uint64(31))


def _check_split(split: str) -> None:
    if split not in POOL_SIZES:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def prefix_tokens(ids: torch.Tensor) -> torch.Tensor:
    """Prefix ids (LongTensor [N]) to prefixes (LongTensor [N, 4]), x_0 the most significant base-17 digit."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    powers = VOCAB_SIZE ** torch.arange(PREFIX_LENGTH - 1, -1, -1)
    return (ids[:, None] // powers) % VOCAB_SIZE


def prefix_ids(prefixes: torch.Tensor) -> torch.Tensor:
    """Prefixes (LongTensor [N, >= 4]; only the first 4 columns are read) to prefix ids (LongTensor [N])."""
    prefixes = torch.as_tensor(prefixes, dtype=torch.long)[:, :PREFIX_LENGTH]
    powers = VOCAB_SIZE ** torch.arange(PREFIX_LENGTH - 1, -1, -1)
    return (prefixes * powers).sum(dim=1)


@lru_cache(maxsize=None)
def _partition() -> dict[str, np.ndarray]:
    ids = np.arange(NUM_PREFIXES, dtype=np.uint64)
    order = np.argsort(_mix64(ids ^ np.uint64(PARTITION_SALT)), kind="stable").astype(np.int64)
    pools, start = {}, 0
    for split in SPLITS:
        pool = order[start : start + POOL_SIZES[split]]
        pool.setflags(write=False)
        pools[split] = pool
        start += POOL_SIZES[split]
    return pools


def prefix_pool(split: str) -> torch.Tensor:
    """The ids of every seed prefix the split may use (LongTensor, ascending)."""
    _check_split(split)
    return torch.from_numpy(np.sort(_partition()[split]))


def sample_prefix_ids(split: str, num_sequences: int, seed: int) -> torch.Tensor:
    """``num_sequences`` distinct prefix ids from the split's pool, chosen and ordered by ``seed``."""
    _check_split(split)
    if num_sequences <= 0:
        raise ValueError(f"number of sequences must be positive, got {num_sequences}")
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    pool = _partition()[split]
    if num_sequences > len(pool):
        raise ValueError(
            f"split {split!r} has {len(pool)} distinct seed prefixes; cannot draw {num_sequences} sequences "
            "without repeating one"
        )
    key = _mix64(np.array([seed ^ SAMPLE_SALT], dtype=np.uint64))[0]
    order = np.argsort(_mix64(pool.astype(np.uint64) ^ key), kind="stable")[:num_sequences]
    return torch.from_numpy(pool[order].copy())


def sample_prefixes(split: str, num_sequences: int, seed: int) -> torch.Tensor:
    """LongTensor [num_sequences, 4]: the seed prefixes of a split (see :func:`sample_prefix_ids`)."""
    return prefix_tokens(sample_prefix_ids(split, num_sequences, seed))


def make_split(task: str, split: str, num_sequences: int, length: int, seed: int) -> torch.Tensor:
    """LongTensor [num_sequences, length] of PosGen sequences for one split: the in-process data source.

    Sequences of different splits never share a seed prefix, whatever the seeds and lengths.
    """
    return generate(sample_prefixes(split, num_sequences, seed), task, length)


@lru_cache(maxsize=None)
def _reference_cycle() -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(VOCAB_SIZE), PREFIX_LENGTH)), dtype=torch.long)


def reference_prefixes(split: str, train: int, validation: int, test: int) -> torch.Tensor:
    """LongTensor [N, 4]: the reference protocol's seed prefixes of ``split`` for a run of ``train`` /
    ``validation`` / ``test`` rows (training: rows 0..train-1; validation: rows 0..validation-1; test: rows
    validation..validation+test-1 of the cycled combinations)."""
    _check_split(split)
    for name, count in (("train", train), ("validation", validation), ("test", test)):
        if count <= 0:
            raise ValueError(f"number of {name} sequences must be positive, got {count}")
    if validation + test > train:
        raise ValueError(
            f"validation and test rows are taken from the training rows: need validation + test "
            f"<= train, got {validation} + {test} > {train}"
        )
    start, count = {"train": (0, train), "validation": (0, validation), "test": (validation, test)}[split]
    rows = torch.arange(start, start + count) % NUM_REFERENCE_PREFIXES
    return _reference_cycle()[rows]


def make_reference_split(task: str, split: str, length: int, train: int, validation: int, test: int) -> torch.Tensor:
    """LongTensor [N, length]: the reference protocol's sequences of ``split`` (see :func:`reference_prefixes`)."""
    return generate(reference_prefixes(split, train, validation, test), task, length)
