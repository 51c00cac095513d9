"""Small Megatron indexed datasets of given token ids, written by megatron-core's ``IndexedDatasetBuilder``
(what ``tools/preprocess_data.py`` uses), for tests that need data of a chosen shape rather than text."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np


def write_dataset(prefix: Path, documents: Sequence[Sequence[int]], dtype=np.uint16) -> Path:
    """``prefix.bin`` + ``prefix.idx`` holding ``documents`` (one sequence each); returns ``prefix``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def documents(count: int, length: int, vocab_size: int = 256, seed: int = 0) -> list:
    """``count`` documents of ``length`` ids below ``vocab_size``, the last id of each being the EOS (the
    vocabulary's last id, as the trainer takes it without a tokenizer)."""
    rng = np.random.default_rng(seed)
    return [[*rng.integers(0, vocab_size - 1, length - 1).tolist(), vocab_size - 1] for _ in range(count)]
