"""The RULER task library: prompt lengths in the model's tokens, determinism, answers present as RULER
defines them, RULER's scoring, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from megatron_resonance.data.tokenizer import load_tokenizer
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.ruler import (
    NEEDLE_TASKS,
    SINGLE_NEEDLE_TASKS,
    TASKS,
    build_samples,
    load_haystack,
    postprocess_pred,
    string_match_all,
    string_match_part,
)

#: the test tokenizer has 400 pieces, so a prompt takes ~3x the tokens of LLaMA's; cwe's fixed text
#: (a solved example and the shortest list) needs ~1600 of them
LENGTHS = (1800, 2600, 3600)
RULER_ORDER = [
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
]


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return load_tokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def haystack():
    return load_haystack(None)


@pytest.fixture(scope="module")
def built(tok, haystack):
    """Two samples of every task at every length, depths 0 and 1."""
    return {
        (task, length): build_samples(task, tok, length, samples=2, seed=3, depths=[0.0, 1.0], haystack=haystack)
        for task in TASKS
        for length in LENGTHS
    }


def test_the_task_names_are_rulers_in_its_order():
    assert list(TASKS) == RULER_ORDER
    assert NEEDLE_TASKS == tuple(RULER_ORDER[:8])
    assert SINGLE_NEEDLE_TASKS == tuple(RULER_ORDER[:6])
    assert [TASKS[t].max_new_tokens for t in ("niah_single_1", "vt", "cwe", "fwe")] == [128, 30, 120, 50]


def test_every_prompt_is_the_requested_length(built):
    for (task, length), samples in built.items():
        for s in samples:
            assert len(s.tokens) == length, (task, length, s.index)
            assert s.length == length and s.task == task
            assert 0 <= s.fill_tokens < length // 10, (task, length, s.fill_tokens)
            assert s.depth == (float(s.index % 2) if task in NEEDLE_TASKS else None)


def test_the_same_sample_whatever_else_is_built(tok, haystack, built):
    again = build_samples("niah_multikey_1", tok, 2600, samples=1, seed=3, depths=[0.0, 1.0], haystack=haystack)
    assert again[0] == built[("niah_multikey_1", 2600)][0]
    fresh = build_samples("vt", tok, 1800, samples=2, seed=3, haystack=load_haystack(None))
    assert fresh == built[("vt", 1800)]
    other = build_samples("vt", tok, 1800, samples=2, seed=4)
    assert [s.outputs for s in other] != [s.outputs for s in fresh]


def _text(tok, sample) -> str:
    text = tok.decode(sample.tokens)
    assert text.endswith(sample.answer_prefix)
    return text


def test_niah_needles_hold_the_answers(tok, built):
    for task in NEEDLE_TASKS:
        a = TASKS[task].args
        for s in built[(task, 2600)]:
            text = _text(tok, s)
            assert len(s.outputs) == a["num_needle_v"] * a["num_needle_q"]
            kind = "uuids" if a["type_needle_v"] == "uuids" else "numbers"
            needles = re.findall(rf"One of the special magic {kind} for (\S+) is: (\S+)\.", text)
            by_key = {}
            for key, value in needles:
                by_key.setdefault(key, []).append(value)
            question = text[text.rindex("What ") :]
            queried = [k for k in by_key if k in question]
            assert len(queried) == a["num_needle_q"], (task, queried)
            assert sorted(v for k in queried for v in by_key[k]) == sorted(s.outputs)
            singular = a["num_needle_v"] * a["num_needle_q"] == 1
            assert s.answer_prefix.startswith(f" The special magic {kind[:-1] if singular else kind} for ")
            assert s.answer_prefix.endswith(" is" if singular else " are")
            if task in ("niah_multikey_2", "niah_multikey_3"):  # a haystack of other needles
                assert len(needles) > 20
            if task == "niah_multikey_1":
                assert len(by_key) == 4


def test_the_needle_depth_moves_the_answer(tok, haystack):
    for task in ("niah_single_1", "niah_single_2", "niah_multikey_2"):
        samples = build_samples(task, tok, 2600, samples=3, depths=[0.0, 0.5, 1.0], haystack=haystack)
        where = []
        for s in samples:
            text = _text(tok, s)
            start, end = text.index("afterwards.\n") + 12, text.rindex("\nWhat ")
            where.append((text.index(s.outputs[0]) - start) / (end - start))
        assert where[0] < 0.05 and 0.4 < where[1] < 0.6 and where[2] > 0.9, (task, where)


def test_vt_chain_resolves_to_the_outputs(tok, built):
    for length in LENGTHS:
        for s in built[("vt", length)]:
            text = _text(tok, s)
            value = re.search(r"assigned the value (\d+) in the text above", text[text.rindex("Question:") :])[1]
            task_part = text[text.rindex("Memorize and track") :]
            assigned = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", task_part))
            holds = {name for name, rhs in assigned.items() if rhs == value}
            while True:
                more = {n for n, rhs in assigned.items() if rhs.startswith("VAR ") and rhs[4:] in holds} - holds
                if not more:
                    break
                holds |= more
            assert sorted(holds) == sorted(s.outputs) and len(s.outputs) == 5
            assert s.answer_prefix.startswith(
                " Answer: According to the chain(s) of variable assignment in the "
                f"text above, 5 variables are assigned the value {value}"
            )
            assert text.count("Memorize and track") == 2  # the solved example first


def test_cwe_outputs_are_the_most_common_words(tok, built):
    for length in LENGTHS:
        for s in built[("cwe", length)]:
            text = _text(tok, s)
            listing = text[text.rindex("Memorize the ones that appear most often.\n") : text.rindex("\nQuestion:")]
            counts = Counter(re.findall(r"\d+\. (\S+)", listing))
            assert len(s.outputs) == 10
            floor = min(counts[w] for w in s.outputs)
            assert floor >= 6 and all(c < floor for w, c in counts.items() if w not in s.outputs)


def test_fwe_outputs_are_the_most_frequent_coded_words(tok, built):
    for length in LENGTHS:
        for s in built[("fwe", length)]:
            text = _text(tok, s)
            coded = text[text.index("coded words. ") + 13 : text.rindex("\nQuestion:")].split()
            counts = Counter(w for w in coded if w != "...")
            ranked = [counts[w] for w in s.outputs]
            assert ranked == sorted(ranked, reverse=True) and ranked[-1] >= 1
            assert all(c <= ranked[-1] for w, c in counts.items() if w not in s.outputs)
            assert counts.most_common(1)[0][0] == s.outputs[0]


def test_string_match_all_as_ruler():
    assert string_match_all(" 7391023.", ["7391023"]) == 1.0
    assert (
        string_match_all("The numbers are 1111111, 2222222 and 4444444", ["1111111", "2222222", "3333333", "4444444"])
        == 0.75
    )
    assert string_match_all("VAR abcde, VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert string_match_all("", ["1"]) == 0.0
    assert string_match_all("12\x0034", ["1234"]) == 0.0  # a control character breaks the match
    assert postprocess_pred("  a\tb\x07c \n") == "a\nb\nc"
    assert string_match_part("Paris, France", ["London", "paris"]) == 1.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line(tok, tmp_path):
    with pytest.raises(UserError) as e:
        build_samples("niah_single_4", tok, 2000)
    assert "niah_single_4" in _one_line(e) and "niah_single_1, niah_single_2" in str(e.value)
    with pytest.raises(UserError) as e:
        build_samples("niah_single_1", tok, 100)
    assert "length 100 is too short for niah_single_1" in _one_line(e)
    with pytest.raises(UserError) as e:
        build_samples("niah_single_1", tok, 2000, depths=[1.5])
    assert "1.5" in _one_line(e)
    with pytest.raises(UserError) as e:
        build_samples("niah_single_1", tok, 2000, chat_template=True)
    assert "no chat template" in _one_line(e)

    short = tmp_path / "short.txt"
    short.write_text("A short text. It has two sentences.\n" * 20)
    with pytest.raises(UserError) as e:
        build_samples("niah_single_2", tok, 2000, haystack=load_haystack(str(short)))
    assert f"haystack {short} holds 140 words" in _one_line(e) and "short of the length 2000" in str(e.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError) as e:
        build_samples("niah_single_2", tok, 2000, haystack=load_haystack(str(bad)))
    assert f"haystack {bad}: line 2" in _one_line(e)
    with pytest.raises(UserError) as e:
        load_haystack(str(tmp_path / "missing.txt"))
    assert "no such file" in _one_line(e)


def test_a_user_haystack_is_the_essay(tok, tmp_path):
    corpus = tmp_path / "essays.jsonl"
    words = " ".join(f"Word{i % 50} follows another one." for i in range(1500))
    corpus.write_text(json.dumps({"text": words}) + "\n")
    (s,) = build_samples("niah_single_2", tok, 1800, haystack=load_haystack(str(corpus)), add_bos=True)
    assert len(s.tokens) == 1800 and s.tokens[0] == tok.bos_id
    assert "Word7 follows another one." in _text(tok, s)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A byte-level BPE ``tokenizer.json`` with a Llama-3-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_resonance.evaluation.ruler import tasks

    directory = tmp_path_factory.mktemp("chat")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [tasks.NIAH_TEMPLATE, tasks.NIAH_ANSWER, tasks.NEEDLE, tasks.FWE_TEMPLATE] * 20
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    bpe.add_special_tokens(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    )
    bpe.save(str(directory / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "chat_template": template,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return load_tokenizer(directory)


def test_the_chat_template_wraps_the_task_prompt(chat_tokenizer):
    tok = chat_tokenizer
    for task in ("niah_single_1", "fwe"):
        (s,) = build_samples(task, tok, 1000, chat_template=True, add_bos=True)
        assert len(s.tokens) == 1000
        assert s.tokens[0] == tok.bos_id and s.tokens[1] != tok.bos_id  # the template's BOS, not a second one
        text = tok.hf.decode(s.tokens)
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
        assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + s.answer_prefix)
    (plain,) = build_samples("niah_single_1", tok, 1000)
    assert "<|start_header_id|>" not in tok.hf.decode(plain.tokens)
