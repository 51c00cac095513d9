"""Resonance YaRN on a GPU against its Hugging Face export: a tiny GQA LLaMA (tests/conversion/tiny_models.py)
converted with a resonance_yarn plan (s = 4: 64 -> 256 positions) and exported by the project's converters;
the Megatron checkpoint's logits on CUDA (fp32) against stock transformers' logits of the export (the
reference the CPU conversion tests use, computed on CPU), at every position up to 4x the original length."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conversion import tiny_models
from tests.conversion.conftest import EXTENDED_SEQ, WORKERS
from tests.launch import python

#: as the CPU conversion tests (transformers' own angles are fp32 p * theta, ~1e-5 off at these positions)
LOGITS_ATOL = 1e-4


@pytest.mark.gpu
def test_resonance_yarn_logits_on_cuda_match_the_hf_export(tmp_path):
    src, megatron, export = tmp_path / "hf", tmp_path / "megatron", tmp_path / "export"
    tiny_models.write_source("gqa", src)
    tokens = tmp_path / "tokens.pt"
    torch.save(tiny_models.tokens(EXTENDED_SEQ, seed=2), tokens)

    plan, results = tmp_path / "convert_plan.json", tmp_path / "convert_results.json"
    plan.write_text(json.dumps({"commands": [
        ["hf_to_megatron", ["--load", str(src), "--save", str(megatron), "--rope-kind", "resonance_yarn",
                            "--rope-factor", "4", "--no-progress"]],
        ["megatron_to_hf", ["--load", str(megatron), "--save", str(export), "--no-progress"]],
    ]}))
    python(WORKERS / "convert_all.py", plan, results)
    for r in json.loads(results.read_text()):
        assert r["status"] == 0, f"{r['tool']} {' '.join(r['argv'])}\n{r['stderr']}"

    plan = tmp_path / "megatron_plan.json"
    plan.write_text(json.dumps({"jobs": [{"name": "resonance_yarn", "checkpoint": str(megatron),
                                          "tokens": str(tokens)}]}))
    python(WORKERS / "megatron_logits.py", plan, tmp_path, "tp1")  # one process, on the GPU
    ours = torch.load(tmp_path / "resonance_yarn.tp1.pt")

    plan, out = tmp_path / "hf_plan.json", tmp_path / "hf.json"
    plan.write_text(json.dumps({"jobs": [{"name": "resonance_yarn", "model": str(export), "tokens": str(tokens),
                                          "out": str(tmp_path / "hf_logits.pt")}]}))
    python(WORKERS / "hf_logits.py", plan, out)
    stock = json.loads(out.read_text())
    theirs = torch.load(tmp_path / "hf_logits.pt")

    assert stock["jobs"]["resonance_yarn"]["rope_type"] == "longrope"  # stock transformers, no custom code
    assert ours.shape == theirs.shape == (2, EXTENDED_SEQ, tiny_models.VOCAB)
    assert theirs.abs().max() > 1.0  # logits of order 1: the tolerance is tight
    original = tiny_models.ARCH["max_position_embeddings"]
    beyond = (ours[:, original:] - theirs[:, original:]).abs().max().item()
    overall = (ours - theirs).abs().max().item()
    print(f"Megatron on CUDA vs HF export: max |diff| {overall:.2e}, positions >= {original}: {beyond:.2e}")
    assert beyond <= LOGITS_ATOL and overall <= LOGITS_ATOL
