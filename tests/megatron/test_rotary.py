"""``megatron_resonance.megatron.rotary``: the Megatron rotary module carries the rope library's angles.

Module-level tests run in the pytest process (building a ``ResonanceRotaryEmbedding`` needs no
parallel state); tests that need a built model or cpu_compat read the ``model_checks`` worker, whose checks
of this module are in ``workers/rotary_checks.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_resonance.megatron.rotary import ResonanceRotaryEmbedding, softmax_scale_for
from megatron_resonance.rope import KINDS, RopeConfig, compute_frequencies, rotary_angle_table

HEAD_DIM = 32


def rope_config(kind: str, **kw) -> RopeConfig:
    if kind in ("rope", "resonance"):
        return RopeConfig(kind=kind, head_dim=HEAD_DIM, **kw)
    return RopeConfig(kind=kind, head_dim=HEAD_DIM, factor=4.0, original_max_position=32, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_is_the_libraries_angles_in_rotate_half_layout(kind):
    rope = rope_config(kind)
    emb = ResonanceRotaryEmbedding(rope)(100)
    angles = rotary_angle_table(compute_frequencies(rope), 100)
    assert emb.shape == (100, 1, 1, HEAD_DIM)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb[:, 0, 0], torch.cat([angles, angles], dim=-1), rtol=0, atol=0)


def test_interleaved_layout():
    rope = rope_config("resonance_yarn")
    emb = ResonanceRotaryEmbedding(rope, rotary_interleaved=True)(10)
    angles = rotary_angle_table(compute_frequencies(rope), 10)
    assert torch.equal(emb[:, 0, 0, 0::2], angles) and torch.equal(emb[:, 0, 0, 1::2], angles)


@pytest.mark.parametrize("kind", ["rope", "resonance", "yarn", "resonance_yarn"])
def test_offset_continues_the_sequence(kind):
    module = ResonanceRotaryEmbedding(rope_config(kind))
    full = module(50)
    assert torch.equal(module(20, offset=30), full[30:])
    assert torch.equal(module.get_freqs_non_repeated(20, 30), full[30:, 0, 0, : HEAD_DIM // 2])


def test_large_offsets_stay_exact():
    """Resonance: angle(p) = (p mod lambda) * 2pi/lambda, in [0, 2pi), computed exactly at p ~ 2^20."""
    rope = rope_config("resonance_yarn")
    module = ResonanceRotaryEmbedding(rope)
    offset = 2**20 - 7
    got = module(7, offset=offset)[:, 0, 0, : HEAD_DIM // 2].double()
    wavelengths = compute_frequencies(rope).integer_wavelengths
    p = torch.arange(offset, offset + 7)[:, None]
    expected = (p % wavelengths).double() * (2 * math.pi / wavelengths.double())
    assert (got - expected).abs().max() < 1e-6
    assert got.min() >= 0 and got.max() < 2 * math.pi


def test_inv_freq_attribute_is_the_plan():
    rope = rope_config("resonance_yarn")
    module = ResonanceRotaryEmbedding(rope)
    assert module.inv_freq.dtype == torch.float32
    torch.testing.assert_close(module.inv_freq, compute_frequencies(rope).inv_freq.float())
    assert module.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)


def test_rope_kind_matches_megatrons_own_rotary_embedding():
    stock = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    ours = ResonanceRotaryEmbedding(rope_config("rope"))
    # megatron's fp32 p*theta vs our float64 reduction: equal up to fp32 rounding of the angle
    torch.testing.assert_close(
        torch.cos(ours.get_freqs_non_repeated(256)), torch.cos(stock.get_freqs_non_repeated(256)), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("kind", KINDS)
def test_softmax_scale_for(kind):
    rope = rope_config(kind)
    scale = softmax_scale_for(rope)
    if kind in ("yarn", "resonance_yarn"):
        m = 0.1 * math.log(4.0) + 1
        assert scale == pytest.approx(m * m / math.sqrt(HEAD_DIM), rel=1e-15)
    else:
        assert scale is None
    custom = RopeConfig(kind="yarn", head_dim=HEAD_DIM, factor=4.0, original_max_position=32, attention_factor=1.5)
    assert softmax_scale_for(custom) == pytest.approx(1.5**2 / math.sqrt(HEAD_DIM))


def test_softmax_scale_equals_hugging_face_cos_sin_scaling():
    """HF multiplies cos and sin by YaRN's m; megatron keeps cos/sin and uses softmax_scale = m^2/sqrt(d).
    The attention logits agree (positions past the original length included)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from megatron_resonance.hf.config import from_hf

    hf_config = HFLlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=256,
        num_hidden_layers=1,
        vocab_size=256,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        },
    )
    rope = from_hf(hf_config).rope
    s = 128
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 4, s, HEAD_DIM, generator=g, dtype=torch.float64)  # HF layout [b, h, s, d]

    hf_rotary = LlamaRotaryEmbedding(hf_config)
    assert hf_rotary.attention_scaling == pytest.approx(compute_frequencies(rope).attention_factor)
    cos, sin = hf_rotary(q, torch.arange(s)[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    hf_logits = q_hf @ k_hf.transpose(-1, -2) / math.sqrt(HEAD_DIM)

    freqs = ResonanceRotaryEmbedding(rope)(s).double()
    q_mg, k_mg = (_apply_rotary_pos_emb_bshd(t.permute(2, 0, 1, 3), freqs).permute(1, 2, 0, 3) for t in (q, k))
    mg_logits = (q_mg @ k_mg.transpose(-1, -2)) * softmax_scale_for(rope)

    # HF rounds p*theta to fp32 before cos/sin, we reduce angles in float64 then round: ~1e-6 apart
    rel = ((mg_logits - hf_logits).abs().max() / hf_logits.abs().max()).item()
    assert rel < 5e-6, rel
    # With identical float64 angles the two formulations agree to rounding: the scale is exact.
    cos64, sin64 = (f(freqs[:, 0, 0]).double()[None] * hf_rotary.attention_scaling for f in (torch.cos, torch.sin))
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos64, sin64)
    hf_logits = q_hf @ k_hf.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    assert ((mg_logits - hf_logits).abs().max() / hf_logits.abs().max()).item() < 1e-12
    # and the scale is what makes them agree: megatron's default 1/sqrt(d) is off by m^2 ~ 1.30
    unscaled = (q_mg @ k_mg.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    assert ((unscaled - hf_logits).abs().max() / hf_logits.abs().max()).item() > 0.1


# ---------------------------------------------------------------------------------------------------------
# With a built model (worker process)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rope", "yarn", "resonance_yarn"])
@pytest.mark.parametrize("how", ["built", "installed_after_rope"])
def test_install_rotary_sets_softmax_scale(model_checks, kind, how):
    record = model_checks["check_install_rotary_scale"][kind][how]
    assert record["rotary_kind"] == kind
    if kind == "rope":
        assert record["config_softmax_scale"] is None
        assert record["core_attention_scales"] == [pytest.approx(1 / math.sqrt(HEAD_DIM))]
    else:
        m = 0.1 * math.log(4.0) + 1
        assert record["config_softmax_scale"] == pytest.approx(m * m / math.sqrt(HEAD_DIM), rel=1e-15)
        assert record["core_attention_scales"] == [pytest.approx(m * m / math.sqrt(HEAD_DIM), rel=1e-15)]


def test_context_parallel_slicing_is_megatrons(model_checks):
    for rank, record in model_checks["check_context_parallel_slicing"].items():
        assert record["shape"] == [32, 1, 1, HEAD_DIM], rank
        assert record["equals_megatron_slicing"], rank
        assert record["equals_expected_chunks"], rank
        assert record["packed_seq_unsliced"], rank


def test_swap_reaches_the_model(model_checks):
    """A model built with position_embedding_type='rope': its logits change when our rotary plan does."""
    record = model_checks["check_rope_swap_changes_logits"]
    assert record["rope_vs_resonance_yarn_max_abs"] > 1e-3 * record["logits_max_abs"]
    assert record["reinstalled_rope_equal"]
    assert record["ours_vs_megatron_stock_rope_max_abs"] < 1e-5 * max(1.0, record["logits_max_abs"])
