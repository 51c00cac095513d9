"""The rope flags reach the model: ``--rope-kind``, ``--rope-factor``, ``--original-max-position`` and
``--rotary-base`` decide the angles of the rotary the trainer installs, its attention factor (as
``softmax_scale``), and what the checkpoint stores.

The model comes from the entry point's own parser -> ``config_from_args`` -> ``build_model_and_optimizer``
(in ``workers/checks.py``); the expected frequencies from the papers' formulas in ``tests/rope/reference.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.rope import reference
from tests.training.conftest import ROPE_CASES, stored_config

pytestmark = pytest.mark.slow

HEAD_DIM = 16  # hidden 64 / 4 heads
#: (kind, base, original length, factor) each case of ROPE_CASES asks for
EXPECTED = {
    "default": ("rope", 10000.0, 4096, 1.0),
    "rotary_base": ("rope", 5000.0, 4096, 1.0),
    "yarn": ("yarn", 10000.0, 32, 4.0),
    "resonance_yarn": ("resonance_yarn", 5000.0, 32, 4.0),
}


def reference_inv_freq(case: str) -> np.ndarray:
    kind, base, original, factor = EXPECTED[case]
    return reference.frequencies(kind, HEAD_DIM, base, original, factor)


@pytest.mark.parametrize("case", ROPE_CASES)
def test_installed_rotary_has_the_flags_frequencies(model_checks, case):
    r = model_checks["rope"][case]
    kind, base, original, factor = EXPECTED[case]
    assert r["type"] == "ResonanceRotaryEmbedding"
    assert (r["rope"]["kind"], r["rope"]["base"], r["rope"]["head_dim"]) == (kind, base, HEAD_DIM)
    if kind != "rope":
        assert (r["rope"]["original_max_position"], r["rope"]["factor"]) == (original, factor)
    np.testing.assert_allclose(r["inv_freq"], reference_inv_freq(case), rtol=1e-12)
    np.testing.assert_allclose(r["inv_freq_fp32"], reference_inv_freq(case), rtol=1e-6)


@pytest.mark.parametrize("case", ROPE_CASES)
def test_installed_rotary_produces_the_flags_angles(model_checks, case):
    angles = np.array(model_checks["rope"][case]["angles"])  # [32 positions, d/2], in [0, 2 pi)
    expected = np.outer(np.arange(32), reference_inv_freq(case)) % (2 * math.pi)
    diff = np.abs(angles - expected)
    assert np.minimum(diff, 2 * math.pi - diff).max() < 1e-5


def test_the_flags_change_the_angles(model_checks):
    inv = {case: np.array(model_checks["rope"][case]["inv_freq"]) for case in ROPE_CASES}
    names = list(inv)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(inv[a], inv[b], rtol=1e-6), (a, b)
    # resonance: every wavelength an integer number of positions
    wavelengths = 2 * math.pi / inv["resonance_yarn"]
    np.testing.assert_allclose(wavelengths, np.round(wavelengths), atol=1e-9)


@pytest.mark.parametrize("case", ["yarn", "resonance_yarn"])
def test_yarn_attention_factor_is_folded_into_softmax_scale(model_checks, case):
    r = model_checks["rope"][case]
    m = 0.1 * math.log(4) + 1
    assert r["attention_factor"] == pytest.approx(m, rel=1e-12)
    expected = m * m / math.sqrt(HEAD_DIM)
    assert r["model_softmax_scale"] == pytest.approx(expected, rel=1e-12)
    assert r["tf_config_softmax_scale"] == pytest.approx(expected, rel=1e-12)
    assert r["core_attention_scales"] == [pytest.approx(expected, rel=1e-12)]


@pytest.mark.parametrize("case", ["default", "rotary_base"])
def test_plain_rope_keeps_the_default_softmax_scale(model_checks, case):
    r = model_checks["rope"][case]
    assert r["attention_factor"] == 1.0
    assert r["model_softmax_scale"] is None
    assert r["core_attention_scales"] == [pytest.approx(1 / math.sqrt(HEAD_DIM), rel=1e-12)]


def test_checkpoint_stores_the_rope_flags(signal_runs):
    """The run in ``signal_runs`` was started with ROPE_FLAGS; both its checkpoints record them."""
    save = signal_runs["save"]
    for ckpt in sorted(save.glob("iter_*")):
        stored = stored_config(ckpt)
        rope = stored["model"]["rope"]
        assert rope["kind"] == "resonance_yarn" and rope["resonance"] is True
        assert (rope["factor"], rope["original_max_position"], rope["base"]) == (4.0, 32, 5000.0)
        assert rope["head_dim"] == HEAD_DIM
        assert stored["model"]["max_position_embeddings"] == 128
        assert stored["run"]["model"]["rope"] == rope  # the resolved run config agrees
