"""Checks of the indexed datasets a run reads, before any worker starts: one line for each way they fail.

megatron-core trusts its files: a damaged ``.idx`` is an assertion or a numpy traceback, a ``.bin`` shorter
than its index is read past its end mid-run (and a rerun resumes into the same crash), an id beyond the
model's vocabulary is a long ``IndexError`` in the embedding, and a split part without tokens makes
``GPTDataset._get_num_epochs`` loop forever (``while num_tokens < num_tokens_requested: num_tokens += 0``).
:func:`check_training_data` finds each of these first, as a :class:`DataError` naming the file, the problem
and the fix:

* each prefix (every one of a blend): ``.idx`` header (magic, version, dtype), its size against its counts,
  sequence lengths and pointers consistent, the ``.bin``'s size against the last pointer + length x item
  size (:func:`read_index`);
* each split part megatron builds (the train and validation parts of ``--split``, or all of a separate
  ``--valid-data-path``) holds the tokens megatron needs (:func:`check_splits`, with megatron's own split
  arithmetic);
* every token id is below the model's vocabulary (:func:`token_range`: a chunked numpy scan of the whole
  ``.bin``, cached by path, size and mtime where a cache can be written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_resonance import atomic
from megatron_resonance.data.datasets import writable
from megatron_resonance.errors import DataError

# megatron.core (seconds to import) is imported inside the functions that use it: the data checks run without it (and
# without torch).

#: megatron-core's ``_INDEX_HEADER`` and the fixed part of an ``.idx``: magic (9), version (8), dtype code (1),
#: sequence count (8), document-index count (8)
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_HEADER_BYTES = 34
#: megatron-core's ``DType`` codes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}  # fmt: skip
#: the token-range cache, in the index cache directory
TOKEN_RANGE_FILE = "token-ranges.json"
#: a scan of a ``.bin`` larger than this says so first
SCAN_NOTICE_BYTES = 1 << 30
_CHUNK_ITEMS = 1 << 24

_FIX_DATA = "preprocess the data again (tools/preprocess_data.py) or copy it again"


@dataclasses.dataclass
class Index:
    """What an ``.idx`` says of its ``.bin``, checked against it (:func:`read_index`)."""

    prefix: str
    dtype: type
    sequence_lengths: np.ndarray
    bin_size: int

    @property
    def tokens(self) -> int:
        return self.bin_size // np.dtype(self.dtype).itemsize


def read_index(prefix: str) -> Index:
    """The ``.idx`` of ``prefix``, checked as megatron-core's ``_IndexReader`` reads it (which asserts or reads
    past the end instead), and against the ``.bin``'s size; DataError with one line otherwise."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            raise DataError(f"dataset {prefix}: {path} not found")
    bin_size, idx_size = os.path.getsize(bin_), os.path.getsize(idx)
    if bin_size == 0:
        raise DataError(f"dataset {prefix}: {bin_} is empty")
    if idx_size == 0:
        raise DataError(f"dataset {prefix}: {idx} is empty; {_FIX_DATA}")
    with open(idx, "rb") as f:
        header = f.read(INDEX_HEADER_BYTES)
    magic = header[: len(INDEX_MAGIC)]
    if magic != INDEX_MAGIC[: len(magic)]:
        raise DataError(f"dataset {prefix}: {idx} is not a Megatron indexed-dataset index (header {magic!r})")
    if len(header) < INDEX_HEADER_BYTES:
        raise DataError(
            f"dataset {prefix}: {idx} is cut short ({idx_size} bytes, the header alone is "
            f"{INDEX_HEADER_BYTES}); {_FIX_DATA}"
        )
    version, code, sequences, documents = struct.unpack("<QBQQ", header[len(INDEX_MAGIC) :])
    if version != 1:
        raise DataError(f"dataset {prefix}: {idx} has index version {version}; megatron-core reads version 1")
    if code not in DTYPES:
        raise DataError(f"dataset {prefix}: {idx} names token dtype code {code}, which megatron-core does not know")
    expected = INDEX_HEADER_BYTES + 12 * sequences + 8 * documents
    if idx_size != expected:
        cut = "cut short" if idx_size < expected else "longer than its counts"
        raise DataError(
            f"dataset {prefix}: {idx} is {cut}: {idx_size} bytes, its header's {sequences} sequences "
            f"and {documents} document indices need {expected}; {_FIX_DATA}"
        )
    if sequences == 0:
        raise DataError(f"dataset {prefix}: {idx} holds no documents")
    dtype = DTYPES[code]
    itemsize = np.dtype(dtype).itemsize
    lengths = np.memmap(idx, np.int32, mode="r", offset=INDEX_HEADER_BYTES, shape=(sequences,))
    pointers = np.memmap(idx, np.int64, mode="r", offset=INDEX_HEADER_BYTES + 4 * sequences, shape=(sequences,))
    _check_pointers(prefix, idx, lengths, pointers, itemsize)
    described = int(pointers[-1]) + int(lengths[-1]) * itemsize
    if bin_size != described:
        if bin_size < described:
            problem = f"is cut short: {bin_size} bytes, its index {idx} describes {described}"
        else:
            problem = f"is {bin_size} bytes, longer than the {described} its index {idx} describes (another .idx?)"
        raise DataError(f"dataset {prefix}: {bin_} {problem}; {_FIX_DATA}")
    return Index(prefix, dtype, np.asarray(lengths), bin_size)


def _check_pointers(prefix: str, idx: str, lengths, pointers, itemsize: int) -> None:
    """Sequence ``i`` starts where ``i - 1`` ends (what the builder writes), lengths are not negative."""
    start = 0
    for lo in range(0, len(lengths), _CHUNK_ITEMS):
        chunk = np.asarray(lengths[lo : lo + _CHUNK_ITEMS], dtype=np.int64)
        if chunk.min() < 0:
            raise DataError(f"dataset {prefix}: {idx} is damaged (a negative sequence length); {_FIX_DATA}")
        ends = start + np.cumsum(chunk * itemsize)
        starts = np.concatenate(([start], ends[:-1]))
        if not np.array_equal(starts, pointers[lo : lo + _CHUNK_ITEMS]):
            raise DataError(
                f"dataset {prefix}: {idx} is damaged (sequence pointers do not follow the lengths); {_FIX_DATA}"
            )
        start = int(ends[-1])


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------


def split_matrix(split: str, parts: Sequence[bool] = (True, True, False)) -> List[Optional[Tuple[float, float]]]:
    """megatron-core's split matrix of ``split`` (``parse_and_normalize_split`` then
    ``convert_split_vector_to_split_matrix``: the fraction of the sequences each part takes), with the parts
    not in ``parts`` (train, validation, test) set to None so that megatron does not build them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix,
            parse_and_normalize_split,
        )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [bookends if wanted else None for bookends, wanted in zip(matrix, parts)]


def part_sequences(bookends: Tuple[float, float], sequences: int) -> range:
    """The sequences of a split part, as ``BlendedMegatronDatasetBuilder._build_megatron_dataset_splits``
    computes them (``int(round(fraction * count))`` at both ends)."""
    return range(int(round(bookends[0] * float(sequences))), int(round(bookends[1] * float(sequences))))


_PART_NAMES = ("train", "validation", "test")


def check_splits(indexes: Sequence[Index], weighted: bool, matrix, what: str, seq_length: int) -> None:
    """DataError for a split part megatron would build that holds too few tokens.

    ``GPTDataset`` asked for a number of samples (a single prefix or a weighted blend) repeats the part's
    documents until it has the tokens, and with no tokens it never stops; megatron's sample index needs at
    least 2 (an input and its label). An unweighted blend of several prefixes builds one epoch of each,
    and is empty when no prefix's part holds ``seq_length + 1`` tokens."""
    one_epoch = len(indexes) > 1 and not weighted
    for part, bookends in enumerate(matrix):
        if bookends is None:
            continue
        name = _PART_NAMES[part]
        taken = [part_sequences(bookends, len(ix.sequence_lengths)) for ix in indexes]
        tokens = [int(ix.sequence_lengths[r.start : r.stop].sum()) for ix, r in zip(indexes, taken)]
        if one_epoch:
            if sum(max(t - 1, 0) // seq_length for t in tokens) == 0:
                raise DataError(
                    f"{what}: the {name} part holds {sum(tokens)} tokens in all, not one sample of "
                    f"--seq-length {seq_length} + 1; {_fix_split(name, what)}"
                )
            continue
        for ix, count, sequences in zip(indexes, tokens, taken):
            if count < 2:
                raise DataError(
                    f"dataset {ix.prefix}: the {name} part of {what} gets {len(sequences)} of its "
                    f"{len(ix.sequence_lengths)} documents ({count} tokens); {_fix_split(name, what)}"
                )


def _fix_split(name: str, what: str) -> str:
    if what.startswith("--split"):
        more = "--valid-data-path PREFIX, " if name == "validation" else ""
        return f"give more documents, {more}or another --split"
    return "give more documents"


# ----------------------------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------------------------


def id_outside_vocab(low: int, high: int, vocab_size: int) -> Optional[int]:
    """The id of a token range ``[low, high]`` that lies outside ``[0, vocab_size)`` (the highest when both
    ends do), or None: the one rule for training data and evaluation documents."""
    if high >= vocab_size:
        return int(high)
    if low < 0:
        return int(low)
    return None


def token_range(index: Index, cache_dir: Optional[str] = None, log: Callable[[str], None] = print) -> Tuple[int, int]:
    """``(lowest, highest)`` token id in the ``.bin`` of ``index``: a numpy scan in chunks of the whole file
    (a notice first when it is over 1 GB), cached in ``cache_dir/token-ranges.json`` by absolute path, size
    and modification time. A cache that cannot be read or written is skipped (read-only data)."""
    path = os.path.abspath(index.prefix + ".bin")
    stat = os.stat(path)
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": np.dtype(index.dtype).name}
    cache = os.path.join(cache_dir, TOKEN_RANGE_FILE) if cache_dir else None
    records = _read_cache(cache)
    record = records.get(path)
    if isinstance(record, dict) and all(record.get(k) == v for k, v in key.items()):
        return int(record["min"]), int(record["max"])
    if stat.st_size > SCAN_NOTICE_BYTES:
        log(f"[data] checking the token ids of {path} ({stat.st_size / 1e9:.1f} GB)")
    start = time.perf_counter()
    tokens = np.memmap(path, index.dtype, mode="r", shape=(index.tokens,))
    low, high = None, None
    for lo in range(0, len(tokens), _CHUNK_ITEMS):
        chunk = tokens[lo : lo + _CHUNK_ITEMS]
        high = max(int(chunk.max()), high if high is not None else int(chunk.max()))
        if np.issubdtype(index.dtype, np.signedinteger) or np.issubdtype(index.dtype, np.floating):
            low = min(int(chunk.min()), low if low is not None else int(chunk.min()))
    low = 0 if low is None else low
    if stat.st_size > SCAN_NOTICE_BYTES:
        log(f"[data] token ids {low}..{high} ({stat.st_size / 1e9 / (time.perf_counter() - start):.1f} GB/s)")
    if cache:
        records[path] = {**key, "min": low, "max": high}
        _write_cache(cache, records)
    return low, high


def _read_cache(path: Optional[str]) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        return records if isinstance(records, dict) else {}
    except (OSError, TypeError, ValueError):
        return {}


def _write_cache(path: str, records: dict) -> None:
    try:
        atomic.write_json(path, records)
    except OSError:  # read-only data: no cache, the next start scans again
        pass


# ----------------------------------------------------------------------------------------------------------
# The whole check
# ----------------------------------------------------------------------------------------------------------


def path_items(value: str) -> List[str]:
    """A ``--data-path`` value as Megatron-LM's ``--data-path`` list: one prefix, or the blend syntax in one
    string, ``"P1 P2"`` or ``"W1 P1 W2 P2"`` (a path with spaces that exists is one prefix)."""
    return [value] if any(os.path.isfile(value + ext) for ext in (".bin", ".idx")) else value.split()


def blend_of(value: str) -> Tuple[List[str], Optional[List[float]]]:
    """megatron-core's blend ``(prefixes, weights)`` of a ``--data-path`` value (:func:`path_items`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.utils import get_blend_from_list

    items = path_items(value)
    try:
        return get_blend_from_list(items)
    except AssertionError:  # weights for some prefixes only
        raise DataError(
            f"--data-path {value!r}: neither a prefix nor Megatron-LM's blend syntax (P1 P2 ..., or W1 P1 W2 P2 ...)"
        ) from None


def check_training_data(
    data_path: str,
    valid_data_path: Optional[str],
    *,
    split: str,
    with_validation: bool,
    seq_length: int,
    vocab_size: int,
    cache_dir: Optional[str] = None,
    fallback_cache_dir: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> None:
    """DataError with one line for data the trainer cannot train on (see the module docstring).

    ``data_path`` alone is divided by ``split``; with ``valid_data_path`` each is used whole. Cheap checks
    come first for every prefix, the token scans last. ``cache_dir``: where the token-range cache goes
    (``--data-cache-path``; default ``index-cache`` beside each ``.bin``, where the trainer's index cache
    goes, or ``fallback_cache_dir`` where that cannot be written, as for the index cache)."""
    sources = [("--data-path", data_path)] + ([("--valid-data-path", valid_data_path)] if valid_data_path else [])
    blends = [(flag, blend_of(value)) for flag, value in sources]
    indexes = {p: read_index(p) for _, (prefixes, _) in blends for p in prefixes}
    if valid_data_path:
        for part, (flag, (prefixes, weights)) in enumerate(blends):
            if part == 0 or with_validation:
                whole = [(0.0, 1.0) if i == part else None for i in range(3)]
                check_splits([indexes[p] for p in prefixes], weights is not None, whole, flag, seq_length)
    else:
        prefixes, weights = blends[0][1]
        matrix = split_matrix(split, (True, with_validation, False))
        if with_validation and matrix[1] is None:
            raise DataError(
                f"--split {split} leaves no validation part of --data-path; give it a validation "
                "weight (e.g. 98,2,0), --valid-data-path PREFIX, or --eval-iters 0"
            )
        check_splits([indexes[p] for p in prefixes], weights is not None, matrix, f"--split {split}", seq_length)
    for prefix, index in indexes.items():
        beside = os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
        directory = cache_dir or next((d for d in (beside, fallback_cache_dir) if d and writable(d)), None)
        low, high = token_range(index, directory, log)
        bad = id_outside_vocab(low, high, vocab_size)
        if bad is not None:
            raise DataError(
                f"dataset {prefix}: {prefix}.bin holds token id {bad} outside the model's vocabulary "
                f"(size {vocab_size}): data preprocessed with another tokenizer? Preprocess it with "
                "this run's --tokenizer-model"
            )
