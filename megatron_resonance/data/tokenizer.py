"""Tokenizers: train the small SentencePiece BPE model of the embedded corpus; load it, LLaMA's, or a Hugging
Face ``tokenizer.json`` (Llama-3's byte-level BPE) through one :class:`Tokenizer`.

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
LLaMA's ``tokenizer.model`` (which adds a dummy prefix; its decode strips it again), and a Hugging Face
``tokenizer.json`` or tokenizer directory (Llama-3 and most current LLaMA-architecture models).

    python tools/train_tokenizer.py --input data/stdlib/train.jsonl --model-prefix data/stdlib/spm2048
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import sentencepiece as spm

from megatron_resonance.cli import one_line
from megatron_resonance.errors import DataError, UserError

# transformers (the optional ``hf`` extra) is imported where a Hugging Face tokenizer is loaded;
# data.preprocess inside iter_training_texts, since it imports this module (a cycle at module level).

DEFAULT_VOCAB_SIZE = 2048
#: training sentences are documents cut at line ends into pieces of at most this many characters
TRAIN_CHUNK_CHARS = 4096


#: Hugging Face tokenizer files: ``tokenizer.json`` (the fast tokenizer, e.g. Llama-3's byte-level BPE) and
#: the settings naming its special tokens
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
#: special tokens looked up by name when no tokenizer config names them (a bare ``tokenizer.json``)
KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
KNOWN_EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


def tokenizer_kind(path) -> str:
    """``"sentencepiece"`` or ``"huggingface"`` for a tokenizer path (see :class:`Tokenizer`); the file or
    directory must exist. A directory is Hugging Face when it holds ``tokenizer.json``, else SentencePiece
    when it holds ``tokenizer.model``; a JSON file is a ``tokenizer.json``; any other file SentencePiece."""
    path = Path(path)
    if path.is_dir():
        if (path / HF_TOKENIZER_FILE).is_file():
            return "huggingface"
        if (path / "tokenizer.model").is_file():
            return "sentencepiece"
        raise DataError(
            f"no tokenizer in {path}: expected {HF_TOKENIZER_FILE} (Hugging Face) or tokenizer.model (SentencePiece)"
        )
    if path.suffix == ".json":
        return "huggingface"
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return "huggingface" if head.startswith(b"{") else "sentencepiece"


class Tokenizer:
    """A loaded tokenizer with the ids the data pipeline, the trainer and the evaluation need.

    Two backends behind one interface (``encode``, ``decode``, ``vocab_size``, ``bos_id``, ``eos_id``):

    * SentencePiece: a ``.model`` file (ours or LLaMA-2's ``tokenizer.model``), or a directory holding one;
    * Hugging Face (as Megatron-LM's ``HuggingFaceTokenizer``, through ``transformers.AutoTokenizer``): a
      ``tokenizer.json`` (Llama-3's byte-level BPE and most current models) or a directory holding one. Its
      ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it name BOS and EOS (Llama-3:
      ``<|begin_of_text|>``, ``<|end_of_text|>``); a bare ``tokenizer.json`` falls back to the usual names
      (``KNOWN_BOS`` / ``KNOWN_EOS``). The vocabulary size is ``len(tokenizer)``, added tokens included.

    ``encode`` never adds special tokens by itself (a Hugging Face post-processor's BOS is not added either):
    BOS / EOS only when asked for. ``bos_id`` / ``eos_id`` / ``pad_id`` / ``unk_id`` are None when the
    tokenizer has no such token.

    Args:
        model_path: a SentencePiece ``.model``, a Hugging Face ``tokenizer.json``, or a directory with either.

    Raises:
        FileNotFoundError: nothing at ``model_path``.
        DataError: it is neither kind of tokenizer, or it cannot be loaded (one line).
    """

    def __init__(self, model_path):
        self.path = str(model_path)
        path = Path(self.path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.kind = tokenizer_kind(path)
        self.sp = self.hf = None
        if self.kind == "huggingface":
            self.hf = _load_hf(path)
            return
        model = path / "tokenizer.model" if path.is_dir() else path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model))
        except (OSError, RuntimeError) as err:
            raise DataError(
                f"not a SentencePiece model (nor a Hugging Face {HF_TOKENIZER_FILE}): {self.path} "
                f"({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__})"
            ) from None

    @property
    def vocab_size(self) -> int:
        """Number of ids: SentencePiece pieces (byte-fallback and special pieces included), or the Hugging Face
        vocabulary with its added tokens."""
        return self.sp.get_piece_size() if self.sp is not None else len(self.hf)

    @staticmethod
    def _id(value) -> Optional[int]:
        return None if value is None or value < 0 else int(value)

    @property
    def bos_id(self) -> Optional[int]:
        return self._id(self.sp.bos_id() if self.sp is not None else self._hf_special("bos", KNOWN_BOS))

    @property
    def eos_id(self) -> Optional[int]:
        """End of sentence; the preprocessor appends it after every document (Megatron's ``eod``)."""
        return self._id(self.sp.eos_id() if self.sp is not None else self._hf_special("eos", KNOWN_EOS))

    @property
    def pad_id(self) -> Optional[int]:
        """None when the tokenizer has no pad token (ours, LLaMA's and Llama-3's)."""
        return self._id(self.sp.pad_id() if self.sp is not None else self.hf.pad_token_id)

    @property
    def unk_id(self) -> Optional[int]:
        return self._id(self.sp.unk_id() if self.sp is not None else self.hf.unk_token_id)

    def _hf_special(self, which: str, known: Sequence[str]) -> Optional[int]:
        found = getattr(self.hf, f"{which}_token_id")
        if found is not None:
            return found
        vocab = self.hf.get_vocab()
        return next((vocab[name] for name in known if name in vocab), None)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Token ids of ``text``, optionally framed by BOS / EOS."""
        if self.sp is not None:
            ids = self.sp.encode(text)
        else:
            ids = list(self.hf.encode(text, add_special_tokens=False))
        for wanted, name, token in ((bos, "BOS", self.bos_id), (eos, "EOS", self.eos_id)):
            if wanted and token is None:
                raise DataError(f"the tokenizer {self.path} has no {name} token")
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, NumPy array or tensor); special ids (BOS/EOS) decode to nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def id_to_piece(self, token_id: int) -> str:
        if self.sp is not None:
            return self.sp.id_to_piece(int(token_id))
        return self.hf.convert_ids_to_tokens(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, {self.kind}, vocab_size={self.vocab_size})"


def _load_hf(path: Path):
    """``transformers.AutoTokenizer`` over a directory with ``tokenizer.json``, or a ``tokenizer.json``: with the
    tokenizer config beside it when there is one (that names the special tokens), else the bare file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import transformers
    except ImportError:
        raise DataError(f"{path}: a Hugging Face tokenizer needs transformers (pip install -e '.[hf]')") from None
    directory = path if path.is_dir() else path.parent
    with_config = path.is_dir() or (
        path.name == HF_TOKENIZER_FILE and any((directory / name).is_file() for name in HF_CONFIG_FILES)
    )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" and similar notes
    try:
        if with_config:
            return transformers.AutoTokenizer.from_pretrained(str(directory))
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as err:  # noqa: BLE001 - any loader failure is one error line
        raise DataError(f"not a Hugging Face tokenizer (nor a SentencePiece model): {path} ({one_line(err)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_tokenizer(path, what: str = "tokenizer") -> Tokenizer:
    """:class:`Tokenizer` with a missing or unreadable tokenizer as one-line
    :class:`~megatron_resonance.errors.DataError` (``what`` names it, e.g. the flag). Loaded once per process
    while its files are unchanged (the evaluation checks ``--tokenizer`` first, then uses it)."""
    try:
        return _cached_tokenizer(os.path.abspath(path), _stamp(Path(path)))
    except FileNotFoundError as err:
        raise DataError(str(err) if what == "tokenizer" else f"{what} {path}: no such file or directory") from None
    except DataError as err:
        if what == "tokenizer":
            raise
        raise DataError(f"{what}: {err}") from None


def _stamp(path: Path) -> tuple:
    files = [path / n for n in (HF_TOKENIZER_FILE, "tokenizer.model", *HF_CONFIG_FILES)] if path.is_dir() else [path]
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path: str, stamp: tuple) -> Tokenizer:
    return Tokenizer(path)


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
    plain text files (one document each); read like ``preprocess`` reads them, with its
    :class:`~megatron_resonance.cli.UserError` naming the file and line of bad content."""
    from megatron_resonance.data.preprocess import iter_documents

    return iter_documents([Path(p) for p in inputs], json_key)


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
        DataError: no text, or a vocabulary too large for the corpus (SentencePiece's message).
    """
    model_path = Path(f"{model_prefix}.model")
    bad_input = []

    def chunks():
        try:
            for text in iter_training_texts(inputs, json_key):
                yield from _line_chunks(text)
        except UserError as err:  # SentencePiece would report it as its own failure
            bad_input.append(err)
            raise

    options = trainer_options(vocab_size, num_threads)
    if max_sentences:
        options.update(input_sentence_size=max_sentences, shuffle_input_sentence=True)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=chunks(), model_writer=proto, **options)
    except RuntimeError as err:
        if bad_input:
            raise bad_input[0] from None
        raise DataError(f"SentencePiece training failed: {str(err).strip().splitlines()[-1]}") from None
    if bad_input:
        raise bad_input[0]
    model_path.parent.mkdir(parents=True, exist_ok=True)  # after training: bad input leaves nothing behind
    model_path.write_bytes(proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    with open(f"{model_prefix}.vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return model_path
