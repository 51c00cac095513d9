"""SentencePiece tokenizers: train the small BPE model of the embedded corpus, load it or LLaMA's.

The trained model is lossless on source code: ``decode(encode(text)) == text`` for any text that does not
itself contain SentencePiece's meta symbol U+2581 ("▁", decoded as a space; LLaMA's tokenizer has the same
limit). That takes

* ``normalization_rule_name="identity"`` and ``remove_extra_whitespaces=False``: no NFKC folding, no
  whitespace squeezing, so indentation, tabs, ``\\r`` and trailing spaces survive;
* ``add_dummy_prefix=False``: no invented leading space;
* ``byte_fallback=True``: a character outside the vocabulary becomes its UTF-8 bytes (``<0x..>``), never
  ``<unk>``;
* training sentences that keep their newlines (documents are cut at line ends into chunks), so pieces like
  ``"):\\n"`` or ``"\\n\\n"`` exist and a newline is not a byte-fallback token;
* ``split_by_whitespace=False`` and ``allow_whitespace_only_pieces=True``: indentation runs and
  ``"▁▁▁▁def"``-like pieces (about 6 % fewer tokens on Python source than splitting at whitespace);
* ``split_digits=True`` as LLaMA does.

Special ids follow LLaMA: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad. The same :class:`Tokenizer` loads
LLaMA's ``tokenizer.model`` (which adds a dummy prefix; its decode strips it again).

    python tools/train_tokenizer.py --input data/stdlib/train.jsonl --model-prefix data/stdlib/spm2048
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import sentencepiece as spm

DEFAULT_VOCAB_SIZE = 2048
#: training sentences are documents cut at line ends into pieces of at most this many characters
TRAIN_CHUNK_CHARS = 4096


class Tokenizer:
    """A loaded SentencePiece model with the ids the data pipeline and the trainer need.

    Args:
        model_path: a SentencePiece ``.model`` file (ours or LLaMA's ``tokenizer.model``).
    """

    def __init__(self, model_path):
        self.path = str(model_path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"not a SentencePiece model: {self.path} ({err})") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids (pieces), byte-fallback and special pieces included."""
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End of sentence; the preprocessor appends it after every document (Megatron's ``eod``)."""
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model has no pad piece (ours and LLaMA's)."""
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Token ids of ``text``, optionally framed by BOS / EOS."""
        ids = self.sp.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, NumPy array or tensor); control ids (BOS/EOS) decode to nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _line_chunks(text: str, max_chars: int = TRAIN_CHUNK_CHARS) -> Iterator[str]:
    """Cut ``text`` at line ends into pieces of at most ``max_chars`` (a longer single line: alone)."""
    buf = []
    size = 0
    for line in text.splitlines(keepends=True):
        if buf and size + len(line) > max_chars:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def iter_training_texts(inputs: Sequence, json_key: str = "text") -> Iterator[str]:
    """Documents of ``inputs``: JSONL files (``.jsonl``/``.json``, one ``{json_key: ...}`` per line) or
    plain text files (one document each)."""
    for path in map(Path, inputs):
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)[json_key]
        else:
            yield path.read_text(encoding="utf-8")


def trainer_options(vocab_size: int = DEFAULT_VOCAB_SIZE, num_threads: Optional[int] = None) -> dict:
    """The ``SentencePieceTrainer`` options of the default tokenizer (see the module docstring)."""
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=4 * TRAIN_CHUNK_CHARS + 16,  # bytes; longer sentences would be dropped
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads or min(os.cpu_count() or 1, 8),
        minloglevel=2,
    )


def train_tokenizer(
    inputs: Sequence,
    model_prefix,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    json_key: str = "text",
    max_sentences: int = 0,
    num_threads: Optional[int] = None,
) -> Path:
    """Train the byte-fallback BPE model on ``inputs`` and write ``<model_prefix>.model`` and ``.vocab``.

    Args:
        inputs: JSONL or text files (see :func:`iter_training_texts`).
        model_prefix: output path without extension; parent directories are created.
        vocab_size: total ids, including 3 special and 256 byte pieces (so at least ~300).
        max_sentences: if > 0, SentencePiece samples this many training chunks (for big corpora).

    Returns:
        The path of the ``.model`` file.

    Raises:
        ValueError: no text, or a vocabulary too large for the corpus (SentencePiece's message).
    """
    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    chunks = (c for text in iter_training_texts(inputs, json_key) for c in _line_chunks(text))
    options = trainer_options(vocab_size, num_threads)
    if max_sentences:
        options.update(input_sentence_size=max_sentences, shuffle_input_sentence=True)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=chunks, model_writer=proto, **options)
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training failed: {str(err).strip().splitlines()[-1]}") from None
    model_path.write_bytes(proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    with open(f"{model_prefix}.vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return model_path
