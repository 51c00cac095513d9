"""``cpu_speed``: each replacement computes what megatron's own code computes, and the switch puts megatron's code
back. Pure functions are checked here (nothing is enabled in the pytest process); the process-wide parts in
``workers/cpu_speed_checks.py`` (the ``model_checks`` worker). The same losses and gradients at every parallel
layout with the measures on and off: ``test_parallel_equivalence.py``."""

from __future__ import annotations

import pytest
import torch
from megatron.core.utils import local_multi_tensor_scale

from megatron_resonance.megatron.cpu_speed import _logits_max, _multi_tensor_l2norm, _multi_tensor_scale


def _tensors(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in ((7, 5), (13,), (3, 4, 2), (1,))]


def test_l2norm_matches_megatron_fallback():
    tensors = _tensors(0)
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = _multi_tensor_l2norm(2048 * 32, flag, [tensors], False)
    # megatron's fallback (local_multi_tensor_l2_norm), whose result it puts on device="cuda"
    expected = torch.norm(torch.tensor([torch.norm(t) for t in tensors]))
    assert ours.shape == (1,) and ours.dtype == torch.float32
    assert torch.allclose(ours[0], expected, rtol=1e-6)
    # bf16 tensors (main grads of a bf16 model without fp32 main grads): the norm comes back in fp32
    half = _tensors(1, torch.bfloat16)
    ours, _ = _multi_tensor_l2norm(2048 * 32, flag, [half], False)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours[0], torch.norm(torch.stack([torch.norm(t.float()) for t in half])), rtol=1e-2)


def test_l2norm_of_no_tensors_is_zero():
    ours, _ = _multi_tensor_l2norm(2048 * 32, torch.zeros(1, dtype=torch.int), [[]], False)
    assert ours.tolist() == [0.0]


def test_scale_in_place_matches_megatron_fallback():
    ours, ref = _tensors(2), _tensors(2)
    _multi_tensor_scale(2048 * 32, None, [ours, ours], 0.37)
    local_multi_tensor_scale(2048 * 32, None, [ref, ref], 0.37)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_scale_into_other_tensors_matches_megatron_fallback():
    src = _tensors(3)
    for dtype, scale in ((torch.float32, 0.5), (torch.bfloat16, 1.0), (torch.bfloat16, 2.5)):
        ours = [torch.zeros_like(t, dtype=dtype) for t in src]
        ref = [torch.zeros_like(t, dtype=dtype) for t in src]
        _multi_tensor_scale(2048 * 32, None, [src, ours], scale)
        local_multi_tensor_scale(2048 * 32, None, [src, ref], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref)), (dtype, scale)
    assert torch.equal(src[0], _tensors(3)[0])  # the source is not touched


def test_logits_max_is_the_row_maximum_in_fp32():
    """What megatron's ``calculate_logits_max`` returns: ``max(x.float(), dim=-1).values``, NaN and inf kept."""
    x = torch.randn(4, 3, 17, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[0, 1, 5], x[2, 0, 3], x[3, 2, :] = float("nan"), float("inf"), float("-inf")
    logits, maxima = _logits_max(x)
    assert logits.dtype == torch.float32 and torch.allclose(logits, x.float(), rtol=0, atol=0, equal_nan=True)
    expected = torch.max(x.float(), dim=-1)[0]
    assert torch.allclose(maxima, expected, equal_nan=True) and torch.equal(maxima.isnan(), expected.isnan())


def test_cross_entropy_with_amax_is_bit_identical(model_checks):
    record = model_checks["check_cross_entropy_max"]
    assert record == {"installed": True, "loss_and_grad_equal": [True, True], "finite_rows_finite": True}


def test_lean_linear_matches_megatron_s_function(model_checks):
    """Without sequence parallelism cpu_speed's linear Function computes what megatron's does
    (which it subclasses), and makes no call through the device mode."""
    record = model_checks["check_lean_linear"]
    assert record["mode_calls"] == 0
    for case in ("fuse=True,bias=True", "fuse=True,bias=False", "fuse=False,bias=True", "fuse=False,bias=False"):
        r = record[case]
        assert max(r[k] for k in ("y", "x", "w") + (("b",) if "bias=True" in case else ())) < 1e-5, (case, r)
        if case.startswith("fuse=True"):  # accumulated into main_grad; autograd gets megatron's dummy
            assert r["dummy"] == [24, 16] and r["flag"] is True and r["ref_flag"] is True, (case, r)


def test_training_model_runs_without_the_device_mode(model_checks):
    """In a training step (TP = CP = 1) the model's forward makes no call through cpu_compat's device
    mode; the rest of the step (optimizer, megatron's schedule) still does."""
    counts = model_checks["check_model_step_without_device_mode"]
    assert counts["forward"] == 0, counts
    assert counts["other"] > 100, counts  # the counter sees the mode's calls
    assert counts["backward"] < 10, counts  # megatron's backward_step itself; none from autograd nodes


def test_suspended_takes_the_mode_off_and_back(model_checks):
    record = model_checks["check_suspended"]
    depth = record["depth"]
    assert depth >= 1
    assert record["inside"] == [depth - 1, False]  # off the stack: a CUDA device argument fails
    assert record["after"] == [depth, True]  # back: it is rewritten to the CPU again
    assert record["under_foreign_mode"] == depth + 1  # a mode above ours: nothing popped
    assert record["speed_off"] == [depth, True]  # cpu_speed off: megatron's code runs under the mode


def test_one_rank_collectives_skip_gloo(model_checks):
    """DP=1 (or TP=1, ...) collectives are the identity or a copy: cpu_speed runs them in place, without
    gloo's worker thread and buffers (benchmarks/results/2026-11-26_cpu_training.md: ~1.5x training
    throughput); with it off, or outside the device mode, they go through gloo."""
    record = model_checks["check_one_rank_collectives"]
    assert record["gloo_collectives_without_mode"] == 1  # the counter sees gloo collectives
    assert record["gloo_collectives_speed_off"] == 2
    assert record["gloo_collectives_local_path"] == 0
    assert record["all_reduce_identity"] and record["reduce_scatter_copies"] and record["all_gather_copies"]
    assert record["async_work_completed"]
    assert record["coalesced_copies"] == {"False": True, "True": True}


def test_switching_off_puts_megatron_s_code_back(model_checks):
    record = model_checks["check_speed_switch"]
    assert record["flags"] == [False, True]
    on, off = record["on"], record["off"]
    assert record["on_again"] == on
    assert off == {
        "linear": "megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication",
        "copy_to_region": "megatron.core.tensor_parallel.mappings.copy_to_tensor_model_parallel_region",
        "l2_norm": "megatron.core.utils.local_multi_tensor_l2_norm",
        "scale": ["megatron.core.utils.local_multi_tensor_scale"] * 2,
        "logits_max": "megatron.core.tensor_parallel.cross_entropy.VocabParallelCrossEntropy.calculate_logits_max",
        "fused_rope": None,  # no Transformer Engine: megatron's unfused RoPE
        "wgrad_kernel": False,
        "grad_accum_fusion_available": False,
    }
    assert all(on[k] != off[k] for k in off), on
    ours = (on["linear"], on["l2_norm"], on["logits_max"], on["fused_rope"])
    assert all(name.startswith("megatron_resonance.megatron.") for name in ours), ours


def test_the_model_with_speed_on_and_off_matches(model_checks):
    """Built with cpu_speed on: local_ops' SwiGLU, rotary and RMSNorm; off: megatron's unfused code and
    torch's RMSNorm. Same weights: logits and weight gradients to float rounding, same checkpoint keys."""
    record = model_checks["check_speed_switch_in_model"]
    assert record["switches"] == {"speed": [True, "SwiGLU"], "megatron": [False, "function"]}
    # every norm (the layers' two and the final one)
    assert record["norms"] == {
        "speed": ["megatron_resonance.megatron.local_ops.RMSNorm"],
        "megatron": ["torch.nn.modules.normalization.RMSNorm"],
    }
    assert record["same_state_dict_keys"]
    assert record["logits_rel"] < 1e-5 and record["grads_rel"] < 1e-5, record


def test_training_with_speed_on_and_off_gives_the_same_losses(model_checks):
    """Five trainer steps from one seed on one batch: every loss and gradient norm to 1e-6 relative (float
    rounding in a different order, carried through the Adam updates: ~2e-7 measured)."""
    record = model_checks["check_speed_matches_megatron_training"]
    speed, megatron = record["speed"], record["megatron"]
    assert len(megatron["losses"]) == 5 and megatron["losses"][-1] < megatron["losses"][0]
    assert speed["losses"] == pytest.approx(megatron["losses"], rel=1e-6)
    assert speed["grad_norms"] == pytest.approx(megatron["grad_norms"], rel=1e-6)
