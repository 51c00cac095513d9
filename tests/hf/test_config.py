"""``megatron_resonance.hf.config`` and ``hf.rope``: a Hugging Face config read into a ``LlamaConfig`` (every
field, both transformers styles, refused rope types), and the exported config.json, from which stock
transformers computes exactly the plan's frequencies and attention factor and ``rope_from_hf`` reads the
plan back."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import transformers
from transformers import LlamaConfig as HFLlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megatron_resonance.errors import ConversionError
from megatron_resonance.hf import config as hf_config
from megatron_resonance.hf.config import from_hf
from megatron_resonance.hf.rope import ROPE_FORMATS, rope_from_hf
from megatron_resonance.megatron.llama import LlamaConfig
from megatron_resonance.rope import RopeConfig, compute_frequencies

HEAD_DIM = 64
PLANS = {
    "rope": RopeConfig(kind="rope", head_dim=HEAD_DIM, base=10000.0, original_max_position=4096),
    "linear": RopeConfig(kind="linear", head_dim=HEAD_DIM, factor=4.0, original_max_position=4096),
    "ntk": RopeConfig(kind="ntk", head_dim=HEAD_DIM, factor=4.0, original_max_position=4096),
    "yarn": RopeConfig(kind="yarn", head_dim=HEAD_DIM, base=500000.0, factor=8.0, original_max_position=4096),
    "yarn_m": RopeConfig(
        kind="yarn",
        head_dim=HEAD_DIM,
        factor=8.0,
        original_max_position=4096,
        attention_factor=1.3,
        beta_fast=16.0,
        beta_slow=2.0,
    ),
    "llama3": RopeConfig(kind="llama3", head_dim=HEAD_DIM, base=500000.0, factor=8.0, original_max_position=8192),
    "resonance": RopeConfig(kind="resonance", head_dim=HEAD_DIM, original_max_position=4096),
    "resonance_yarn": RopeConfig(kind="resonance_yarn", head_dim=HEAD_DIM, factor=8.0, original_max_position=4096),
    "resonance_llama3": RopeConfig(
        kind="llama3", resonance=True, head_dim=HEAD_DIM, factor=8.0, original_max_position=4096
    ),
}


def model_config(rope: RopeConfig) -> LlamaConfig:
    return LlamaConfig(
        num_layers=1,
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=300,
        max_position_embeddings=rope.target_max_position,
        rope=rope,
    )


def transformers_rope(config: dict):
    """(inv_freq float64, attention_scaling) as stock transformers builds them from a config.json dict."""
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig.from_dict(copy.deepcopy(config)))
    return rotary.inv_freq.double(), rotary.attention_scaling


@pytest.mark.parametrize("style", ["both", "transformers4_keys_only", "transformers5_keys_only"])
@pytest.mark.parametrize("name", list(PLANS))
def test_stock_transformers_computes_the_plan(name, style):
    rope = PLANS[name]
    config = hf_config.export_config(model_config(rope), torch.bfloat16)
    if style == "transformers4_keys_only":
        config.pop("rope_parameters")
    elif style == "transformers5_keys_only":
        config.pop("rope_scaling"), config.pop("rope_theta")
    inv_freq, attention = transformers_rope(config)
    expected = compute_frequencies(rope)
    # transformers works in float32: relative 1e-6 is its rounding, not an encoding error
    torch.testing.assert_close(inv_freq, expected.inv_freq, rtol=1e-6, atol=0)
    assert attention == pytest.approx(expected.attention_factor, rel=1e-7)
    assert config["max_position_embeddings"] == rope.target_max_position
    assert config["megatron_resonance_rope_kind"] == rope.kind
    assert RopeConfig.from_dict(config["megatron_resonance_rope"]) == rope


@pytest.mark.parametrize("name", list(PLANS))
def test_rope_from_hf_reads_the_export_back(name):
    rope = PLANS[name]
    for fmt in ROPE_FORMATS:
        back = rope_from_hf(hf_config.export_config(model_config(rope), torch.float32, fmt), HEAD_DIM)
        a, b = compute_frequencies(back), compute_frequencies(rope)
        assert torch.equal(a.inv_freq, b.inv_freq) and a.attention_factor == b.attention_factor


def test_resonance_encodings():
    config = hf_config.export_config(model_config(PLANS["resonance_yarn"]), torch.float32)
    params = config["rope_parameters"]
    assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
    assert params["attention_factor"] == pytest.approx(0.1 * math.log(8) + 1)
    assert config["rope_scaling"] == {k: v for k, v in params.items() if k != "rope_theta"}
    custom = hf_config.export_config(model_config(PLANS["resonance_yarn"]), torch.float32, "custom")
    assert custom["rope_parameters"]["rope_type"] == custom["rope_scaling"]["rope_type"] == "megatron_resonance"


def test_custom_type_after_register():
    import megatron_resonance.hf

    megatron_resonance.hf.register()
    rope = PLANS["resonance_yarn"]
    inv_freq, attention = transformers_rope(hf_config.export_config(model_config(rope), torch.float32, "custom"))
    expected = compute_frequencies(rope)
    assert torch.equal(inv_freq, expected.inv_freq.float().double())
    assert attention == expected.attention_factor


def test_edited_resonance_config_is_refused():
    config = hf_config.export_config(model_config(PLANS["resonance_yarn"]), torch.float32)
    config["rope_parameters"]["short_factor"][3] *= 1.01
    config["rope_parameters"]["long_factor"][3] *= 1.01
    config.pop("rope_scaling")
    with pytest.raises(ValueError, match="disagree with the recorded"):
        rope_from_hf(config, HEAD_DIM)
    config = hf_config.export_config(model_config(PLANS["resonance"]), torch.float32)
    config.pop("megatron_resonance_rope")
    with pytest.raises(ValueError, match="without its megatron_resonance_rope plan"):
        rope_from_hf(config, HEAD_DIM)


def test_reference_config_keeps_its_fields_and_rope_encoding():
    reference = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 7,
        "max_position_embeddings": 16384,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    }
    rope = RopeConfig(kind="yarn", head_dim=HEAD_DIM, base=500000.0, factor=4.0, original_max_position=4096)
    out = hf_config.export_config(model_config(rope), torch.float32, reference=reference)
    assert out["bos_token_id"] == 7 and out["rope_scaling"] == reference["rope_scaling"]
    assert out["rope_parameters"]["rope_type"] == "yarn" and out["rope_parameters"]["rope_theta"] == 500000.0
    # a changed plan is re-encoded, never mixed with the reference's stale rope keys
    extended = RopeConfig(
        kind="resonance_yarn", head_dim=HEAD_DIM, base=500000.0, factor=8.0, original_max_position=4096
    )
    out = hf_config.export_config(model_config(extended), torch.float32, reference=reference)
    assert out["rope_scaling"]["rope_type"] == "longrope" and out["max_position_embeddings"] == 32768
    assert out["bos_token_id"] == 7


@pytest.mark.parametrize(
    "config, match",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "not a LLaMA model"),
        ({"model_type": "gpt2"}, "not a LLaMA model"),
        ({}, "neither architectures nor model_type"),
        ({"model_type": "llama", "attention_bias": True}, "attention_bias=True is not supported"),
    ],
)
def test_check_llama_refuses(config, match):
    base = dict(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=300,
        max_position_embeddings=64,
    )
    with pytest.raises(ConversionError, match=match):
        hf_config.check_llama({**base, **config}, "config.json")


def _as_transformers4_reads(config: dict) -> dict:
    """transformers 4.5x's reading of a config, in 5.x: with the original length given, yarn (and longrope's
    default attention factor) take the factor as max_position_embeddings / original_max_position_embeddings."""
    config = copy.deepcopy(config)
    for block in ("rope_parameters", "rope_scaling"):
        params = config.get(block) or {}
        if params.get("rope_type") in ("yarn", "longrope") and params.get("original_max_position_embeddings"):
            params["factor"] = config["max_position_embeddings"] / params["original_max_position_embeddings"]
    return config


@pytest.mark.parametrize("max_position", [2 * 4096 * 8, 4096 * 8, 4096 * 8 - 100])
@pytest.mark.parametrize("name", ["yarn", "yarn_m", "resonance_yarn", "llama3"])
def test_every_transformers_version_reads_the_same_rope(name, max_position):
    """An export whose max_position_embeddings is not original x factor (a model trained past its YaRN
    target, or a truncated one) must not be read one way by transformers 4.5x and another by 5.x: native
    yarn is used only where both agree, the per-feature encoding otherwise."""
    rope = PLANS[name]
    cfg = dataclasses.replace(model_config(rope), max_position_embeddings=max_position)
    config = hf_config.export_config(cfg, torch.bfloat16)
    expected = compute_frequencies(rope)
    for reading in (config, _as_transformers4_reads(config)):
        inv_freq, attention = transformers_rope(reading)
        torch.testing.assert_close(inv_freq, expected.inv_freq, rtol=1e-6, atol=0)
        assert attention == pytest.approx(expected.attention_factor, rel=1e-7)
    native = config["rope_parameters"]["rope_type"] == "yarn"
    assert native == (rope.kind == "yarn" and max_position == rope.target_max_position)
    assert rope_from_hf(config, HEAD_DIM) == rope


def test_reference_yarn_is_reencoded_when_versions_would_differ():
    """A source config.json kept by the importer: its native yarn is kept verbatim only when versions agree."""
    rope = PLANS["yarn"]
    source = hf_config.export_config(model_config(rope), torch.bfloat16)
    assert source["rope_parameters"]["rope_type"] == "yarn"
    longer = dataclasses.replace(model_config(rope), max_position_embeddings=2 * rope.target_max_position)
    source["max_position_embeddings"] = longer.max_position_embeddings  # the source itself was ambiguous
    config = hf_config.export_config(longer, torch.bfloat16, reference=source)
    assert config["rope_parameters"]["rope_type"] == "longrope"
    inv_freq, _ = transformers_rope(_as_transformers4_reads(config))
    torch.testing.assert_close(inv_freq, compute_frequencies(rope).inv_freq, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Reading a Hugging Face config
# ----------------------------------------------------------------------------------------------------------

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 500000.0}


def hf_llama(rope_parameters=None) -> HFLlamaConfig:
    kw = {} if rope_parameters is None else {"rope_parameters": rope_parameters}
    return HFLlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=0.01,
        tie_word_embeddings=True,
        **kw,
    )


@pytest.mark.parametrize("rope_parameters", [None, YARN], ids=["default", "yarn"])
def test_from_hf_reads_every_field(rope_parameters):
    hf = hf_llama(rope_parameters)
    cfg = from_hf(hf)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (3, 256, 688)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim) == (8, 2, 32)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (1000, 4096)
    assert (cfg.norm_epsilon, cfg.init_method_std, cfg.tie_word_embeddings) == (1e-5, 0.01, True)
    if rope_parameters is None:
        assert cfg.rope == RopeConfig(kind="rope", head_dim=32, base=10000.0, original_max_position=4096)
    else:
        assert cfg.rope == RopeConfig(kind="yarn", head_dim=32, base=500000.0, factor=4.0, original_max_position=1024)
    # the same from the plain dict (config.json) and through our own serialization
    assert from_hf(hf.to_dict()) == cfg
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("rope_parameters", [None, YARN], ids=["default", "yarn"])
def test_from_hf_frequencies_match_transformers(rope_parameters):
    hf = hf_llama(rope_parameters)
    ours = compute_frequencies(from_hf(hf).rope)
    theirs = LlamaRotaryEmbedding(hf)
    torch.testing.assert_close(ours.inv_freq.float(), theirs.inv_freq.float(), rtol=1e-6, atol=0)
    assert ours.attention_factor == pytest.approx(theirs.attention_scaling, rel=1e-12)


def test_from_hf_reads_transformers_4_rope_scaling():
    """transformers 4.5x kept rope_theta at the top and the scaling in rope_scaling."""
    legacy = {k: v for k, v in hf_llama(YARN).to_dict().items() if k != "rope_parameters"}
    legacy["rope_theta"] = 500000.0
    legacy["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    assert from_hf(legacy) == from_hf(hf_llama(YARN))


def test_from_hf_refuses_rope_types_it_cannot_carry():
    hf = hf_llama({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="unsupported Hugging Face rope type 'dynamic'"):
        from_hf(hf)


def test_model_sizes_are_from_hf_without_its_checks():
    """The sizes alone (memory estimates): also for a config whose head_dim or rope type the converters refuse."""
    config = hf_llama(YARN).to_dict()
    sizes = hf_config.model_sizes(config)
    cfg = from_hf(config)
    assert sizes == {name: getattr(cfg, name) for name in sizes}
    odd = {**config, "head_dim": 48, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}
    assert hf_config.model_sizes(odd) == sizes
    with pytest.raises(KeyError, match="vocab_size"):
        hf_config.model_sizes({k: v for k, v in config.items() if k != "vocab_size"})
