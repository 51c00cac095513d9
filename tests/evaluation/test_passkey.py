"""Passkey prompts (exact length, key at the stated depth) and the passkey tool on Megatron and Hugging Face."""

from __future__ import annotations

import pytest

from megatron_resonance.data.tokenizer import load_tokenizer
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.passkey import INTRO, NEEDLE, QUESTION, PromptBuilder, passkey


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return load_tokenizer(str(tokenizer_model))


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("length", [200, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
def test_prompt_has_length_and_key_at_depth(tokenizer, length, depth, add_bos):
    key = passkey(0, length, depth, 0)
    prompt = PromptBuilder(tokenizer, add_bos=add_bos).build(length, depth, key)
    tokens = prompt.tokens
    assert len(tokens) == length
    assert tokens[prompt.needle_start : prompt.needle_end] == tokenizer.encode(NEEDLE.format(key=key))
    head = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(INTRO)
    assert tokens[: len(head)] == head and prompt.filler_start == len(head)
    filler_before = prompt.needle_start - prompt.filler_start
    assert filler_before == round(depth * prompt.filler_tokens)
    assert abs(filler_before / prompt.filler_tokens - depth) <= 0.5 / prompt.filler_tokens + 1e-12
    question, answer = PromptBuilder(tokenizer).question_and_answer(key)
    assert prompt.answer == answer and tokens[prompt.answer_start - len(question) : prompt.answer_start] == question
    assert tokenizer.decode(question).strip() == QUESTION
    assert prompt.filler_tokens == length - len(head) - (prompt.needle_end - prompt.needle_start) - len(question) - len(
        answer
    )
    assert tokenizer.decode(prompt.answer).strip() == key
    text = tokenizer.decode(tokens)
    assert text.count(key) == 3 and text.rstrip().endswith(f"The pass key is {key}")


def test_prompt_too_short_is_a_usage_error(tokenizer):
    builder = PromptBuilder(tokenizer)
    shortest = builder.fixed_tokens()
    assert len(builder.build(shortest, 0.5, "12345").tokens) == shortest
    with pytest.raises(UserError, match="shorter than the passkey prompt"):
        builder.build(shortest - 1, 0.5, "12345")


def test_keys_are_deterministic_five_digit_numbers():
    keys = [passkey(0, 256, d, t) for d in (0.0, 0.5) for t in range(20)]
    assert keys == [passkey(0, 256, d, t) for d in (0.0, 0.5) for t in range(20)]
    assert all(len(k) == 5 and k.isdigit() for k in keys)
    assert len(set(keys)) > 30
    assert keys != [passkey(1, 256, d, t) for d in (0.0, 0.5) for t in range(20)]


@pytest.mark.slow
def test_passkey_reports_agree_across_backends_and_layouts(session):
    megatron, hf, pp2 = session.result("passkey"), session.result("passkey_hf"), session.result("passkey_pp2")
    cp2 = session.result("passkey_cp2")
    assert cp2["settings"]["context_parallel_size"] == 2
    for report in (megatron, hf, pp2, cp2):
        assert set(report["accuracy"]) == {"200", "256"}
        assert all(set(v) == {"0", "0.5", "1"} for v in report["by_depth"].values())
        for L, acc in report["accuracy"].items():
            assert 0.0 <= acc <= 1.0
            assert acc == pytest.approx(sum(report["by_depth"][L].values()) / 3)
    for L in ("200", "256"):
        assert megatron["answer_nll"][L] == pytest.approx(hf["answer_nll"][L], rel=1e-5)
        assert pp2["answer_nll"][L] == pytest.approx(megatron["answer_nll"][L], rel=1e-5)
        assert cp2["answer_nll"][L] == pytest.approx(megatron["answer_nll"][L], rel=1e-5)
        assert megatron["by_depth"][L] == hf["by_depth"][L] == pp2["by_depth"][L] == cp2["by_depth"][L]
    assert megatron["model"]["tokenizer"] == str(session.tokenizer)  # found through the training run's record
    for key in ("passkey", "passkey_hf", "passkey_pp2"):
        assert (session.out[key] / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "accuracy" in (session.out[key] / "report.md").read_text()
