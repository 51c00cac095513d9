"""Megatron-LM's document flags reach megatron's GPTDataset (real and mock data): positions restart after
every EOD, EOD tokens leave the loss, and the trainer's batches carry each token's document; off, the
samples are what they were (positions 0..s-1, every token in the loss, no documents)."""

from __future__ import annotations

import pytest
import torch

from megatron_resonance.data.datasets import build_gpt_datasets
from tests.fake_data import write_dataset

EOD = 255
SEQ = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("documents")
    docs = [[1 + (i % 250)] * (3 + (7 * i) % 23) + [EOD] for i in range(60)]  # 4..26 tokens, EOD last
    return write_dataset(tmp / "train", docs)


def _build(data, mock: bool = False, **flags):
    source = dict(mock=True) if mock else dict(train_data_prefix=str(data), cache_dir=str(data.parent / "cache"))
    train, _ = build_gpt_datasets(
        seq_length=SEQ, seed=1, train_samples=16, valid_samples=0, vocab_size=256, eod_id=EOD, **source, **flags
    )
    return train


def _expected_positions(tokens):
    positions, p = [], 0
    for t in tokens.tolist():
        positions.append(p)
        p = 0 if t == EOD else p + 1
    return positions


@pytest.mark.parametrize("mock", [False, True])
def test_flags_reach_the_dataset(data, mock):
    train = _build(data, mock, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    assert (train.config.reset_attention_mask, train.config.create_attention_mask) == (True, False)
    resets = 0
    for i in range(16):
        sample = train[i]
        assert "attention_mask" not in sample  # no dense [s, s] mask
        tokens = sample["tokens"]
        assert sample["position_ids"].tolist() == _expected_positions(tokens)
        assert torch.equal(sample["loss_mask"] == 0, tokens == EOD)
        resets += int((tokens[:-1] == EOD).sum())
    assert resets > (16 if not mock else 0)  # documents end inside samples (mock documents are long)


@pytest.mark.parametrize("mock", [False, True])
def test_flags_off_leave_samples_as_they_were(data, mock):
    train = _build(data, mock)
    for i in range(4):
        sample = train[i]
        assert sample["position_ids"].tolist() == list(range(SEQ))
        assert bool((sample["loss_mask"] == 1).all())
        assert bool((sample["tokens"] == EOD).any()) or mock


def test_micro_batches_carry_documents(data):
    from megatron_resonance.training.data_loop import micro_batches

    batch = next(micro_batches(_build(data, reset_attention_mask=True), 0, 2))
    tokens, ids = batch["tokens"], batch["document_ids"]
    assert ids.shape == tokens.shape and ids.dtype == torch.int64
    # a document ends with (and includes) its EOD: the next token starts the next one
    is_eod = tokens == EOD
    assert torch.equal(ids[:, 1:] - ids[:, :-1], is_eod[:, :-1].to(torch.int64))
    assert bool((ids[:, 0] == 0).all())
    assert "document_ids" not in next(micro_batches(_build(data, reset_position_ids=True), 0, 2))
