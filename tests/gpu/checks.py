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
        f"next loss {saved['next_loss']} ({saved['device']}) vs {loaded['next_loss']} ({loaded['device']})"
    )


#: (loss rtol, tensor tolerance) of ``local_compiled`` against ``local`` from the same weights and batch. fp32:
#: Inductor reorders float sums (measured on CPU: logits and gradients within 5e-7 of each tensor's largest
#: value, the loss bit-identical). bf16: eager rounds every element-wise result to bf16, Inductor computes a
#: fused chain in fp32 and rounds once (a few bf16 ulps, 2^-8 relative each). A wrong rotation, norm or gate
#: is off by O(1).
COMPILED_TOLERANCE = {"fp32": (1e-5, 1e-5), "bf16": (5e-3, 3e-2)}


def assert_compiled_matches_eager(results: dict, tensors: dict) -> None:
    """``workers/local_compiled.py``'s two runs: same loss, logits and gradients within the dtype's tolerance
    (fp32: per element, against the tensor's largest value; bf16: the relative L2 error of each tensor), the
    same checkpoint keys, every layer compiled into graphs without a break, one compilation for all layers."""
    loss_rtol, tol = COMPILED_TOLERANCE[results["dtype"]]
    eager, compiled = results["local"], results["local_compiled"]
    for key in ("state_dict_keys", "sharded_state_dict_keys"):
        assert compiled[key] == eager[key], f"{key} differ: {sorted(set(compiled[key]) ^ set(eager[key]))}"
    assert not any(eager["compiled_layers"]) and all(compiled["compiled_layers"])
    assert compiled["dynamo"]["graph_breaks"] == 0, f"the compiled layers break into pieces: {compiled['dynamo']}"
    assert compiled["dynamo"]["unique_graphs"] <= 2, f"one graph (no-grad and training) serves every layer: {compiled}"
    assert abs(compiled["loss"] - eager["loss"]) <= loss_rtol * abs(eager["loss"]), (
        f"loss {compiled['loss']} compiled vs {eager['loss']} eager"
    )
    a, b = tensors["local"], tensors["local_compiled"]
    assert sorted(a) == sorted(b)
    for name in a:
        if results["dtype"] == "fp32":
            worst = float((a[name] - b[name]).abs().max() / a[name].abs().max())
        else:
            worst = float((a[name] - b[name]).norm() / a[name].norm())
        assert worst <= tol, f"{name}: compiled vs eager off by {worst:.3g} (relative), more than {tol}"
