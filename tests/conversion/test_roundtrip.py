"""Hugging Face -> Megatron -> Hugging Face on tiny random LLaMAs (GQA, tied and untied, padded vocabulary,
default / llama3 / yarn rope; safetensors sharded and single, sharded .bin), through the tools.

The shared pipeline (``conftest.pipeline``) runs the conversions and the Megatron/transformers processes
once; each test checks one claim.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conversion import tiny_models
from tests.conversion.conftest import EXTENDED, EXTENDED_SEQ

pytestmark = pytest.mark.slow
NAMES = list(tiny_models.SOURCES)


def test_every_conversion_succeeded(pipeline):
    for r in pipeline.conversions:
        if r["argv"][3] == str(pipeline.tampered_export):
            continue
        assert r["status"] == 0, f"{r['tool']} {' '.join(r['argv'])}\n{r['stderr']}"
        assert "GB/s" in r["stdout"]


def test_export_refuses_a_checkpoint_missing_tensors(pipeline):
    """The stored config says untied, the weights are tied: output_layer.weight is not in the checkpoint."""
    (r,) = [r for r in pipeline.conversions if r["argv"][3] == str(pipeline.tampered_export)]
    lines = r["stderr"].strip().splitlines()
    assert r["status"] == 2 and len(lines) == 1, r["stderr"]
    assert lines[0].startswith("convert_megatron_to_hf.py: error: ") and "cannot be loaded" in lines[0]
    assert "output_layer.weight" in lines[0]
    assert not pipeline.tampered_export.exists()
    assert not any(".partial-" in f.name for f in pipeline.tampered_export.parent.iterdir())


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("name", NAMES)
def test_megatron_logits_match_hf(pipeline, name, layout):
    """The converted checkpoint, resharded to TP=2 or split over PP=2 stages, gives the HF logits."""
    ours, theirs = pipeline.megatron_logits(name, layout), pipeline.hf_logits[name]
    assert ours.shape == theirs.shape == (2, tiny_models.SEQ, tiny_models.VOCAB)
    assert theirs.abs().max() > 1.0  # logits of order 1: the tolerance below is tight
    diff = (ours - theirs).abs().max().item()
    print(f"{name} {layout}: max |logits diff| = {diff:.2e} (max |logit| {theirs.abs().max():.2f})")
    assert diff <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_is_bit_exact(pipeline, name):
    src, out = pipeline.src[name], pipeline.export[name]
    a, b = tiny_models.read_hf_tensors(src), tiny_models.read_hf_tensors(out)
    if tiny_models.SOURCES[name][0]["tie_word_embeddings"]:
        a.pop("lm_head.weight", None)  # .bin sources carry the tied duplicate; safetensors exports do not
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # every field of the source config.json comes back unchanged (our rope keys are added beside them)
    ca = json.loads((src / "config.json").read_text())
    cb = json.loads((out / "config.json").read_text())
    changed = {k: (ca[k], cb.get(k)) for k in ca if k != "transformers_version" and cb.get(k) != ca[k]}
    assert not changed
    # tokenizer files travel byte for byte (through MEGATRON_DIR/hf)
    for file, data in tiny_models.TOKENIZER_FILES.items():
        assert (out / file).read_bytes() == data
    assert (out / "model.safetensors.index.json").exists()  # 100KB shards


def test_both_config_styles_are_written_consistently(pipeline):
    cfg = json.loads((pipeline.export["tied_llama3_bin"] / "config.json").read_text())
    params, scaling = cfg["rope_parameters"], cfg["rope_scaling"]
    assert params["rope_type"] == scaling["rope_type"] == "llama3"
    assert {k: v for k, v in params.items() if k != "rope_theta"} == scaling
    assert cfg["rope_theta"] == params["rope_theta"] == 10000.0


def test_extension_plan_is_recorded(pipeline):
    meta = json.loads((pipeline.megatron[EXTENDED] / "iter_0000000" / "megatron_resonance.json").read_text())
    rope = meta["model"]["rope"]
    assert meta["model"]["max_position_embeddings"] == EXTENDED_SEQ
    assert (rope["kind"], rope["factor"], rope["original_max_position"], rope["resonance"]) == (
        "resonance_yarn",
        4.0,
        64,
        True,
    )
    # re-importing the portable export recovers the plan exactly
    back = json.loads((pipeline.reimported / "iter_0000000" / "megatron_resonance.json").read_text())
    assert back["model"] == meta["model"]


def _beyond(ours, theirs):
    original = tiny_models.ARCH["max_position_embeddings"]
    return (ours[:, original:] - theirs[:, original:]).abs().max().item(), (ours - theirs).abs().max().item()


def test_resonance_yarn_export_in_stock_transformers(pipeline):
    """A separate process with transformers only (no megatron_resonance, no custom code) reproduces the
    Megatron model's logits, also at positions beyond the original length."""
    stock = pipeline.hf_stock
    assert stock["imported_megatron_resonance"] is False
    job = stock["jobs"][EXTENDED]
    assert job["rope_type"] == "longrope" and job["max_position_embeddings"] == EXTENDED_SEQ
    assert job["attention_scaling"] == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)
    # transformers' frequencies are the plan's (fp32), and every wavelength is an integer
    wavelengths = 2 * math.pi / torch.tensor(job["inv_freq"], dtype=torch.float64)
    assert (wavelengths - wavelengths.round()).abs().max() < 1e-4 * wavelengths.max()
    ours = pipeline.megatron_logits(EXTENDED, "tp2")
    beyond, overall = _beyond(ours, stock["logits"])
    print(f"resonance_yarn longrope export vs Megatron TP=2: max |diff| {overall:.2e}, positions >= 64: {beyond:.2e}")
    assert beyond <= 1e-4 and overall <= 1e-4
    assert (pipeline.megatron_logits(EXTENDED, "pp2") - ours).abs().max() <= 1e-5


def test_custom_rope_format_after_register(pipeline):
    custom = pipeline.hf_custom
    assert custom["rope_type"] == "megatron_resonance"
    beyond, overall = _beyond(pipeline.megatron_logits(EXTENDED, "tp2"), custom["logits"])
    print(f"resonance_yarn custom export vs Megatron TP=2: max |diff| {overall:.2e}, positions >= 64: {beyond:.2e}")
    assert beyond <= 1e-4 and overall <= 1e-4
