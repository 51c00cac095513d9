"""Shared fixtures: a small stdlib corpus and a tiny tokenizer trained on it (built once per session)."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest

from megatron_resonance.data.corpus import build_stdlib_corpus
from megatron_resonance.data.tokenizer import Tokenizer, train_tokenizer
from tests.launch import REPO

TINY_VOCAB = 512


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """Manifest of a ~150 KB train / ~40 KB valid corpus from this machine's standard library."""
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_train_bytes=150_000, max_valid_bytes=40_000)


@pytest.fixture(scope="session")
def tiny_tokenizer(small_corpus, tmp_path_factory) -> Tokenizer:
    prefix = tmp_path_factory.mktemp("tokenizer") / "spm"
    return Tokenizer(train_tokenizer([small_corpus.train.path], prefix, vocab_size=TINY_VOCAB, num_threads=1))


def tool_main(name, *args):
    """``tools/<name>``'s ``main`` in this process: (exit status, stderr)."""
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_tool"), REPO / "tools" / name)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            status = tool.main([str(a) for a in args])
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()
