"""Evaluation documents (token arrays) from an indexed dataset, JSONL or the embedded default, and their windows.

Sources (``--data``):

* an indexed-dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``, as ``tools/preprocess_data.py`` writes):
  every sequence, cut at the tokenizer's EOS when a tokenizer is known (the EOS itself is dropped);
* a JSONL file, one object per line: ``{"tokens": [ids...]}`` as is, or ``{"text": ...}`` tokenized
  (no BOS/EOS added);
* nothing: the embedded default's held-out documents, i.e. the standard-library files that
  ``megatron_resonance.data.corpus`` puts in the validation split (the same files as ``valid.jsonl`` of
  ``tools/prepare_data.py`` with default settings), tokenized.

Windows: the first ``L`` tokens of every document of at least ``L`` tokens, or (``stride``) a sliding
window over each such document (see :func:`windows`).
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_resonance.cli import jsonl_records, one_line
from megatron_resonance.data.checks import id_outside_vocab
from megatron_resonance.data.corpus import list_stdlib_sources, select_files, stdlib_root
from megatron_resonance.data.tokenizer import Tokenizer
from megatron_resonance.errors import UserError

# megatron.core (seconds to import) is imported inside the functions that use it: only an indexed-dataset input needs
# it.

JSONL_SUFFIXES = (".jsonl", ".json")


# ----------------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------------


def data_kind(data: Optional[str]) -> str:
    """``default``, ``jsonl`` or ``indexed``; raises UserError for a path that is neither."""
    if data is None:
        return "default"
    if data.endswith(JSONL_SUFFIXES):
        if not os.path.isfile(data):
            raise UserError(f"--data {data}: file not found")
        return "jsonl"
    prefix = _indexed_prefix(data)
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise UserError(
                f"--data {data}: not a JSONL file and {prefix + ext} not found (expected an "
                "indexed-dataset prefix PATH of PATH.bin/PATH.idx)"
            )
    return "indexed"


def _indexed_prefix(data: str) -> str:
    return data[:-4] if data.endswith((".bin", ".idx")) else data


def needs_tokenizer(data: Optional[str]) -> bool:
    """Whether the documents of ``data`` are text (default data, or a JSONL file with a ``text`` line)."""
    kind = data_kind(data)
    if kind == "default":
        return True
    if kind == "indexed":
        return False
    for obj in _jsonl(data):
        return "tokens" not in obj
    return False


def _jsonl(path: str) -> Iterator[dict]:
    for number, obj in jsonl_records(path, "--data "):
        if not isinstance(obj, dict) or not ("tokens" in obj or "text" in obj):
            raise UserError(f'--data {path}:{number}: expected an object with "tokens" or "text"')
        yield obj


def default_texts() -> List[str]:
    """The embedded default's held-out documents: the validation split of the standard-library corpus."""
    root = stdlib_root()
    _, valid = select_files(list_stdlib_sources(root))
    return [(root / src.relpath).read_bytes().decode("utf-8") for src in valid]


def load_documents(data: Optional[str], tokenizer: Optional[Tokenizer] = None) -> List[np.ndarray]:
    """Token arrays (int64) of the documents of ``data`` (see the module docstring), in file order.

    Text needs ``tokenizer`` (a :class:`~megatron_resonance.data.tokenizer.Tokenizer`: SentencePiece or Hugging
    Face); an indexed dataset is cut at its EOS when ``tokenizer`` is given."""
    kind = data_kind(data)
    if kind == "indexed":
        return _indexed_documents(_indexed_prefix(data), tokenizer.eos_id if tokenizer else None)
    if kind == "default":
        if tokenizer is None:
            raise UserError("the default data (held-out standard-library files) is text: pass --tokenizer")
        return [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in default_texts()]
    docs = []
    for number, obj in enumerate(_jsonl(data), 1):
        if "tokens" in obj:
            try:
                docs.append(np.asarray(obj["tokens"], dtype=np.int64).reshape(-1))
            except (TypeError, ValueError):
                raise UserError(f'--data {data}: document {number}: "tokens" must be a list of ids') from None
        else:
            if tokenizer is None:
                raise UserError(f"--data {data} holds text: pass --tokenizer (no tokenizer found with the model)")
            docs.append(np.asarray(tokenizer.encode(str(obj["text"])), dtype=np.int64))
    return docs


def _indexed_documents(prefix: str, eos_id: Optional[int]) -> List[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):  # megatron cannot map an empty file
        if os.path.getsize(prefix + ext) == 0:
            raise UserError(f"--data {prefix}: {prefix}{ext} is empty (no documents)")
    # made in two steps to keep hold of it: megatron's __del__ of a dataset (or bin reader) whose __init__
    # failed raises AttributeError, a dozen lines of "Exception ignored in" after the error line at exit
    dataset = IndexedDataset.__new__(IndexedDataset)
    try:
        dataset.__init__(prefix, mmap=True)
    except Exception as e:  # noqa: BLE001 - a corrupt index is one error line
        for name in ("bin_reader", "index"):
            dataset.__dict__.setdefault(name, None)
        raise UserError(f"--data {prefix}: unreadable indexed dataset ({one_line(e)})") from None
    docs = []
    for i in range(len(dataset)):
        seq = np.asarray(dataset[i], dtype=np.int64)
        if eos_id is None:
            docs.append(seq)
            continue
        cuts = np.flatnonzero(seq == eos_id)
        start = 0
        for cut in list(cuts) + [len(seq)]:
            if cut > start:
                docs.append(seq[start:cut])
            start = cut + 1
    return docs


def check_token_range(docs: Sequence[np.ndarray], vocab_size: int, where: str) -> None:
    """UserError when a document holds an id outside ``[0, vocab_size)``."""
    for i, doc in enumerate(docs):
        bad = id_outside_vocab(doc.min(), doc.max(), vocab_size) if len(doc) else None
        if bad is not None:
            raise UserError(
                f"{where}: document {i} holds token id {bad} outside the model's vocabulary (size {vocab_size})"
            )


# ----------------------------------------------------------------------------------------------------------
# Selection and windows
# ----------------------------------------------------------------------------------------------------------


def select(
    docs: Sequence[np.ndarray], length: int, *, seed: int = 0, max_documents: Optional[int] = None
) -> Tuple[List[int], int]:
    """Indices of the documents used at ``length``, and how many were skipped as shorter than it.

    Documents are visited in one fixed order per seed, ``numpy.random.default_rng(seed).permutation``;
    the first ``max_documents`` (default: all) with at least ``length`` tokens are used. Every length
    and every model of a run draws from the same order, so a shorter length uses a superset of the
    documents of a longer one when ``max_documents`` is not binding."""
    order = np.random.default_rng(seed).permutation(len(docs))
    used = [int(i) for i in order if len(docs[i]) >= length]
    skipped = len(docs) - len(used)
    if max_documents is not None:
        used = used[:max_documents]
    return used, skipped


def windows(doc_length: int, length: int, stride: Optional[int] = None) -> List[Tuple[int, int]]:
    """``(start, first_scored)`` of each ``length``-token window over a document of ``doc_length`` tokens.

    The window is ``doc[start:start+length]``; the tokens it scores are ``first_scored .. start+length-1``
    (a window's own first token has no prediction in it). Without ``stride``: one window, the first
    ``length`` tokens. With ``stride`` (Hugging Face's strided perplexity, every window full-length):
    window k starts at ``min(k * stride, doc_length - length)`` and scores only the tokens no earlier
    window scored. With ``stride < length`` every token after the first is scored exactly once, with at
    least ``length - stride`` tokens of context after the first window; ``stride == length`` is disjoint
    chunks, each scoring its ``length - 1`` predictions."""
    if doc_length < length:
        return []
    if stride is None:
        return [(0, 1)]
    out, scored_to, k = [], 1, 0
    while scored_to < doc_length:
        start = min(k * stride, doc_length - length)
        out.append((start, max(scored_to, start + 1)))
        scored_to = start + length
        k += 1
    return out
