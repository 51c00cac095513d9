"""Hugging Face tokenizers (Llama-3's ``tokenizer.json``) through the one ``Tokenizer``: loading by directory,
by file and bare, special ids from the tokenizer, encoding equal to transformers', ids above 65,535 through
``.bin``/``.idx`` exactly, and one error line for a path that is no tokenizer."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from megatron_resonance.data.preprocess import preprocess
from megatron_resonance.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_kind
from megatron_resonance.errors import UserError
from tests.data.test_preprocess import _assert_one_error_line, _main
from tests.hf_tokenizers import (
    BPE_VOCAB,
    SPECIALS,
    high_id_text,
    random_words,
    stdlib_texts,
    train_byte_level_bpe,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

TEXT = stdlib_texts()[0][:2000] + " {high}\n\tdone é😀 <|reserved_special_token_7|>\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    global TEXT
    directory = train_byte_level_bpe(tmp_path_factory.mktemp("llama3_tokenizer"))
    TEXT = TEXT.replace("{high}", high_id_text(directory))
    return directory


@pytest.fixture(scope="module")
def auto(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def test_directory_and_file_load_the_same_tokenizer(hf_dir, auto):
    total = BPE_VOCAB + len(SPECIALS)
    for path in (hf_dir, hf_dir / "tokenizer.json"):
        tok = Tokenizer(path)
        assert tok.kind == "huggingface" and tokenizer_kind(path) == "huggingface"
        assert tok.vocab_size == total == len(auto) > 65_535
        # Llama-3's layout: BOS/EOS right after the BPE tokens, named by tokenizer_config.json
        assert (tok.bos_id, tok.eos_id) == (BPE_VOCAB, BPE_VOCAB + 1) == (auto.bos_token_id, auto.eos_token_id)
        assert tok.pad_id is None
        ids = tok.encode(TEXT)
        assert ids == auto.encode(TEXT, add_special_tokens=False)  # no BOS from the post-processor
        assert auto.encode(TEXT)[0] == tok.bos_id  # (which transformers adds by default)
        assert max(ids) > 65_535  # the random words are late merges
        assert tok.decode(ids) == TEXT.replace("<|reserved_special_token_7|>", "")  # special: nothing
        assert tok.encode(TEXT, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == tok.decode(ids)


def test_bare_tokenizer_json_finds_llama3_specials_by_name(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (BPE_VOCAB, BPE_VOCAB + 1)
    assert tok.encode(TEXT) == Tokenizer(hf_dir).encode(TEXT)


def test_ids_above_65535_round_trip_through_bin_idx(hf_dir, tmp_path):
    docs = [TEXT, " ".join(random_words()[100:400]), "x"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prefix = tmp_path / "ds"
    stats = preprocess([src], prefix, hf_dir / "tokenizer.json", progress=False, log=None)
    tok = Tokenizer(hf_dir)
    ds = IndexedDataset(str(prefix))
    assert ds.index.dtype == np.int32  # uint16 would wrap every id above 65,535
    assert (prefix.with_suffix(".bin")).stat().st_size == 4 * stats.tokens
    for i, text in enumerate(docs):
        expected = tok.encode(text) + [tok.eos_id]
        assert ds[i].tolist() == expected
    assert max(int(ds[i].max()) for i in range(len(ds))) > 65_535


def test_not_a_tokenizer_is_one_error_line(hf_dir, tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"not": "a tokenizer"}')
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 nothing")
    cases = {
        empty_dir: "no tokenizer in",
        bad_json: "not a Hugging Face tokenizer",
        junk: "not a SentencePiece model",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            Tokenizer(path)
        with pytest.raises(UserError, match=message):
            load_tokenizer(path)
        src = tmp_path / "doc.txt"
        src.write_text("hello")
        proc = _main("--input", src, "--output-prefix", tmp_path / "out", "--tokenizer", path)
        _assert_one_error_line(proc, message, str(path))
        assert not (tmp_path / "out.bin").exists()
