"""The trainer on a GPU: bf16 steps against fp32, and the layer spec it builds. Worker:
``workers/trainer_steps.py precision``; comparison: ``checks.py``."""

from __future__ import annotations

import pytest

from tests.gpu import checks
from tests.gpu.conftest import precision


def _transformer_engine_imports() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.gpu
def test_bf16_steps_follow_fp32(precision_runs):
    """Same weights, same batch, 8 steps: bf16 (fp32 main weights) stays within BF16_LOSS_TOLERANCE of fp32."""
    assert precision_runs["device"].startswith("cuda")
    print(precision_runs["losses"])
    checks.assert_bf16_follows_fp32(precision_runs["losses"])


@pytest.mark.gpu
def test_layer_spec_is_transformer_engine_when_it_imports(precision_runs, record_property):
    """With Transformer Engine the trainer builds TE's layers (and its fused RoPE); without, the local spec with
    torch SDPA core attention. The spec that ran is recorded (JUnit property ``layer_spec``; gpu-check reports it)."""
    spec = precision_runs["spec"]
    record_property("layer_spec", spec["resolved"])
    print(f"layer spec: {spec}")
    if _transformer_engine_imports():
        assert spec["resolved"] == "te"
        assert spec["core_attention"] == "TEDotProductAttention"
        assert spec["linear_qkv"] == "TELayerNormColumnParallelLinear"
        assert spec["apply_rope_fusion"]
    else:
        assert spec["resolved"] == "local"
        assert (spec["core_attention"], spec["linear_qkv"]) == ("SDPAAttention", "ColumnParallelLinear")


# ---------------------------------------------------------------- the same worker and check on CPU --------


@pytest.mark.slow
def test_bf16_check_on_cpu(tmp_path):
    """The precision worker and its check, where CI can run them (bf16 on CPU)."""
    runs = precision("cpu", tmp_path / "precision.json")
    assert runs["device"] == "cpu" and runs["spec"]["resolved"] == "local"
    checks.assert_bf16_follows_fp32(runs["losses"])


def test_precision_check_fails_on_what_it_guards():
    losses = {"fp32": [5.5, 5.0, 4.5, 4.0], "bf16": [5.5, 5.01, 4.49, 4.01]}
    checks.assert_bf16_follows_fp32(losses)
    with pytest.raises(AssertionError, match="bf16 off"):  # bf16 weights never updated
        checks.assert_bf16_follows_fp32({**losses, "bf16": [5.5] * 4})
    with pytest.raises(AssertionError, match="fell only"):  # nothing learned: the comparison would say nothing
        checks.assert_bf16_follows_fp32({"fp32": [5.5] * 4, "bf16": [5.5] * 4})
