"""The embedded stdlib corpus: split by file, deterministic, capped, real documents."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_resonance.data.corpus import (
    build_stdlib_corpus,
    is_validation,
    list_stdlib_sources,
    stdlib_root,
)
from megatron_resonance.data.tokenizer import iter_training_texts


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_split_is_by_file_disjoint_and_matches_the_path_hash(small_corpus):
    train, valid = set(small_corpus.train.files), set(small_corpus.valid.files)
    assert train and valid and not train & valid
    assert all(is_validation(f) for f in valid)
    assert not any(is_validation(f) for f in train)
    # about 5 % of all candidate files are validation files
    sources = list_stdlib_sources()
    share = sum(is_validation(s.relpath) for s in sources) / len(sources)
    assert 0.02 < share < 0.10


def test_corpus_is_deterministic_and_records_the_real_file_text(small_corpus, tmp_path):
    again = build_stdlib_corpus(tmp_path, max_train_bytes=150_000, max_valid_bytes=40_000)
    for split in ("train", "valid"):
        a, b = Path(getattr(small_corpus, split).path), Path(getattr(again, split).path)
        assert a.read_bytes() == b.read_bytes()
    records = _records(small_corpus.train.path)
    assert [r["path"] for r in records] == small_corpus.train.files
    root = stdlib_root()
    for r in records[:5]:
        assert r["text"] == (root / r["path"]).read_bytes().decode("utf-8")
    assert list(iter_training_texts([small_corpus.valid.path])) == [
        r["text"] for r in _records(small_corpus.valid.path)
    ]
    manifest = json.loads((Path(small_corpus.train.path).parent / "manifest.json").read_text())
    assert manifest["train"]["files"] == small_corpus.train.files


def test_caps_and_exclusions(small_corpus):
    assert 0 < small_corpus.train.num_bytes <= 150_000
    assert 0 < small_corpus.valid.num_bytes <= 40_000
    sizes = [len(r["text"].encode()) for r in _records(small_corpus.train.path)]
    assert sum(sizes) == small_corpus.train.num_bytes and min(sizes) >= 2048
    for src in list_stdlib_sources():
        parts = src.relpath.split("/")
        assert not {"site-packages", "test", "tests", "encodings"} & set(parts[:-1])
        assert not parts[-1].startswith("_sysconfigdata")


def test_a_larger_cap_keeps_every_file_in_its_split(small_corpus, tmp_path):
    bigger = build_stdlib_corpus(tmp_path, max_train_bytes=400_000, max_valid_bytes=100_000)
    assert set(small_corpus.train.files) <= set(bigger.train.files)
    assert set(small_corpus.valid.files) <= set(bigger.valid.files)
