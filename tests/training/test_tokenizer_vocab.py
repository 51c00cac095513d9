"""The vocabulary of a run with a Hugging Face tokenizer: the tokenizer's from scratch; from a checkpoint, the
checkpoint's when the tokenizer fits in it (embedding rows beyond the tokenizer's ids are weights too), and a
one-line refusal when it does not."""

from __future__ import annotations

import pytest

from megatron_resonance.errors import ConfigError
from megatron_resonance.training import validation
from tests.hf_tokenizers import SPECIALS, train_byte_level_bpe
from tests.training.test_extend_context import make_config, write_pretrained

BPE = 300


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_byte_level_bpe(tmp_path_factory.mktemp("bpe"), bpe_vocab=BPE)


def test_checkpoint_vocabulary_kept_when_the_tokenizer_fits(tokenizer, tmp_path):
    ids = BPE + len(SPECIALS)
    src = write_pretrained(tmp_path / "src", vocab_size=ids + 44)  # e.g. rows padded to a round number
    cfg = make_config("--load", src, "--seq-length", 64, "--tokenizer-model", tokenizer)
    validation._tokenizer_vocab(cfg)
    assert cfg.model.vocab_size == ids + 44


def test_tokenizer_vocabulary_without_a_checkpoint(tokenizer):
    from megatron_resonance.training import launch
    from megatron_resonance.training.config import config_from_args

    cfg = config_from_args(
        launch.make_parser("x", "").parse_args(["--mock-data", "--tokenizer-model", str(tokenizer / "tokenizer.json")])
    )
    validation._tokenizer_vocab(cfg)
    assert cfg.model.vocab_size == BPE + len(SPECIALS)


def test_tokenizer_larger_than_the_checkpoint_is_refused(tokenizer, tmp_path):
    src = write_pretrained(tmp_path / "src", vocab_size=BPE)  # fewer rows than the tokenizer has ids
    cfg = make_config("--load", src, "--seq-length", 64, "--tokenizer-model", tokenizer, "--mock-data")
    with pytest.raises(
        ConfigError,
        match=rf"--load {src} is another model: vocab_size {BPE} \(this run: "
        rf"{BPE + len(SPECIALS)}\)",
    ):
        validation.resolve_and_validate(cfg, 1)
