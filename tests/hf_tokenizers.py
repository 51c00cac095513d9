"""A Llama-3-style Hugging Face tokenizer made here: byte-level BPE trained with ``tokenizers``, in seconds.

Llama-3 ships ``tokenizer.json``: a byte-level BPE of 128,000 tokens, then 256 special tokens
(``<|begin_of_text|>`` 128000, ``<|end_of_text|>`` 128001, ``<|reserved_special_token_*|>``), and a
post-processor that prepends ``<|begin_of_text|>``; ``tokenizer_config.json`` names BOS and EOS. This one has
the same layout with ``bpe_vocab`` BPE tokens. Above 65,535 ids (the default) neither the specials nor the
late merges fit 16 bits: BPE is trained on a few standard-library files plus ``WORDS`` (random 8-letter
words, each seen twice), whose merges fill the vocabulary; every such word encodes to one token with a
high id.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from typing import List

STDLIB_FILES = ["textwrap.py", "bisect.py", "colorsys.py", "string.py", "fnmatch.py", "heapq.py"]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIALS = [BOS, EOS] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
BPE_VOCAB = 65_600


def stdlib_texts() -> List[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8") for name in STDLIB_FILES]


def random_words(n: int = 40_000, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(n)]


def train_byte_level_bpe(directory, *, bpe_vocab: int = BPE_VOCAB, config: bool = True) -> Path:
    """Write ``directory/tokenizer.json`` (+ ``tokenizer_config.json`` naming BOS/EOS when ``config``).

    Returns ``directory``. Vocabulary: ``bpe_vocab`` BPE tokens (256 byte symbols included), then
    ``SPECIALS`` (BOS = ``bpe_vocab``, EOS = ``bpe_vocab + 1``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = random_words()
    texts = stdlib_texts() + [" ".join(words[i : i + 1000]) for i in range(0, len(words), 1000)] * 2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() == bpe_vocab, tok.get_vocab_size()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bpe_vocab)])
    tok.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "bos_token": BOS,
                    "eos_token": EOS,
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "clean_up_tokenization_spaces": True,
                    "model_max_length": 1 << 20,
                },
                indent=1,
            )
            + "\n"
        )
    return directory


def high_id_text(directory, n: int = 40) -> str:
    """Text of ``n`` BPE tokens with ids above 65,535 (each a late merge), space-joined."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    pieces = [tok.decode([i]) for i in range(65_536, tok.get_vocab_size()) if tok.id_to_token(i) not in SPECIALS]
    return " ".join(p.strip() for p in pieces[:n])
