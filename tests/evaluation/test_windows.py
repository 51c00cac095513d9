"""Pure pieces: windows and document selection, token scores against torch's cross entropy, memory estimate,
length parsing, tokenizer lookup."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.command_line import parse_lengths
from megatron_resonance.evaluation.documents import load_documents, select, windows
from megatron_resonance.evaluation.memory import ModelShape, forward_bytes
from megatron_resonance.evaluation.resolve import megatron_tokenizer
from megatron_resonance.evaluation.scoring import vocab_parallel_scores


@pytest.mark.parametrize("doc_length", [8, 9, 10, 31, 64, 65, 100])
@pytest.mark.parametrize("length, stride", [(8, 1), (8, 3), (8, 8), (16, 5), (8, None), (16, None)])
def test_windows_score_every_token_once(doc_length, length, stride):
    spans = windows(doc_length, length, stride)
    if doc_length < length:
        assert spans == []
        return
    scored = []
    for start, first in spans:
        assert 0 <= start and start + length <= doc_length and start + 1 <= first < start + length + 1
        scored += range(first, start + length)
    if stride is None:
        assert spans == [(0, 1)] and scored == list(range(1, length))
    elif stride < length:
        assert scored == list(range(1, doc_length))  # each token after the first exactly once, in order
        for start, first in spans[1:]:
            assert first - start >= length - stride  # at least L - S tokens of context
    else:  # disjoint chunks (the last one aligned to the end): a chunk's first token is not scored
        assert scored == sorted(set(scored)) and scored[-1] == doc_length - 1
        assert [s for s, _ in spans[:-1]] == [k * length for k in range(len(spans) - 1)]
        assert all(first == start + 1 for start, first in spans[:-1])


def test_selection_is_seeded_and_skips_short_documents():
    docs = [np.zeros(n, dtype=np.int64) for n in (5, 50, 20, 80, 10, 60)]
    used, skipped = select(docs, 20, seed=0)
    assert sorted(used) == [1, 2, 3, 5] and skipped == 2
    assert select(docs, 20, seed=0) == (used, skipped)
    orders = {tuple(select(docs, 1, seed=s)[0]) for s in range(10)}
    assert len(orders) > 1
    first_two, _ = select(docs, 20, seed=0, max_documents=2)
    assert first_two == used[:2]


def test_vocab_parallel_scores_match_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50)
    targets = torch.randint(0, 40, (2, 7))
    scores = vocab_parallel_scores(logits, targets, vocab_size=40)
    reference = torch.nn.functional.cross_entropy(logits[..., :40].transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(scores.nll, reference)
    assert torch.equal(scores.greedy, logits[..., :40].argmax(-1) == targets)


def test_jsonl_tokens_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"tokens": [1, 2, 3]}) + "\n\n" + json.dumps({"tokens": [4]}) + "\n")
    assert [d.tolist() for d in load_documents(str(path))] == [[1, 2, 3], [4]]
    path.write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(UserError, match="holds text: pass --tokenizer"):
        load_documents(str(path))
    path.write_text("{oops\n")
    with pytest.raises(UserError, match=r"d.jsonl:1: not a JSON line"):
        load_documents(str(path))


def test_parse_lengths():
    assert parse_lengths("512, 128,256,128") == [128, 256, 512]
    for bad in ("", "a", "128,", "1", "-5", "1.5"):
        with pytest.raises(UserError):
            parse_lengths(bad)


def test_memory_estimate_grows_and_shards():
    shape = ModelShape(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        num_query_groups=32,
        vocab_size=32000,
    )
    assert 6.5e9 < shape.parameters < 6.9e9  # LLaMA-2 7B
    short, long = (forward_bytes(shape, L, dtype_bytes=2) for L in (4096, 32768))
    assert long > short > shape.parameters * 2
    assert forward_bytes(shape, 32768, tp=2, dtype_bytes=2) < long
    assert forward_bytes(shape, 32768, cp=2, dtype_bytes=2) < long


def test_tokenizer_lookup_order(tmp_path):
    root = tmp_path / "ckpt"
    ckpt = root / "iter_0000001"
    ckpt.mkdir(parents=True)
    recorded = tmp_path / "trained.model"
    recorded.write_bytes(b"x")
    stored = {"run": {"data": {"tokenizer_model": str(recorded)}}}
    assert megatron_tokenizer(str(root), str(ckpt), stored) == str(recorded)
    (root / "tokenizer.model").write_bytes(b"x")
    assert megatron_tokenizer(str(root), str(ckpt), stored) == str(root / "tokenizer.model")
    (root / "hf").mkdir()
    (root / "hf" / "tokenizer.model").write_bytes(b"x")
    assert megatron_tokenizer(str(ckpt), str(ckpt), stored) == str(root / "hf" / "tokenizer.model")
    assert megatron_tokenizer(str(tmp_path / "x"), str(tmp_path / "x" / "iter_1"), {}) is None
