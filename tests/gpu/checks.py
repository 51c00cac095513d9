"""The comparisons of the gpu tier, shared with their CPU-tier tests (which also show that they can fail)."""

from __future__ import annotations

import torch

#: |bf16 loss - fp32 loss| allowed at every step (nats): bf16 keeps 8 significant bits, so logits and the
#: loss differ by ~1e-3 relative (measured on CPU: <= 4e-3 over 8 steps); a bf16 path that fails to train
#: (an update lost, weights left at their initialization) is off by the loss's whole fall, >= 1.0
BF16_LOSS_TOLERANCE = 0.05
#: how far the fp32 loss must fall over the steps, so that the comparison above means something
MIN_LOSS_FALL = 1.0
#: relative difference of the next step's loss computed on two devices from the same state (fp32; kernels
#: and reduction orders differ)
DEVICE_LOSS_RTOL = 1e-3


def assert_bf16_follows_fp32(losses: dict) -> None:
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert len(fp32) == len(bf16) > 1
    assert fp32[0] - fp32[-1] >= MIN_LOSS_FALL, f"fp32 loss fell only {fp32[0] - fp32[-1]:.3f}: {fp32}"
    worst = max(abs(a - b) for a, b in zip(fp32, bf16))
    assert worst <= BF16_LOSS_TOLERANCE, f"bf16 off by {worst:.3g} nats (fp32 {fp32}, bf16 {bf16})"


def assert_same_training_state(saved: dict, loaded: dict) -> None:
    """Weights, Adam state and scheduler count bit for bit; the next step's loss within DEVICE_LOSS_RTOL."""
    assert sorted(saved["weights"]) == sorted(loaded["weights"])
    for name, tensor in saved["weights"].items():
        assert torch.equal(tensor, loaded["weights"][name]), f"weight {name} differs after the load"
    assert len(saved["adam"]) == len(loaded["adam"]) > 0
    for i, (a, b) in enumerate(zip(saved["adam"], loaded["adam"])):
        assert sorted(a) == sorted(b), f"Adam state {i}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
            assert same, f"Adam state {i} '{key}' differs after the load"
    assert saved["scheduler_steps"] == loaded["scheduler_steps"], "scheduler steps differ"
    assert abs(saved["next_loss"] - loaded["next_loss"]) <= DEVICE_LOSS_RTOL * abs(saved["next_loss"]), (
        f"next loss {saved['next_loss']} ({saved['device']}) vs {loaded['next_loss']} ({loaded['device']})")
