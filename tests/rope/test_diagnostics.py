"""Critical dimension and feature gap (Eq. 8 of Resonance RoPE) against brute force and the paper."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megatron_resonance.rope import (
    KINDS,
    RopeConfig,
    compute_frequencies,
    critical_dim,
    feature_gap,
    pre_critical_mask,
    report,
)
from tests.rope import reference as ref

LLAMA2 = dict(head_dim=128, base=10000.0, original_max_position=4096)


def test_llama2_resonance_yarn_numbers():
    # LLaMA-2 (d=128, b=1e4, L=4096) with YaRN s=8 then rounding: 39 of 64 features have lambda < L
    f = compute_frequencies(RopeConfig(kind="resonance_yarn", factor=8.0, **LLAMA2))
    mask = pre_critical_mask(f, 4096)
    assert mask.dtype == torch.bool and mask.shape == (64,)
    assert int(mask.sum()) == 39
    assert critical_dim(f, 4096) == 39
    assert mask[:39].all() and not mask[39:].any()
    w = ref.resonance_wavelengths(ref.yarn(128, 1e4, 4096, 8.0))
    assert int((w < 4096).sum()) == 39
    assert (w[38], w[39]) == (3779, 4772)  # the two features either side of the critical dimension


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d,b,L,s", [(128, 1e4, 4096, 8.0), (64, 1e4, 64, 4.0), (32, 500.0, 100, 3.0)])
def test_critical_dim_matches_reference(kind, d, b, L, s):
    f = compute_frequencies(RopeConfig(kind=kind, head_dim=d, base=b, original_max_position=L, factor=s))
    inv = ref.frequencies(kind, d, b, L, s)
    w = ref.resonance_wavelengths(inv) if kind.startswith("resonance") else 2 * np.pi / inv
    expected_mask = w < L
    assert pre_critical_mask(f, L).tolist() == expected_mask.tolist()
    long = np.flatnonzero(~expected_mask)
    assert critical_dim(f, L) == (int(long[0]) if len(long) else d // 2)


def test_critical_dim_when_every_feature_is_pre_critical():
    f = compute_frequencies(RopeConfig(kind="rope", head_dim=4, base=10.0, original_max_position=1000))
    assert critical_dim(f, 1000) == 2  # wavelengths 6.28 and 19.9


# ----------------------------------------------------------------------------------------------------------
# Feature gap
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        RopeConfig(kind="resonance", **LLAMA2),
        RopeConfig(kind="resonance_yarn", factor=8.0, **LLAMA2),
        RopeConfig(kind="linear", factor=4.0, resonance=True, **LLAMA2),
        RopeConfig(kind="llama3", factor=8.0, resonance=True, **LLAMA2),
    ],
    ids=["resonance", "resonance_yarn", "linear+resonance", "llama3+resonance"],
)
def test_feature_gap_is_exactly_zero_on_pre_critical_features_under_resonance(cfg):
    f = compute_frequencies(cfg)
    L, L2 = 4096, 4096 * 8
    gap = feature_gap(f, L, L2)
    assert gap.dtype == torch.float64 and gap.shape == (64,)
    mask = pre_critical_mask(f, L)
    assert mask.sum() >= 30
    assert (gap[mask] == 0).all()  # exactly, not approximately
    assert (gap >= 0).all()


@pytest.mark.parametrize("kind,s", [("rope", 8.0), ("yarn", 8.0), ("linear", 4.0), ("ntk", 8.0), ("llama3", 8.0)])
def test_feature_gap_is_positive_without_resonance(kind, s):
    f = compute_frequencies(RopeConfig(kind=kind, factor=s, **LLAMA2))
    gap = feature_gap(f, 4096, 4096 * 8)
    pre = gap[pre_critical_mask(f, 4096)]
    assert len(pre) > 0 and pre.max() > 0
    assert (gap >= 0).all()


def test_feature_gap_is_zero_without_unseen_positions():
    f = compute_frequencies(RopeConfig(kind="rope", **LLAMA2))
    assert torch.equal(feature_gap(f, 4096, 4096), torch.zeros(64, dtype=torch.float64))
    assert torch.equal(feature_gap(f, 4096, 100), torch.zeros(64, dtype=torch.float64))


def _brute_force_gap(angle_fn, half_dim: int, L: int, L2: int) -> np.ndarray:
    """gap_i = max over n in [L, L') of min over m in [0, L) of the circular distance, O(L * L')."""
    gap = np.zeros(half_dim)
    for i in range(half_dim):
        seen = [angle_fn(m, i) for m in range(L)]
        for n in range(L, L2):
            a = angle_fn(n, i)
            nearest = min(float(ref.angular_distance(a, s)) for s in seen)
            gap[i] = max(gap[i], nearest)
    return gap


@pytest.mark.parametrize(
    "kind,d,b,L,L2,s",
    [
        ("rope", 8, 10.0, 16, 40, 1.0),
        ("resonance", 8, 10.0, 16, 40, 1.0),
        ("yarn", 12, 7.0, 24, 96, 4.0),
        ("resonance_yarn", 12, 7.0, 24, 96, 4.0),
        ("linear", 6, 30.0, 20, 45, 2.0),
        ("llama3", 8, 10.0, 32, 70, 2.0),
    ],
)
def test_feature_gap_matches_brute_force(kind, d, b, L, L2, s):
    f = compute_frequencies(RopeConfig(kind=kind, head_dim=d, base=b, original_max_position=L, factor=s))
    inv = ref.frequencies(kind, d, b, L, s)
    if kind.startswith("resonance"):
        lam = ref.resonance_wavelengths(inv)

        def angle(p, i):
            return (p % int(lam[i])) * (2 * np.pi / lam[i])
    else:

        def angle(p, i):
            return np.mod(p * inv[i], 2 * np.pi)

    expected = _brute_force_gap(angle, d // 2, L, L2)
    np.testing.assert_allclose(feature_gap(f, L, L2).numpy(), expected, rtol=0, atol=1e-9)
    assert expected.max() > 0.05  # the tiny cases do have gaps to find (long wavelengths)


def test_feature_gap_brute_force_many_small_cases():
    # a sweep over tiny plain-rope heads, so ties, wrap-around and n near 0 mod lambda all come up
    for b, L, L2 in itertools.product((3.0, 10.0, 55.5), (5, 13), (14, 31)):
        f = compute_frequencies(RopeConfig(kind="rope", head_dim=6, base=b, original_max_position=L))
        inv = ref.rope(6, b)
        expected = _brute_force_gap(lambda p, i: np.mod(p * inv[i], 2 * np.pi), 3, L, L2)
        np.testing.assert_allclose(feature_gap(f, L, L2).numpy(), expected, rtol=0, atol=1e-9)


def test_report_fields():
    f = compute_frequencies(RopeConfig(kind="resonance_yarn", factor=8.0, **LLAMA2))
    r = report(f, 32768)
    assert (r.pre_critical, r.critical_dim, r.target_max_position) == (39, 39, 32768)
    assert r.max_feature_gap_pre_critical == 0.0
    assert len(r.inv_freq) == len(r.wavelengths) == len(r.feature_gap) == 64
    assert all(float(w).is_integer() for w in r.wavelengths)
