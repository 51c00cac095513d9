"""Frequencies of every kind against the papers' formulas (tests/rope/reference.py) and transformers."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch

from megatron_resonance.rope import KINDS, RopeConfig, compute_frequencies, resonance_round
from tests.rope import reference as ref

# (head_dim, base, L, s): LLaMA-2 7B 4K -> 32K, Llama-3.1-like, a PosGen-sized head, odd values
CONFIGS = [
    (128, 10000.0, 4096, 8.0),
    (128, 500000.0, 8192, 4.0),
    (64, 10000.0, 64, 4.0),
    (96, 1234.5, 1000, 2.5),
    (16, 100.0, 32, 16.0),
]


def _cfg(kind, d, b, L, s, **kw):
    return RopeConfig(kind=kind, head_dim=d, base=b, original_max_position=L, factor=s, **kw)


@pytest.mark.parametrize("d,b,L,s", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_matches_the_papers_formulas(kind, d, b, L, s):
    f = compute_frequencies(_cfg(kind, d, b, L, s))
    expected = ref.frequencies(kind, d, b, L, s)
    assert f.inv_freq.dtype == torch.float64
    assert f.inv_freq.shape == (d // 2,)
    np.testing.assert_allclose(f.inv_freq.numpy(), expected, rtol=1e-12, atol=0)
    m = ref.yarn_attention_factor(s) if kind in ("yarn", "resonance_yarn") else 1.0
    assert f.attention_factor == pytest.approx(m, rel=1e-14)


def test_rope_ignores_factor_and_scaled_kinds_reduce_to_rope_at_factor_one():
    plain = compute_frequencies(_cfg("rope", 128, 1e4, 4096, 1.0)).inv_freq
    np.testing.assert_allclose(compute_frequencies(_cfg("rope", 128, 1e4, 4096, 8.0)).inv_freq, plain, rtol=0)
    for kind in ("linear", "ntk", "yarn", "llama3"):
        f = compute_frequencies(_cfg(kind, 128, 1e4, 4096, 1.0))
        np.testing.assert_allclose(f.inv_freq, plain, rtol=1e-14, err_msg=kind)
        assert f.attention_factor == 1.0


def test_ntk_with_a_single_feature():
    # d = 2: the only feature is theta_0 = b^0 = 1 for any base; d/(d-2) must not divide by zero
    f = compute_frequencies(_cfg("ntk", 2, 1e4, 4096, 4.0))
    assert f.inv_freq.tolist() == [1.0]


# ----------------------------------------------------------------------------------------------------------
# Resonance
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,b,L,s", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_resonance_wavelengths_are_the_rounded_wavelengths(kind, d, b, L, s):
    f = compute_frequencies(_cfg(kind, d, b, L, s, resonance=True))
    expected = ref.resonance_wavelengths(ref.frequencies(kind, d, b, L, s))
    w = f.wavelengths
    assert torch.equal(w, torch.round(w)), "every resonance wavelength is an integer"
    assert f.integer_wavelengths.tolist() == expected.tolist()
    # theta~ = 2 pi / lambda~ to the last bits
    np.testing.assert_allclose(f.inv_freq.numpy(), 2 * math.pi / expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("s", [1.5, 2.0, 4.0, 8.0, 16.0, 32.0])
def test_resonance_yarn_keeps_yarns_attention_factor(s):
    f = compute_frequencies(_cfg("resonance_yarn", 128, 1e4, 4096, s))
    assert f.attention_factor == pytest.approx(0.1 * math.log(s) + 1, rel=1e-14)
    assert f.config.resonance and f.config.base_kind == "yarn"


def test_resonance_is_an_orthogonal_switch():
    for alias, base_kind in (("resonance", "rope"), ("resonance_yarn", "yarn")):
        a = compute_frequencies(_cfg(alias, 128, 1e4, 4096, 8.0))
        b = compute_frequencies(_cfg(base_kind, 128, 1e4, 4096, 8.0, resonance=True))
        assert torch.equal(a.inv_freq, b.inv_freq)
        assert a.attention_factor == b.attention_factor
    # resonance over linear interpolation: lambda~_i = round(2 pi s / theta_i)
    lin = compute_frequencies(_cfg("linear", 128, 1e4, 4096, 8.0, resonance=True))
    assert lin.config.resonance and lin.config.base_kind == "linear"
    expected = [math.floor(2 * math.pi * 8.0 * 1e4 ** (2 * i / 128) + 0.5) for i in range(64)]
    assert lin.integer_wavelengths.tolist() == expected
    assert compute_frequencies(_cfg("linear", 128, 1e4, 4096, 8.0)).integer_wavelengths is None


def test_resonance_rounds_in_float64():
    # d = 128, b = 1763: feature 48 has wavelength 2 pi * 1763^0.75 = 1709.49999..., which rounds to 1709;
    # the same formula carried out in fp32 lands on the other side of .5 and gives 1710.
    d, b, i = 128, 1763.0, 48
    with localcontext() as ctx:
        ctx.prec = 50
        exact = ref.TWO_PI * (Decimal(2 * i) / Decimal(d) * Decimal(b).ln()).exp()
    assert Decimal("1709.4999") < exact < Decimal("1709.5")
    fp32_theta = 1.0 / torch.tensor(b, dtype=torch.float32) ** (torch.tensor(2.0 * i) / d)
    assert torch.round(torch.tensor(2 * math.pi, dtype=torch.float32) / fp32_theta).item() == 1710.0

    f = compute_frequencies(_cfg("resonance", d, b, 4096, 1.0))
    assert f.inv_freq.dtype == torch.float64
    assert f.integer_wavelengths[i].item() == 1709
    # resonance_round itself promotes fp32 input to float64 before dividing
    assert resonance_round(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------
# Hugging Face transformers as a second reference
# ----------------------------------------------------------------------------------------------------------


def _hf_inv_freq(rope_type: str, d: int, b: float, L: int, s: float, **extra):
    """inv_freq and attention factor from transformers' own ROPE_INIT_FUNCTIONS (5.x or 4.57)."""
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": rope_type, "factor": s, "original_max_position_embeddings": L, **extra}
    common = dict(hidden_size=2 * d, num_attention_heads=2, head_dim=d, max_position_embeddings=int(round(L * s)))
    if int(transformers.__version__.split(".")[0]) >= 5:
        config = LlamaConfig(**common, rope_parameters={"rope_theta": b, **rope})
    else:  # 4.57: rope_theta outside, scaling settings in rope_scaling
        config = LlamaConfig(**common, rope_theta=b, rope_scaling=rope)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq, attention_factor


# transformers computes in fp32: compare at fp32 resolution (a few ulps of pow, divide and ramp blend)
HF_RTOL = 1e-6


@pytest.mark.parametrize("d,b,L,s", CONFIGS)
def test_yarn_matches_transformers(d, b, L, s):
    for kind in ("yarn", "resonance_yarn"):
        ours = compute_frequencies(_cfg(kind, d, b, L, s))
        hf, m = _hf_inv_freq("yarn", d, b, L, s, beta_fast=32.0, beta_slow=1.0)
        assert hf.dtype == torch.float32
        if kind == "yarn":
            torch.testing.assert_close(ours.inv_freq.float(), hf, rtol=HF_RTOL, atol=0)
        else:  # rounding HF's frequencies gives our wavelengths
            hf_w = torch.round(2 * math.pi / hf.double())
            assert torch.equal(ours.wavelengths, hf_w)
        assert ours.attention_factor == pytest.approx(m, rel=1e-12)


def test_yarn_custom_betas_and_attention_factor_match_transformers():
    d, b, L, s = 128, 1e4, 4096, 8.0
    ours = compute_frequencies(_cfg("yarn", d, b, L, s, beta_fast=16.0, beta_slow=2.0, attention_factor=1.5))
    hf, m = _hf_inv_freq("yarn", d, b, L, s, beta_fast=16.0, beta_slow=2.0, attention_factor=1.5)
    torch.testing.assert_close(ours.inv_freq.float(), hf, rtol=HF_RTOL, atol=0)
    assert ours.attention_factor == m == 1.5
    # and the betas actually change something
    default = compute_frequencies(_cfg("yarn", d, b, L, s)).inv_freq
    assert not torch.allclose(ours.inv_freq, default)


@pytest.mark.parametrize("d,b,L,s", CONFIGS)
def test_llama3_matches_transformers(d, b, L, s):
    ours = compute_frequencies(_cfg("llama3", d, b, L, s))
    hf, m = _hf_inv_freq("llama3", d, b, L, s, low_freq_factor=1.0, high_freq_factor=4.0)
    torch.testing.assert_close(ours.inv_freq.float(), hf, rtol=HF_RTOL, atol=0)
    assert ours.attention_factor == m == 1.0


# ----------------------------------------------------------------------------------------------------------
# Config validation and round trip
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="alibi"),
        dict(head_dim=127),
        dict(head_dim=0),
        dict(base=1.0),
        dict(base=0.5),
        dict(base=float("nan")),
        dict(base=float("inf")),
        dict(factor=0.5),
        dict(factor=float("nan")),
        dict(factor=float("inf")),
        dict(original_max_position=0),
    ],
)
def test_bad_configs_raise(kw):
    with pytest.raises(ValueError):
        RopeConfig(**kw)


def test_config_round_trip_and_unknown_keys():
    cfg = RopeConfig(kind="resonance_yarn", factor=8.0)
    assert cfg.resonance is True
    assert cfg.target_max_position == 32768
    assert RopeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="rope_theta"):
        RopeConfig.from_dict({**cfg.to_dict(), "rope_theta": 1e4})
