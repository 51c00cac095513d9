"""Rotary angle tables: exact against 60-digit references, exactly periodic under resonance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_resonance.rope import (
    KINDS,
    RopeConfig,
    angular_distance,
    compute_frequencies,
    rotary_angle_table,
    rotary_angles,
)
from tests.rope import reference as ref

P = 1_048_575  # 2^20 - 1: the last position of a 1M-token context
LLAMA2 = dict(head_dim=128, base=10000.0, original_max_position=4096)


def _errors_at(kind: str, positions: range):
    """Max error (rad) of our fp32 table and of naive fp32 p*theta against exact angles."""
    f = compute_frequencies(RopeConfig(kind=kind, factor=8.0, **LLAMA2))
    d = LLAMA2["head_dim"]
    ours = rotary_angle_table(f, len(positions), offset=positions.start)  # fp32 [n, d/2]
    assert ours.dtype == torch.float32 and ours.shape == (len(positions), d // 2)
    # what Megatron and HF do: outer product of fp32 positions and fp32 inv_freq
    naive = torch.outer(torch.arange(positions.start, positions.stop, dtype=torch.float32), f.inv_freq.float())
    wavelengths = ref.resonance_wavelengths(ref.frequencies(kind, d, LLAMA2["base"], 4096, 8.0))
    ours_err = naive_err = 0.0
    for row, p in enumerate(positions):
        for i in range(d // 2):
            if f.config.resonance:
                exact = ref.exact_resonance_angle(p, int(wavelengths[i]))
            else:
                exact = ref.exact_rope_angle(p, i, d, LLAMA2["base"])
            ours_err = max(ours_err, ref.circular_error(ours[row, i].item(), exact))
            naive_err = max(naive_err, ref.circular_error(naive[row, i].item(), exact))
    return ours_err, naive_err


@pytest.mark.parametrize("kind", ["resonance_yarn", "rope"])
def test_fp32_table_is_exact_at_one_million(kind):
    positions = range(P - 3, P + 1)
    ours_err, naive_err = _errors_at(kind, positions)
    print(f"{kind}: max error at p <= {P}: ours fp32 table {ours_err:.2e} rad, naive fp32 {naive_err:.2e} rad")
    assert ours_err <= 1e-6
    assert naive_err > 1e-3  # the reference can tell a wrong table from a right one


@pytest.mark.parametrize("kind", KINDS)
def test_angles_match_reference_for_small_positions(kind):
    d, b, L, s = 64, 10000.0, 256, 4.0
    f = compute_frequencies(RopeConfig(kind=kind, head_dim=d, base=b, original_max_position=L, factor=s))
    positions = torch.arange(0, 3 * L)
    angles = rotary_angles(f, positions)
    assert angles.dtype == torch.float64 and angles.shape == (3 * L, d // 2)
    assert (angles >= 0).all() and (angles < 2 * math.pi).all()
    inv = ref.frequencies(kind, d, b, L, s)
    expected = np.mod(positions.numpy()[:, None].astype(np.float64) * inv[None, :], 2 * np.pi)
    assert ref.angular_distance(angles.numpy(), expected).max() < 1e-11
    assert torch.equal(angles[0], torch.zeros(d // 2, dtype=torch.float64))


def test_table_offset_length_and_dtype():
    f = compute_frequencies(RopeConfig(kind="resonance_yarn", factor=8.0, **LLAMA2))
    full = rotary_angle_table(f, 300, dtype=torch.float64)
    part = rotary_angle_table(f, 100, offset=200, dtype=torch.float64)
    assert torch.equal(full[200:], part)
    assert rotary_angle_table(f, 7).dtype == torch.float32
    assert rotary_angle_table(f, 7, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert rotary_angle_table(f, 0).shape == (0, 64)


def test_angular_distance():
    two_pi = 2 * math.pi
    a = torch.tensor([0.0, 0.1, math.pi, 3.0, two_pi - 1e-3, 5 * two_pi + 0.25], dtype=torch.float64)
    b = torch.tensor([0.0, two_pi - 0.1, 0.0, -3.0, 1e-3, 0.0], dtype=torch.float64)
    expected = [0.0, 0.2, math.pi, two_pi - 6.0, 2e-3, 0.25]
    torch.testing.assert_close(angular_distance(a, b), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(angular_distance(b, a), angular_distance(a, b))


# ----------------------------------------------------------------------------------------------------------
# Property: with resonance on, every wavelength is an integer and the table is exactly periodic with it
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    half_dim=st.integers(1, 128),
    base=st.floats(1.5, 1e7),
    original_max_position=st.integers(1, 32768),
    factor=st.floats(1.0, 64.0),
    start=st.integers(0, 2**24),
)
def test_resonance_table_is_exactly_periodic(kind, half_dim, base, original_max_position, factor, start):
    cfg = RopeConfig(
        kind=kind,
        head_dim=2 * half_dim,
        base=base,
        original_max_position=original_max_position,
        factor=factor,
        resonance=True,
    )
    f = compute_frequencies(cfg)
    w = f.wavelengths
    assert torch.equal(w, torch.round(w)) and (w >= 1).all()
    torch.testing.assert_close(2 * math.pi / f.inv_freq, w, rtol=1e-12, atol=0)
    lam = f.integer_wavelengths
    # row 0: positions start; row 1 + k: start + lambda_k (+ 2 lambda_k on row 1 + half_dim + k)
    shifted = torch.cat([start + lam, start + 2 * lam])
    angles = rotary_angles(f, torch.cat([torch.tensor([start]), shifted]))
    idx = torch.arange(half_dim)
    assert torch.equal(angles[1 + idx, idx], angles[0])  # bitwise, per feature
    assert torch.equal(angles[1 + half_dim + idx, idx], angles[0])
    table = rotary_angle_table(f, 1, offset=start)[0]
    assert torch.equal(table, angles[0].float())
