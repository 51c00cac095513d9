"""``SDPAAttention`` computes what megatron's local ``DotProductAttention`` computes (measured in the
``model_checks`` worker, ``workers/sdpa_attention_checks.py``: GQA with 4 heads / 2 groups, softmax_scale
0.3, forward and backward)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("mask", ["causal_no_mask", "explicit_causal_and_padding"])
def test_sdpa_equals_dot_product_attention(model_checks, mask):
    record = model_checks["check_sdpa_matches_local_attention"][mask]
    assert record["shape"] == record["ref_shape"] == [24, 2, 4 * 32]
    assert record["scales"] == [0.3, 0.3]
    assert record["forward"] < 1e-5, record
    for name, rel in zip("qkv", record["grads"]):
        assert rel < 1e-5, (name, rel)


def test_padding_mask_is_applied(model_checks):
    assert model_checks["check_sdpa_matches_local_attention"]["padding_changes_output"] > 1e-3
