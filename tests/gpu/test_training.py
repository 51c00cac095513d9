"""The trainer on a GPU: bf16 steps against fp32, the layer spec it builds, and its checkpoints moving between
a GPU and a CPU. Workers: ``workers/trainer_steps.py``; comparisons: ``checks.py``."""

from __future__ import annotations

import pytest

from tests.gpu import checks
from tests.gpu.conftest import precision, transfer
from tests.gpu.workers.trainer_steps import STEPS


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


@pytest.mark.gpu
@pytest.mark.parametrize("save_on, load_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_moves_between_gpu_and_cpu(tmp_path, save_on, load_on):
    """A full training checkpoint (model, distributed optimizer, scheduler, RNG) saved on one device loads on
    the other: every weight and Adam entry bit for bit, and training goes on from it."""
    saved, loaded = transfer(tmp_path, save_on, load_on)
    assert saved["device"].startswith(save_on) and loaded["device"].startswith(load_on)
    assert loaded["iteration"] == STEPS
    checks.assert_same_training_state(saved, loaded)


# ---------------------------------------------------------------- the same workers and checks on CPU ------


@pytest.mark.slow
def test_bf16_check_on_cpu(tmp_path):
    """The precision worker and its check, where CI can run them (bf16 on the CPU backend)."""
    runs = precision("cpu", tmp_path / "precision.json")
    assert runs["device"] == "cpu" and runs["spec"]["resolved"] == "local"
    checks.assert_bf16_follows_fp32(runs["losses"])


@pytest.mark.slow
def test_checkpoint_check_on_cpu(tmp_path):
    """The checkpoint worker and its check with both sides on the CPU."""
    saved, loaded = transfer(tmp_path, "cpu", "cpu")
    assert loaded["iteration"] == STEPS
    checks.assert_same_training_state(saved, loaded)
    assert saved["next_loss"] == loaded["next_loss"]  # the same device: exactly


def test_checks_fail_on_what_they_guard():
    losses = {"fp32": [5.5, 5.0, 4.5, 4.0], "bf16": [5.5, 5.01, 4.49, 4.01]}
    checks.assert_bf16_follows_fp32(losses)
    with pytest.raises(AssertionError, match="bf16 off"):  # bf16 weights never updated
        checks.assert_bf16_follows_fp32({**losses, "bf16": [5.5] * 4})
    with pytest.raises(AssertionError, match="fell only"):  # nothing learned: the comparison would say nothing
        checks.assert_bf16_follows_fp32({"fp32": [5.5] * 4, "bf16": [5.5] * 4})

    import torch

    state = {"device": "cpu", "weights": {"w": torch.ones(3)}, "scheduler_steps": 32, "next_loss": 3.0,
             "adam": [{"param": torch.ones(3), "exp_avg": torch.zeros(3), "step": torch.tensor(8.0)}]}
    same = {**state, "weights": {"w": torch.ones(3)}}
    checks.assert_same_training_state(state, same)
    for broken, message in (
        ({**state, "weights": {"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}}, "weight w"),
        ({**state, "adam": [{**state["adam"][0], "step": torch.tensor(0.0)}]}, "'step'"),
        ({**state, "scheduler_steps": 0}, ""),
        ({**state, "next_loss": 3.1}, "next loss"),
    ):
        with pytest.raises(AssertionError, match=message):
            checks.assert_same_training_state(state, broken)
