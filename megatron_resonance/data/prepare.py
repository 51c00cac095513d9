"""The default data, end to end: stdlib corpus -> SentencePiece tokenizer -> train/valid indexed datasets.

One call for ``make demo`` and the tests. The directory it fills::

    OUTPUT_DIR/train.jsonl, valid.jsonl, manifest.json    the corpus (megatron_resonance.data.corpus)
    OUTPUT_DIR/tokenizer.model, tokenizer.vocab           the BPE tokenizer (…data.tokenizer)
    OUTPUT_DIR/train.bin/.idx, valid.bin/.idx             the indexed datasets (…data.preprocess)
    OUTPUT_DIR/prepare.json                               the settings, written last

A second call with the same settings on the same Python reuses everything (``prepare.json`` matches and
every file exists); any difference rebuilds all of it.

    python tools/prepare_data.py --output-dir data/stdlib
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_resonance.cli import check_output_dir
from megatron_resonance.data.corpus import (
    DEFAULT_MAX_TRAIN_BYTES,
    DEFAULT_MAX_VALID_BYTES,
    DEFAULT_MIN_BYTES,
    DEFAULT_VALID_FRACTION,
    build_stdlib_corpus,
)
from megatron_resonance.data.preprocess import preprocess
from megatron_resonance.data.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, train_tokenizer


@dataclass
class DefaultData:
    """Paths of the prepared data, ready for ``build_gpt_datasets`` and the trainer."""

    train_prefix: str
    valid_prefix: str
    tokenizer_model: str
    vocab_size: int
    eod_id: int
    train_tokens: int
    valid_tokens: int


def _paths(out: Path, **counts) -> DefaultData:
    return DefaultData(
        train_prefix=str(out / "train"),
        valid_prefix=str(out / "valid"),
        tokenizer_model=str(out / "tokenizer.model"),
        **counts,
    )


def prepare_default_data(
    output_dir,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_train_bytes: Optional[int] = DEFAULT_MAX_TRAIN_BYTES,
    max_valid_bytes: Optional[int] = DEFAULT_MAX_VALID_BYTES,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    min_bytes: int = DEFAULT_MIN_BYTES,
    workers: int = 1,
    root: Optional[Path] = None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = print,
) -> DefaultData:
    """Build (or reuse) the embedded default data in ``output_dir``; see the module docstring.

    ``vocab_size`` is the tokenizer's; the other size arguments are the corpus's
    (:func:`~megatron_resonance.data.corpus.build_stdlib_corpus`); ``workers`` tokenizer processes.
    """
    say = log or (lambda _: None)
    check_output_dir(output_dir, "output directory")
    out = Path(output_dir)
    settings = dict(
        python_version=platform.python_version(),
        root=str(root) if root is not None else None,
        vocab_size=vocab_size,
        max_train_bytes=max_train_bytes,
        max_valid_bytes=max_valid_bytes,
        valid_fraction=valid_fraction,
        min_bytes=min_bytes,
    )
    stamp = out / "prepare.json"
    names = ["train.jsonl", "valid.jsonl", "tokenizer.model"] + [
        f"{split}.{ext}" for split in ("train", "valid") for ext in ("bin", "idx")
    ]
    if stamp.exists() and all((out / n).exists() for n in names):
        recorded = json.loads(stamp.read_text())
        if recorded.get("settings") == settings:
            say(f"reusing the prepared data in {out}")
            return _paths(out, **recorded["counts"])
    stamp.unlink(missing_ok=True)

    manifest = build_stdlib_corpus(
        out,
        valid_fraction=valid_fraction,
        max_train_bytes=max_train_bytes,
        max_valid_bytes=max_valid_bytes,
        min_bytes=min_bytes,
        root=root,
    )
    say(
        f"corpus: {manifest.train.documents} train files ({manifest.train.num_bytes / 1e6:.2f} MB), "
        f"{manifest.valid.documents} valid files ({manifest.valid.num_bytes / 1e6:.2f} MB) from "
        f"{manifest.stdlib_root}"
    )
    model = train_tokenizer([out / "train.jsonl"], out / "tokenizer", vocab_size=vocab_size)
    tokenizer = Tokenizer(model)
    say(f"tokenizer: {model} (vocab_size {tokenizer.vocab_size})")
    tokens = {}
    for split in ("train", "valid"):
        stats = preprocess(
            [out / f"{split}.jsonl"], out / split, model, workers=workers, overwrite=True, progress=progress, log=log
        )
        tokens[split] = stats.tokens
    counts = dict(
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eos_id,
        train_tokens=tokens["train"],
        valid_tokens=tokens["valid"],
    )
    stamp.write_text(json.dumps({"settings": settings, "counts": counts}, indent=1) + "\n")
    return _paths(out, **counts)
