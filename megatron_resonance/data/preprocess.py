"""Tokenize documents into a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

The files are written by megatron-core's ``IndexedDatasetBuilder``, so Megatron-LM, megatron-core's
``GPTDataset`` and :func:`megatron_resonance.data.build_gpt_datasets` all read them. As Megatron-LM's
``tools/preprocess_data.py``: one sequence per document (``lengths = [len(ids)]``), EOS appended to each
document unless disabled, token dtype ``uint16`` below 65,500 ids and ``int32`` above (Llama-3's 128,256;
megatron-core's ``IndexedDataset`` reads the dtype back from the ``.idx`` header).

Inputs are JSONL files (``.jsonl``/``.json``; one ``{"text": ...}`` object per line) or any other file,
which is one document. Empty documents are skipped: a zero-length sequence makes ``GPTDataset``'s sample
index loop forever. Tokenization runs in a ``multiprocessing`` pool whose ``imap`` keeps input order, so
the output is byte-identical for any worker count.

Output is written to temporary files and renamed at the very end: a failed or interrupted run leaves any
existing dataset untouched.

    python tools/preprocess_data.py --input data/stdlib/train.jsonl --output-prefix data/stdlib/train \
        --tokenizer-model data/stdlib/spm2048.model --workers 2
    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/llama3/train \
        --tokenizer-model hf/Meta-Llama-3-8B            # or .../tokenizer.json
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from megatron_resonance.cli import check_output_dir, jsonl_records
from megatron_resonance.data.tokenizer import Tokenizer, load_tokenizer
from megatron_resonance.errors import UserError

# megatron.core (seconds to import) is imported inside the functions that use it: the tool's --help and input checks
# run without it.

JSONL_SUFFIXES = (".jsonl", ".json")


def token_dtype(vocab_size: int) -> type:
    """Token dtype of the ``.bin`` file, as Megatron-LM picks it (``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class PreprocessStats:
    """What :func:`preprocess` wrote and how fast."""

    output_prefix: str
    documents: int
    empty_skipped: int
    tokens: int
    text_bytes: int
    seconds: float
    workers: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def megabytes_per_second(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"wrote {self.output_prefix}.bin/.idx: {self.documents} documents "
            f"({self.empty_skipped} empty skipped), {self.tokens} tokens, "
            f"{self.text_bytes / 1e6:.2f} MB text "
            f"in {self.seconds:.2f} s with {self.workers} worker(s): {self.tokens_per_second:,.0f} tokens/s, "
            f"{self.megabytes_per_second:.2f} MB/s"
        )


# ---------------------------------------------------------------- input -----------------------------------


def check_inputs(inputs: Sequence) -> List[Path]:
    """The input paths; raises :class:`UserError` for none, a missing one or an empty one."""
    paths = [Path(p) for p in inputs if str(p)]
    if not paths:
        raise UserError("no input files given")
    for path in paths:
        if not path.exists():
            raise UserError(f"input not found: {path}")
        if not path.is_file():
            raise UserError(f"input is not a file: {path}")
        if path.stat().st_size == 0:
            raise UserError(f"input is empty: {path}")
    return paths


def iter_documents(paths: Sequence[Path], json_key: str = "text") -> Iterator[str]:
    """Documents in order; raises :class:`UserError` on undecodable text, bad JSON, a missing key or a text
    with a lone surrogate."""
    for path in paths:
        if path.suffix not in JSONL_SUFFIXES:
            try:
                yield path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            continue
        for lineno, record in jsonl_records(path):
            if not isinstance(record, dict) or json_key not in record:
                raise UserError(f"{path}:{lineno}: no key {json_key!r} (set --json-key)")
            text = record[json_key]
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, not a string")
            try:  # JSON's "\ud800" (half a UTF-16 pair) decodes to a str that no tokenizer can encode
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise UserError(
                    f"{path}:{lineno}: {json_key!r} is not Unicode text (a lone surrogate "
                    f"{text[err.start]!r} at character {err.start})"
                ) from None
            yield text


def count_documents(paths: Sequence[Path]) -> int:
    """Upper bound for the progress bar: lines of JSONL files plus one per text file."""
    total = 0
    for path in paths:
        if path.suffix in JSONL_SUFFIXES:
            with open(path, "rb") as f:
                total += sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))
        else:
            total += 1
    return total


# ---------------------------------------------------------------- workers ---------------------------------

_WORKER: dict = {}


def _init_worker(model, append_eod: bool) -> None:
    """``model``: the tokenizer's path (a pool process loads it) or the loaded :class:`Tokenizer`."""
    tok = model if isinstance(model, Tokenizer) else Tokenizer(model)
    _WORKER.update(tokenizer=tok, append_eod=append_eod, dtype=token_dtype(tok.vocab_size))


def _encode(text: str) -> Tuple[bytes, int, int]:
    """(token bytes in the .bin dtype, token count, UTF-8 text bytes) of one document; empty text -> 0."""
    tok = _WORKER["tokenizer"]
    ids = tok.encode(text) if text else []
    if ids and _WORKER["append_eod"]:
        ids.append(tok.eos_id)
    return np.asarray(ids, dtype=_WORKER["dtype"]).tobytes(), len(ids), len(text.encode("utf-8"))


# ---------------------------------------------------------------- main ------------------------------------


def output_paths(output_prefix) -> Tuple[Path, Path]:
    prefix = str(output_prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def preprocess(
    inputs: Sequence,
    output_prefix,
    tokenizer_model,
    *,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    chunksize: int = 8,
    log: Optional[Callable[[str], None]] = print,
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``output_prefix.bin`` / ``output_prefix.idx``.

    Args:
        inputs: JSONL and/or text files, read in the given order.
        output_prefix: path without extension; parent directories are created.
        tokenizer_model: SentencePiece ``.model`` (ours or LLaMA's), Hugging Face ``tokenizer.json`` (Llama-3)
            or a directory with either (see :class:`~megatron_resonance.data.tokenizer.Tokenizer`).
        json_key: field holding the text in JSONL records.
        workers: tokenizer processes (1: tokenize in this process). The output does not depend on it.
        append_eod: append the tokenizer's EOS id after every document.
        overwrite: replace an existing ``.bin``/``.idx`` (refused otherwise).
        progress: show a tqdm progress bar on stderr (only when it is a terminal).
        log: where the final summary line goes (None: nowhere).

    Returns:
        Counts and throughput. Raises :class:`megatron_resonance.cli.UserError` on bad input, before
        anything is written, or, for bad content found while reading, before the output is replaced.
    """
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    paths = check_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_model)
    if append_eod and tokenizer.eos_id is None:
        raise UserError(f"the tokenizer {tokenizer_model} has no EOS token to end documents with (pass --no-eod)")
    if str(output_prefix).endswith(("/", os.sep)) or Path(output_prefix).is_dir():
        raise UserError(f"output prefix is a directory, expected a path prefix: {output_prefix}")
    bin_path, idx_path = output_paths(output_prefix)
    check_output_dir(bin_path.parent, "output prefix", output_prefix)  # under a file, or unwritable
    existing = [str(p) for p in (bin_path, idx_path) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"output exists: {', '.join(existing)} (pass --overwrite to replace it)")
    bin_path.parent.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings():  # megatron.core's import warns about missing TE/Apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(tokenizer.vocab_size)
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = Path(str(bin_path) + tag), Path(str(idx_path) + tag)
    documents = empty = tokens = text_bytes = 0
    start = time.perf_counter()
    pool = builder = None
    # no bar when stderr is not a terminal (logs, CI): an error then stays the only line there
    show = progress and sys.stderr.isatty()
    bar = tqdm(total=count_documents(paths) if show else None, unit="doc", disable=not show, dynamic_ncols=True)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        docs = iter_documents(paths, json_key)
        if workers > 1:
            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer.path, append_eod))
            encoded = pool.imap(_encode, docs, chunksize=chunksize)
        else:
            _init_worker(tokenizer, append_eod)
            encoded = map(_encode, docs)
        for data, n, nbytes in encoded:
            bar.update(1)
            text_bytes += nbytes
            if n == 0:
                empty += 1
                continue
            builder.add_document(np.frombuffer(data, dtype=dtype), [n])
            documents += 1
            tokens += n
        if documents == 0:
            raise UserError(f"no non-empty documents in {', '.join(map(str, paths))}")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        bar.leave = False  # clear the bar so the error line stands alone
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    stats = PreprocessStats(
        output_prefix=str(output_prefix),
        documents=documents,
        empty_skipped=empty,
        tokens=tokens,
        text_bytes=text_bytes,
        seconds=time.perf_counter() - start,
        workers=workers,
    )
    if log is not None:
        log(stats.summary())
    return stats
