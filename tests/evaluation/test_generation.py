"""Greedy generation through ``scorer.generate`` (evaluation.generation) on the session's tiny model pair.

The worker runs (conftest) decode three prompts (lengths 40, 23, 40; 20 new tokens, positions up to 59 of a
YaRN x2 rope over 32) with megatron-core's static inference (KV cache) and with transformers' generate.
"""

from __future__ import annotations

import pytest

from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.generation import check_prompts, cut_at_stop
from tests.evaluation.conftest import GENERATION_NEW_TOKENS, GENERATION_PROMPT_LENGTHS


def run(session, key: str) -> dict:
    record = session.generation.get(key)
    if record is None or "exception" in record or "error" in record:
        pytest.fail(f"generation run {key}: {record}", pytrace=False)
    return record


@pytest.mark.parametrize("key", ["megatron", "hf", "tp2", "pp2"])
def test_cached_decoding_matches_full_forward(session, key):
    """Each token decoded with the cache (megatron: cached keys and values, the rotary angles at the decode
    step's offset, a one-token query against the whole cache) is the arg-max of a forward without a cache
    over the prompt and the tokens before it."""
    record = run(session, key)
    assert [len(t) for t in record["tokens"]] == [GENERATION_NEW_TOKENS] * len(GENERATION_PROMPT_LENGTHS)
    for i, greedy in enumerate(record["full_forward"]):
        assert all(greedy), f"{key}, prompt {i}: new tokens that are not the full forward's arg-max: {greedy}"


def test_checkpoint_and_export_decode_alike(session):
    assert run(session, "megatron")["tokens"] == run(session, "hf")["tokens"]


@pytest.mark.parametrize("key", ["tp2", "pp2"])
def test_parallel_layouts_decode_as_one_rank(session, key):
    record = run(session, key)
    assert record["ranks_agree"], f"{key}: the ranks returned different tokens"
    assert record["tokens"] == run(session, "megatron")["tokens"]


@pytest.mark.parametrize("key", ["megatron", "hf", "pp2"])
def test_stop_id_ends_the_continuation(session, key):
    record = run(session, key)
    stop = record["stop"]
    assert record["stopped"] == [cut_at_stop(t, [stop]) for t in record["tokens"]]
    assert record["stopped"][0][-1] == stop and len(record["stopped"][0]) < GENERATION_NEW_TOKENS


def test_context_parallel_is_refused(session):
    record = session.generation["cp2"]
    assert "context-parallel-size 1" in record.get("error", ""), record


def test_cut_at_stop_keeps_the_first_stop_id():
    assert cut_at_stop([5, 7, 9, 7], [7, 9]) == [5, 7]
    assert cut_at_stop([5, 6], [7]) == [5, 6]
    assert cut_at_stop([5, 6], []) == [5, 6]


@pytest.mark.parametrize(
    "prompts, new, message",
    [
        ([[]], 4, "prompt 0 is empty"),
        ([[1], [400]], 4, "prompt 1 has token ids outside the vocabulary 0..399"),
        ([[1]], -1, "max_new_tokens -1"),
    ],
)
def test_bad_generation_input(prompts, new, message):
    with pytest.raises(UserError, match=message):
        check_prompts(prompts, new, 400)
