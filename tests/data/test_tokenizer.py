"""The default tokenizer: lossless on Python source, LLaMA's special ids, loads LLaMA-style models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import sentencepiece as spm
import torch

from megatron_resonance.data.corpus import list_stdlib_sources, stdlib_root
from megatron_resonance.data.tokenizer import Tokenizer, train_tokenizer
from tests.data.conftest import TINY_VOCAB, tool_main


def test_round_trip_on_unseen_stdlib_source(small_corpus, tiny_tokenizer):
    seen = set(small_corpus.train.files)
    unseen = [s.relpath for s in list_stdlib_sources() if s.relpath not in seen][:25]
    root = stdlib_root()
    chars = tokens = 0
    for rel in unseen:
        text = (root / rel).read_bytes().decode("utf-8")
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text, rel
        chars, tokens = chars + len(text), tokens + len(ids)
    assert chars / tokens > 1.5  # merges learned: well below one token per byte


@pytest.mark.parametrize(
    "text",
    [
        "\tif x:\n\t\treturn 1\r\n",
        "    trailing spaces   \n\n\n   ",
        "  leading spaces",
        "unicode: é ß 中文 😀 \x00 \x7f",
        "x = 1234567890\n",
        "",
    ],
)
def test_round_trip_on_whitespace_control_and_unicode(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_special_ids_and_framing(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)  # no pad: None
    assert tok.vocab_size == TINY_VOCAB
    ids = tok.encode("def f():\n", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "def f():\n"
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "def f():\n"
    assert tok.id_to_piece(tok.eos_id) == "</s>"
    # byte fallback, never <unk>
    assert tok.unk_id not in tok.encode("\U0001f600 \u4e2d")


def test_loads_a_llama_style_model(tmp_path, small_corpus):
    """LLaMA's tokenizer.model: BPE, byte fallback, dummy prefix, digits split, ids 0/1/2 (we cannot
    download it here, so a model trained with LLaMA's trainer settings stands in)."""
    proto = io.BytesIO()
    texts = [line for line in open(small_corpus.train.path, encoding="utf-8")][:3]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=proto,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        max_sentence_length=1 << 20,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto.getvalue())
    tok = Tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400)
    ids = tok.encode("Hello world 42", bos=True)
    assert ids[0] == 1 and tok.id_to_piece(ids[1]).startswith("\u2581")  # the dummy prefix
    assert tok.decode(ids) == "Hello world 42"


def test_missing_or_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bad)


def test_training_is_deterministic(small_corpus, tiny_tokenizer, tmp_path):
    """Same pieces and scores for any thread count (the .model file also records num_threads)."""
    again = Tokenizer(
        train_tokenizer([small_corpus.train.path], tmp_path / "again", vocab_size=TINY_VOCAB, num_threads=2)
    )

    def pieces(tok):
        return [(tok.sp.id_to_piece(i), tok.sp.get_score(i)) for i in range(tok.vocab_size)]

    assert pieces(again) == pieces(tiny_tokenizer)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "def f(): pass"}\nnot json\n', "bad.jsonl:2: not a JSON line (Expecting value)"),
        (
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            "bad.jsonl:2: not UTF-8 text (invalid continuation byte at byte 28 of the file)",
        ),
        (b'{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl:2: no key 'text' (set --json-key)"),
    ],
)
def test_train_tokenizer_bad_input_names_the_file_and_line(tmp_path, content, message):
    """One line naming the input file and line (not SentencePiece's internals); nothing written."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    status, err = tool_main(
        "train_tokenizer.py", "--input", bad, "--model-prefix", tmp_path / "out" / "spm", "--vocab-size", "300"
    )
    assert status == 2 and err.strip() == f"train_tokenizer.py: error: {tmp_path / message}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
