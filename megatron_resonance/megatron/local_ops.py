"""Leaner eager versions of three element-wise blocks of megatron's local spec: CPU speed measures,
swapped in by ``cpu_speed`` (this module installs nothing itself).

* SwiGLU: megatron computes ``silu(x_glu) * (x_linear + glu_linear_offset)`` over ``torch.chunk`` views
  of the fused fc1 output: the ``+ 0.0`` is a full copy, and autograd's backward of ``chunk``
  concatenates the two half-gradients into a new tensor. ``SwiGLU`` runs the same forward arithmetic and
  writes both half-gradients straight into one buffer (3 ops, no concatenation).
* Rotary: megatron's unfused RoPE rotates with ``chunk``/``neg``/``cat`` and ends with a ``cat`` of the
  rotated part and an (empty) pass-through part, a full copy of q and k. ``apply_rotary`` computes
  ``t * cos + roll(t, d/2) * [-sin, sin]`` (rotate-half as a roll with the sign folded into the table)
  with a hand-written backward, the inverse rotation. cos/sin of the [s, 1, 1, d] angle table are
  taken once per table (megatron's takes them in every call: 4 ops x 2 (q, k) x layers per step). It
  takes the place of TE's fused RoPE (``rope_utils.fused_apply_rotary_pos_emb`` with ``apply_rope_fusion``).
  The rotated [s, b, h, d] tensor is laid out in memory as [b, h, s, d], the layout SDPA reads it in
  (``SDPAAttention`` permutes it to a contiguous tensor); values are the same either way.
* RMSNorm: torch's ``RMSNorm`` (megatron's ``WrappedTorchNorm`` without Apex) has a fused forward on
  CPU, but its backward is autograd's composition: ~17 ops, 1.7 ms of a 1.9 ms forward + backward for
  [1024, 256] fp32 on 2 cores. ``RMSNorm`` keeps torch's module (same parameter, same checkpoints) and,
  for fp32 CPU input, runs a hand-written backward of 8 ops (``dx = r (g w - x̂ mean(g w x̂))``,
  ``dw = sum(g x̂)``): 1.0 ms forward + backward.

Measured on the 2-core CPU benchmark (benchmarks/results/2026-11-26_cpu_training.md) against the autograd
composition; results match it to float rounding (tests/megatron/test_local_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_resonance.megatron._private_torch import silu_backward_into, version

# megatron.core (seconds to import) is imported inside the functions that use it: the tools' --help and input checks
# run without it.


class _SwiGLUFunction(torch.autograd.Function):
    """[..., 2f] -> [..., f]: silu(x[..., :f]) * x[..., f:]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, linear = torch.chunk(x, 2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * linear

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, activated = ctx.saved_tensors
        gate, linear = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_gate, grad_linear = torch.chunk(grad_x, 2, dim=-1)
        torch.mul(grad, activated, out=grad_linear)
        silu_backward_into(grad * linear, gate, out=grad_gate)
        return grad_x


class SwiGLU(torch.nn.Module):
    """megatron MLP activation module (``MLPSubmodules.activation_func``) for the fused gate/up output."""

    def __init__(self, config=None):
        super().__init__()
        if config is not None and (config.glu_linear_offset or config.activation_func_clamp_value is not None):
            raise ValueError("SwiGLU takes no glu_linear_offset or activation_func_clamp_value")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        return {}  # no parameters: checkpoints are those of megatron's functional activation


class _RotaryFunction(torch.autograd.Function):
    """t [s, b, h, d] rotated by angles whose cos and sign-folded sin are [s, 1, 1, d] (d even)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, signed_sin)
        out = None
        if t.dim() == 4:  # [s, b, h, d], stored as SDPA reads it: [b, h, s, d]
            s, b, h, d = t.shape
            out = torch.empty(b, h, s, d, dtype=t.dtype, device=t.device).permute(2, 0, 1, 3)
        return torch.addcmul(t * cos, torch.roll(t, t.shape[-1] // 2, dims=-1), signed_sin, out=out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, signed_sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        # the transpose of "roll by d/2, then scale" is "scale, then roll by d/2" (a half-turn roll)
        return torch.addcmul(torch.roll(grad * signed_sin, half, dims=-1), grad, cos), None, None


#: the last angle table's (freqs, its version, dtype, cos, signed sin). megatron's RotaryEmbedding returns
#: one cached table per sequence length, passed to q and k of every layer: 2 x layers calls share one entry.
_TABLE: tuple = (None, None, None, None, None)


#: megatron's inference (inference-mode tables, which have no version counter) slices one angle table per
#: step: the query's rows, then the keys' rows 0 .. end, in every layer. The last two slices' (slice, where
#: it lies in its storage, cos, signed sin), newest last.
_INFERENCE_SLICES: list = []


def _cos_signed_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple:
    """cos and [-sin, sin] (rotate-half's sign folded in) of ``freqs`` in ``dtype``. Kept for the last
    ``freqs`` object (held, so it cannot be freed and another take its place) at its version (an in-place
    change is a new table); tables sliced per call (context parallelism) are recomputed each time. Under
    inference mode, by the slice's place in its storage (``_inference_rows``)."""
    global _TABLE
    if freqs.is_inference():
        return _inference_rows(freqs, dtype)
    last, last_version, last_dtype, cos, signed_sin = _TABLE
    if last is freqs and last_version == version(freqs) and last_dtype == dtype and not freqs.requires_grad:
        return cos, signed_sin
    cos, signed_sin = _compute_cos_signed_sin(freqs, dtype)
    _TABLE = (freqs, version(freqs), dtype, cos, signed_sin)
    return cos, signed_sin


def _compute_cos_signed_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple:
    half = freqs.shape[-1] // 2
    cos = torch.cos(freqs).to(dtype)
    sin = torch.sin(freqs).to(dtype)
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _inference_rows(freqs: torch.Tensor, dtype: torch.dtype) -> tuple:
    """cos and signed sin of an inference-mode angle table, computed once for the same rows of the same
    storage in a row (the query's and the keys' slices of one decode step, repeated by every layer). A
    kept slice holds its storage, so no other table can take its address; megatron never writes to it."""
    global _INFERENCE_SLICES
    where = (freqs.untyped_storage().data_ptr(), freqs.storage_offset(), freqs.shape, freqs.stride(), dtype)
    for kept, kept_where, cos, signed_sin in _INFERENCE_SLICES:
        if kept_where == where:
            return cos, signed_sin
    cos, signed_sin = _compute_cos_signed_sin(freqs, dtype)
    _INFERENCE_SLICES = [*_INFERENCE_SLICES[-1:], (freqs, where, cos, signed_sin)]
    return cos, signed_sin


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **unused) -> torch.Tensor:
    """megatron's ``_apply_rotary_pos_emb_bshd`` (mscale 1) for angles ``freqs`` [s, 1, 1, rot_dim]."""
    from megatron.core.models.common.embeddings import rope_utils

    if interleaved:
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=True)
    rot_dim = freqs.shape[-1]
    cos, signed_sin = _cos_signed_sin(freqs, t.dtype)
    if rot_dim == t.shape[-1]:
        return _RotaryFunction.apply(t, cos, signed_sin)
    rotated = _RotaryFunction.apply(t[..., :rot_dim], cos, signed_sin)
    return torch.cat((rotated, t[..., rot_dim:]), dim=-1)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * r * w with r = rsqrt(mean(x^2) + eps) over the last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return torch.mul(x, r).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        normed = x * r
        grad_normed = grad * weight
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_normed, normed, dot, value=-1).mul_(r)
        grad_weight = (grad * normed).sum(dim=tuple(range(grad.dim() - 1)))
        return grad_x, grad_weight, None


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm; fp32 CPU input with a weight takes ``_RMSNormFunction`` (hand-written backward),
    anything else torch's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or self.weight is None:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)
