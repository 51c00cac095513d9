"""``local_ops``: SwiGLU, the rotary application and RMSNorm compute what megatron's unfused local-spec code
and torch's RMSNorm compute, forward and backward (here, on plain tensors; in the built model with
``cpu_speed`` on and off: ``test_cpu_speed.py``). Also ``llama.LocalNorm``, which builds the RMSNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_resonance.megatron.llama import LocalNorm
from megatron_resonance.megatron.local_ops import (
    RMSNorm,
    SwiGLU,
    _RMSNormFunction,
    _RotaryFunction,
    _SwiGLUFunction,
    apply_rotary,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_swiglu_matches_the_autograd_composition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 2 * 40, generator=g)  # [s, b, 2f], as linear_fc1 returns it
    upstream = torch.randn(16, 3, 40, generator=g)
    ours_in, ref_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = SwiGLU()(ours_in)
    gate, linear = torch.chunk(ref_in, 2, dim=-1)
    ref = F.silu(gate) * linear
    assert torch.equal(ours, ref)  # same forward arithmetic
    ours.backward(upstream)
    ref.backward(upstream)
    assert ours_in.grad.is_contiguous() and ours_in.grad.shape == x.shape
    assert _rel(ours_in.grad, ref_in.grad) < 1e-6


def test_swiglu_gradcheck():
    x = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, (x,))


def test_swiglu_refuses_an_offset_or_clamp():
    class Cfg:
        glu_linear_offset, activation_func_clamp_value = 1.0, None

    with pytest.raises(ValueError, match="glu_linear_offset"):
        SwiGLU(Cfg())


@pytest.mark.parametrize("rot_dim", [32, 16])  # full rotary, and a pass-through part (rot_dim < head dim)
def test_rotary_matches_megatron_unfused(rot_dim):
    g = torch.Generator().manual_seed(1)
    s, b, h, d = 24, 2, 4, 32
    t = torch.randn(s, b, h, d, generator=g)
    freqs = torch.randn(s, 1, 1, rot_dim, generator=g) * 50  # large angles, as at long positions
    upstream = torch.randn(s, b, h, d, generator=g)
    ours_in, ref_in = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ours = apply_rotary(ours_in, freqs)
    ref = _apply_rotary_pos_emb_bshd(ref_in, freqs)
    assert _rel(ours, ref) < 1e-6
    ours.backward(upstream)
    ref.backward(upstream)
    assert _rel(ours_in.grad, ref_in.grad) < 1e-6
    if rot_dim < d:  # the pass-through features are untouched
        assert torch.equal(ours[..., rot_dim:], t[..., rot_dim:])


def test_rotary_interleaved_is_megatron_s():
    t, freqs = torch.randn(8, 1, 2, 16), torch.randn(8, 1, 1, 16)
    ref = _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=True)
    assert torch.equal(apply_rotary(t, freqs, interleaved=True), ref)


def test_rotary_gradcheck():
    t = torch.randn(6, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(6, 1, 1, 8, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    signed_sin = torch.cat((-sin[..., :4], sin[..., 4:]), dim=-1)
    assert torch.autograd.gradcheck(lambda x: _RotaryFunction.apply(x, cos, signed_sin), (t,))


def test_rotary_output_is_laid_out_for_sdpa():
    t, freqs = torch.randn(8, 2, 4, 16), torch.randn(8, 1, 1, 16)
    out = apply_rotary(t, freqs)
    assert out.shape == t.shape
    assert out.permute(1, 2, 0, 3).is_contiguous()  # stored as [b, h, s, d]: SDPA's view of it is contiguous
    assert _rel(out, _apply_rotary_pos_emb_bshd(t, freqs)) < 1e-6


def test_rotary_tables_are_taken_once_per_angle_table():
    from megatron_resonance.megatron import local_ops

    g = torch.Generator().manual_seed(2)
    t, freqs = torch.randn(8, 2, 4, 16, generator=g), torch.randn(8, 1, 1, 16, generator=g)
    ref = _apply_rotary_pos_emb_bshd(t, freqs)
    first = local_ops._cos_signed_sin(freqs, torch.float32)
    assert all(a is b for a, b in zip(local_ops._cos_signed_sin(freqs, torch.float32), first))  # q, k, layers
    assert _rel(apply_rotary(t, freqs), ref) < 1e-6
    # another dtype, an in-place change of the same table, an equal but different table: recomputed
    assert local_ops._cos_signed_sin(freqs, torch.float64)[0].dtype == torch.float64
    freqs.mul_(2.0)
    assert _rel(apply_rotary(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs)) < 1e-6
    other = freqs.clone()
    assert local_ops._cos_signed_sin(other, torch.float32)[0] is not local_ops._cos_signed_sin(freqs, torch.float32)[0]


def test_rmsnorm_matches_torch_s():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, 40, generator=g) * 3
    upstream = torch.randn(16, 3, 40, generator=g)
    ours, ref = RMSNorm(40, eps=1e-5), torch.nn.RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=g)
        ref.weight.copy_(ours.weight)
    ours_in, ref_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = ours(ours_in), ref(ref_in)
    assert type(y.grad_fn).__name__ == "_RMSNormFunctionBackward"  # fp32 CPU input takes ours
    assert _rel(y, y_ref) < 1e-6
    y.backward(upstream)
    y_ref.backward(upstream)
    assert _rel(ours_in.grad, ref_in.grad) < 1e-6
    assert _rel(ours.weight.grad, ref.weight.grad) < 1e-6
    # bf16 (and anything but fp32 CPU input) is torch's own forward
    assert torch.equal(ours(x.bfloat16()), ref(x.bfloat16()))


def test_rmsnorm_gradcheck():
    x = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    w = torch.rand(12, dtype=torch.float64).add_(0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("rms_norm", [torch.nn.RMSNorm, RMSNorm])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_local_norm_marks_its_weight_for_sequence_parallelism(sequence_parallel, rms_norm):
    """Under sequence parallelism each TP rank normalizes part of the sequence: the weight is marked, so
    megatron's ``finalize_model_grads`` all-reduces its gradient over TP (megatron's torch wrapper refuses)."""
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        normalization="RMSNorm",
        tensor_model_parallel_size=2,
        sequence_parallel=sequence_parallel,
    )
    norm = LocalNorm(config, 8, eps=1e-5, normalization="RMSNorm", rms_norm=rms_norm)
    assert type(norm) is rms_norm and norm.eps == 1e-5
    assert norm.weight.sequence_parallel is sequence_parallel
    assert config.sequence_parallel is sequence_parallel  # the caller's config is left as it was
