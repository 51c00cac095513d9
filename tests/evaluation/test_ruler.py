"""The RULER tool end to end: a Megatron checkpoint and its Hugging Face export answer every prompt with the
same greedy tokens, at PP=2 and DP=2 too; the report's numbers follow from the predictions."""

from __future__ import annotations

import json
import math

import pytest

from megatron_resonance.evaluation.ruler import SINGLE_NEEDLE_TASKS, TASKS, string_match_all
from tests.evaluation.conftest import RULER_PARALLEL_TASKS

pytestmark = pytest.mark.slow


def predictions(session, key: str) -> dict:
    """{(model, task, length, index): record} of run ``key``."""
    session.result(key)  # fails with the run's stderr when it did not exit 0
    lines = (session.out[key] / "predictions.jsonl").read_text().splitlines()
    return {(r["model"], r["task"], r["length"], r["index"]): r for r in map(json.loads, lines)}


def test_backends_answer_with_the_same_tokens(session):
    records = predictions(session, "ruler")
    megatron = {k[1:]: r for k, r in records.items() if k[0] == "meg"}
    hf = {k[1:]: r for k, r in records.items() if k[0] == "hf"}
    assert set(megatron) == set(hf) and len(megatron) == len(TASKS) * 2 * 2  # tasks x lengths x samples
    for key, r in megatron.items():
        assert r["answer_tokens"] == hf[key]["answer_tokens"], key
        assert 1 <= len(r["answer_tokens"]) <= 8  # --max-new-tokens; a random model seldom emits EOS
        assert r["prompt_tokens"] <= key[1] and r["prompt_tokens"] >= 0.99 * key[1]
    assert len({tuple(r["answer_tokens"]) for r in megatron.values()}) > 1  # answers depend on the prompt


def test_report_follows_from_the_predictions(session):
    report, records = session.result("ruler"), predictions(session, "ruler")
    assert report["settings"]["template"] == "base" and report["settings"]["metric"] == "string_match_all"
    for name in ("meg", "hf"):
        scores = report["scores"][name]
        assert list(scores) == list(TASKS)
        for task, by_length in scores.items():
            for L, value in by_length.items():
                mine = [r for k, r in records.items() if k[:3] == (name, task, int(L))]
                assert value == pytest.approx(
                    sum(string_match_all(r["prediction"], r["outputs"]) for r in mine) / len(mine)
                )
        for L, average in report["average"][name].items():
            assert average == pytest.approx(sum(scores[t][L] for t in TASKS) / len(TASKS))
        assert report["overall"][name] == pytest.approx(sum(report["average"][name].values()) / 2)
        needle = report["needle"][name]
        assert set(needle) == {"1800", "2600"} and all(set(by) <= {"0", "1"} for by in needle.values())
        single = [r for k, r in records.items() if k[0] == name and k[1] in SINGLE_NEEDLE_TASKS and k[2] == 1800]
        assert sum(needle["1800"][f"{r['depth']:g}"] for r in single) == pytest.approx(sum(r["score"] for r in single))
    # perplexity at the original training length (32 tokens), the same on both backends
    meg, hf = report["perplexity"]["meg"], report["perplexity"]["hf"]
    assert meg["length"] == hf["length"] == 32 and meg["documents"] == 2
    assert math.isfinite(meg["perplexity"]) and meg["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-5)
    out = session.out["ruler"]
    assert (out / "needle.png").stat().st_size > 1000
    markdown = (out / "report.md").read_text()
    assert "## meg" in markdown and "## hf" in markdown and "niah_multikey_3" in markdown


def test_parallel_layouts_answer_as_one_process(session):
    tasks = RULER_PARALLEL_TASKS.split(",")
    single = {
        k[1:]: r["answer_tokens"] for k, r in predictions(session, "ruler").items() if k[0] == "meg" and k[1] in tasks
    }
    for key in ("ruler_pp2", "ruler_dp2"):
        other = {k[1:]: r["answer_tokens"] for k, r in predictions(session, key).items()}
        assert other == single and len(other) == len(tasks) * 2 * 2, key
    scores = session.result("ruler")["scores"]["meg"]
    assert session.result("ruler_dp2")["scores"] == {"meg": {t: scores[t] for t in tasks}}
