"""The Hugging Face boundary on a GPU machine, with a tiny GQA LLaMA (tests/conversion/tiny_models.py) and the
project's converters (tests/conversion/workers): Resonance YaRN logits of a Megatron checkpoint on CUDA
against stock transformers' logits of its export, and the converters themselves run where CUDA is visible."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conversion import tiny_models
from tests.conversion.conftest import EXTENDED_SEQ, WORKERS
from tests.gpu.conftest import DEVICE_ENV
from tests.launch import python

#: as the CPU conversion tests (transformers' own angles are fp32 p * theta, ~1e-5 off at these positions)
LOGITS_ATOL = 1e-4


def _round_trip(root, src, device: str, *plan) -> tuple:
    """HF ``src`` -> Megatron -> HF through the converters on ``device``; (megatron dir, export dir)."""
    megatron, export = root / f"megatron_{device}", root / f"export_{device}"
    commands = [
        ["hf_to_megatron", ["--load", str(src), "--save", str(megatron), *plan, "--no-progress"]],
        ["megatron_to_hf", ["--load", str(megatron), "--save", str(export), "--no-progress"]],
    ]
    plan_file, results = root / f"convert_{device}.json", root / f"convert_{device}_results.json"
    plan_file.write_text(json.dumps({"commands": commands}))
    python(WORKERS / "convert_all.py", plan_file, results, env=DEVICE_ENV[device])
    for r in json.loads(results.read_text()):
        assert r["status"] == 0, f"{r['tool']} {' '.join(r['argv'])} on {device}\n{r['stderr']}"
    return megatron, export


@pytest.mark.gpu
def test_resonance_yarn_logits_on_cuda_match_the_hf_export(tmp_path):
    """Converted on CPU with a resonance_yarn plan (s = 4: 64 -> 256 positions); the checkpoint's logits on CUDA
    (fp32) against stock transformers' logits of the export (on CPU: the CPU conversion tests' reference), at
    every position up to 4x the original length."""
    src = tmp_path / "hf"
    tiny_models.write_source("gqa", src)
    tokens = tmp_path / "tokens.pt"
    torch.save(tiny_models.tokens(EXTENDED_SEQ, seed=2), tokens)
    megatron, export = _round_trip(tmp_path, src, "cpu", "--rope-kind", "resonance_yarn", "--rope-factor", "4")

    plan = tmp_path / "megatron_plan.json"
    plan.write_text(
        json.dumps({"jobs": [{"name": "resonance_yarn", "checkpoint": str(megatron), "tokens": str(tokens)}]})
    )
    python(WORKERS / "megatron_logits.py", plan, tmp_path, "tp1")  # one process, on the GPU (fp32)
    ours = torch.load(tmp_path / "resonance_yarn.tp1.pt")

    plan, out = tmp_path / "hf_plan.json", tmp_path / "hf.json"
    plan.write_text(
        json.dumps(
            {
                "jobs": [
                    {
                        "name": "resonance_yarn",
                        "model": str(export),
                        "tokens": str(tokens),
                        "out": str(tmp_path / "hf_logits.pt"),
                    }
                ]
            }
        )
    )
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


@pytest.mark.gpu
def test_converters_round_trip_on_a_gpu_machine(tmp_path):
    """HF -> Megatron -> HF in a process that sees the GPU (where megatron builds its layers on it): every
    tensor comes back bit for bit, as on CPU."""
    src = tmp_path / "hf"
    tiny_models.write_source("gqa", src)
    _, export = _round_trip(tmp_path, src, "cuda")
    before, after = tiny_models.read_hf_tensors(src), tiny_models.read_hf_tensors(export)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
