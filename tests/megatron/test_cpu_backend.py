"""The CPU backend's stand-ins for Apex's multi-tensor kernels compute what megatron's own CPU fallbacks
(``megatron.core.utils.local_multi_tensor_*``) compute. Pure functions: nothing is enabled here; the
process-wide parts of the backend are checked in ``workers/model_checks.py``."""

from __future__ import annotations

import torch
from megatron.core.utils import local_multi_tensor_scale

from megatron_resonance.megatron.cpu_backend import _logits_max, _multi_tensor_l2norm, _multi_tensor_scale


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
    """Without sequence parallelism the CPU backend's linear Function computes what megatron's does
    (which it subclasses), and makes no call through the device mode."""
    record = model_checks["check_lean_linear"]
    assert record["mode_calls"] == 0
    for case in ("fuse=True,bias=True", "fuse=True,bias=False", "fuse=False,bias=True", "fuse=False,bias=False"):
        r = record[case]
        assert max(r[k] for k in ("y", "x", "w") + (("b",) if "bias=True" in case else ())) < 1e-5, (case, r)
        if case.startswith("fuse=True"):  # accumulated into main_grad; autograd gets megatron's dummy
            assert r["dummy"] == [24, 16] and r["flag"] is True and r["ref_flag"] is True, (case, r)


def test_training_model_runs_without_the_device_mode(model_checks):
    """In a training step (TP = CP = 1) the model's forward makes no call through the device mode; the
    rest of the step (optimizer, megatron's schedule) still does."""
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
