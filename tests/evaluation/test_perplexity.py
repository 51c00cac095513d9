"""Perplexity by length: equal to exp(mean NLL) computed independently, the same for a Megatron checkpoint and its
Hugging Face export, at TP=2, PP=2 and DP=2, over JSONL tokens, JSONL text, an indexed dataset and the default
data; reports and plots written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.evaluation.conftest import DOC_LENGTHS, LENGTHS

pytestmark = pytest.mark.slow
REL = 1e-5


def _docs(path):
    return [json.loads(line)["tokens"] for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def hf_model(session):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(session.hf, dtype=torch.float32).eval()


def _hf_nll(model, rows):
    """[rows, L-1] NLL of each row's tokens[1:] given its prefix, from transformers' logits and F.cross_entropy."""
    tokens = torch.tensor(rows)
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").double()


def test_megatron_equals_direct_forward(session):
    ppl = session.result("both")["perplexity"]["ckpt"]
    for L in LENGTHS:
        assert ppl[str(L)] == pytest.approx(session.reference[str(L)], rel=1e-6)


def test_hf_equals_transformers_nll(session, hf_model):
    ppl = session.result("both")["perplexity"]["hf_export"]
    docs = _docs(session.tokens)
    for L in LENGTHS:
        nll = _hf_nll(hf_model, [d[:L] for d in docs if len(d) >= L])
        assert ppl[str(L)] == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)


def test_megatron_checkpoint_and_hf_export_agree(session):
    ppl = session.result("both")["perplexity"]
    assert set(ppl) == {"ckpt", "hf_export"}
    for L in LENGTHS:
        assert ppl["ckpt"][str(L)] == pytest.approx(ppl["hf_export"][str(L)], rel=REL)
    stride = session.result("stride")["perplexity"]
    for L in ("32", "64"):
        assert stride["meg"][L] == pytest.approx(stride["hf"][L], rel=REL)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "cp2"])
def test_parallel_layouts_agree(session, layout):
    one = session.result("both")["perplexity"]["ckpt"]
    other = session.result(layout)
    assert other["settings"]["world_size"] == 2
    for L in LENGTHS:
        assert other["perplexity"][str(L)] == pytest.approx(one[str(L)], rel=REL)


def test_documents_used_and_skipped(session):
    details = session.result("both")["details"]
    for L in LENGTHS:
        used = [n for n in DOC_LENGTHS if n >= L]
        for name in ("ckpt", "hf_export"):
            d = details[name][str(L)]
            assert (d["documents"], d["skipped"], d["windows"]) == (len(used), len(DOC_LENGTHS) - len(used), len(used))
            assert d["tokens"] == len(used) * (L - 1)
            assert d["perplexity"] == pytest.approx(math.exp(d["nll"]))


def test_stride_equals_sliding_window_reference(session, hf_model):
    """Every token after the first scored once, by the first L-token window (S apart, the last one aligned to
    the document's end) that contains it with some context: assigned here position by position."""
    report = session.result("stride")
    stride = 8
    for L in (32, 64):
        nll = []
        for doc in (d for d in _docs(session.tokens) if len(d) >= L):
            starts = sorted({min(k, len(doc) - L) for k in range(0, len(doc), stride)})
            scored = {}
            for start, window in zip(starts, _hf_nll(hf_model, [doc[s : s + L] for s in starts]).tolist()):
                for j, value in enumerate(window):
                    scored.setdefault(start + j + 1, value)
            assert sorted(scored) == list(range(1, len(doc)))
            nll += scored.values()
        d = report["details"]["hf"][str(L)]
        assert d["tokens"] == len(nll)
        assert report["perplexity"]["hf"][str(L)] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)


def test_text_jsonl_and_indexed_dataset_agree(session):
    """Text tokenized with the tokenizer recorded by the training run == its preprocessed .bin/.idx (EOS cut)."""
    from megatron_resonance.data.tokenizer import load_tokenizer

    text, indexed = session.result("text"), session.result("indexed")
    assert text["models"]["ckpt"]["tokenizer"] == str(session.tokenizer)
    assert text["perplexity"] == indexed["perplexity"]
    tok = load_tokenizer(str(session.tokenizer))
    lengths = [len(tok.encode(json.loads(line)["text"])) for line in open(session.text)]
    for L in ("16", "64"):
        used = [n for n in lengths if n >= int(L)]
        assert text["details"]["ckpt"][L]["documents"] == len(used)
        assert indexed["details"]["ckpt"][L]["tokens"] == len(used) * (int(L) - 1)


def test_default_data_is_seeded_selection_of_held_out_files(session):
    report = session.result("default")
    d = report["details"]["ckpt"]["32"]
    assert (d["documents"], d["tokens"]) == (2, 2 * 31)
    assert d["skipped"] >= 0 and math.isfinite(report["perplexity"]["32"])
    assert report["settings"]["seed"] == 3 and report["settings"]["max_documents"] == 2


def test_reports_and_plots_written(session):
    single = session.result("text")
    assert set(single["perplexity"]) == {"16", "64"}  # one model: {length: ppl}
    assert isinstance(single["perplexity"]["16"], float)
    several = session.result("both")
    assert set(several["perplexity"]) == {"ckpt", "hf_export"}  # several: {model: {length: ppl}}
    assert several["models"]["ckpt"]["original_length"] == 32
    assert several["models"]["hf_export"]["original_length"] == 32
    assert several["models"]["ckpt"]["rope"]["kind"] == "yarn"
    for key in ("both", "stride", "text", "indexed", "default", "tp2", "pp2", "dp2"):
        out = session.out[key]
        assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        markdown = (out / "report.md").read_text()
        assert markdown.startswith("# Perplexity by context length") and "perplexity.png" in markdown
