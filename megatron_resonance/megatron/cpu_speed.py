"""CPU speed measures for megatron-core: on by default on CPU, off with ``MEGATRON_RESONANCE_CPU_SPEED=0``.

``cpu_compat`` makes megatron's own code run on CPU; these replace parts of it with leaner code that
computes the same (tests/megatron: bit-identical or to float rounding, and the same losses at every
parallel layout with them on and off). With them off, megatron's own code runs: its linear Function
without gradient-accumulation fusion, its MLP activation, its unfused RoPE, torch's RMSNorm, gloo for
every collective. On:

* collectives over one-rank groups (DP=1, TP=1, ...) run inline as the identity or copy they are: gloo has
  no one-rank fast path and pushed the whole model through its worker threads twice per step (at DP=1 the
  grad buffer's reduce-scatter and the distributed optimizer's param all-gather);
* megatron's gradient-accumulation fusion (Apex's ``fused_weight_gradient_mlp_cuda`` on GPUs: the weight
  gradient GEMM accumulates straight into DDP's fp32 ``main_grad``) as ``main_grad.addmm_``, and without
  sequence parallelism megatron's linear autograd Function runs lean (``_lean_linear``);
* at TP=1 the linear layers skip megatron's region mappings (autograd nodes that are the identity there);
* Apex's multi-tensor norm and scale behind megatron's grad-norm and clipping are foreach kernels;
* the vocab-parallel cross entropy takes its row maxima with ``amax`` (``max(dim)`` also searches the
  indices, unvectorized on CPU: 20x slower; bit-identical loss);
* ``local_ops``' SwiGLU (the MLP activation module), rotary application (in place of TE's fused RoPE) and
  RMSNorm (built by ``llama.LocalNorm``), through ``transformer_settings()`` and ``llama.layer_spec``;
* ``suspended()``: a training step's model forward runs outside cpu_compat's device mode (a Python hook
  on every torch call); megatron's forward makes no device call at CP=1 without sequence parallelism.

``set_enabled()`` is the switch (``distributed.init_process_group`` calls it with the environment's
choice). It patches megatron process-wide and undoes that when switched off. Switch before building a
model: one built with the measures on asks for them (its config names the fused RoPE hook and the
gradient-accumulation kernel). Nothing happens on a machine with CUDA.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import types
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from megatron_resonance.megatron import _private_torch, compat, cpu_compat, local_ops

# megatron.core (seconds to import) is imported inside the functions that use it: the tools' --help and input checks
# run without it.

#: ``MEGATRON_RESONANCE_CPU_SPEED=0`` runs megatron's own code paths on CPU
ENV = "MEGATRON_RESONANCE_CPU_SPEED"

_ENABLED = False
#: (object, attribute, what it held or _ABSENT) for every patch, undone in reverse when switched off
_PATCHES: list = []
_ABSENT = object()


def set_enabled(on: Optional[bool] = None) -> bool:
    """Switch the measures on or off (``None``: on unless ``MEGATRON_RESONANCE_CPU_SPEED=0``). Enables
    ``cpu_compat``. Returns whether they are on: never with CUDA."""
    global _ENABLED
    if on is None:
        on = os.environ.get(ENV, "1") != "0"
    if on and not _ENABLED and cpu_compat.enable():
        _install()
        _ENABLED = True
    elif not on and _ENABLED:
        _uninstall()
        _ENABLED = False
    return _ENABLED


def is_enabled() -> bool:
    return _ENABLED


def transformer_settings() -> dict:
    """megatron ``TransformerConfig`` fields that route a model through the measures (none when off)."""
    if not _ENABLED:
        return {}
    from megatron.core.models.common.embeddings import rope_utils

    return {
        "gradient_accumulation_fusion": True,
        # megatron's switch for "the MLP activation is the spec's module" (named for TE's): local_ops.SwiGLU
        "use_te_activation_func": True,
        # TE's fused RoPE hook, which holds local_ops.apply_rotary where TE provides none
        "apply_rope_fusion": rope_utils.fused_apply_rotary_pos_emb is local_ops.apply_rotary,
    }


@contextlib.contextmanager
def suspended():
    """Run a block without cpu_compat's device mode, for code that makes no CUDA device calls (a CUDA
    device argument in it fails as it would on any CPU-only torch). Collectives in it go through gloo. A
    mode pushed above the device mode is left alone (and the device mode then stays). Nothing when off."""
    if not _ENABLED or _private_torch.function_mode_depth() == 0:
        yield
        return
    top = _private_torch.pop_function_mode()
    try:
        if top is not cpu_compat.process_mode():
            _private_torch.push_function_mode(top)
            top = None
        yield
    finally:
        if top is not None:
            _private_torch.push_function_mode(top)


# ==========================================================================================================
# Installing and removing
# ==========================================================================================================


def _patch(obj, name: str, value) -> None:
    _PATCHES.append((obj, name, inspect.getattr_static(obj, name, _ABSENT)))
    setattr(obj, name, value)


def _uninstall() -> None:
    while _PATCHES:
        obj, name, original = _PATCHES.pop()
        if original is _ABSENT:
            delattr(obj, name)
        else:
            setattr(obj, name, original)
    for func in _ONE_RANK:
        cpu_compat.intercept(func, None)


def _install() -> None:
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    _register_one_rank_collectives()
    _patch(
        layers,
        "fused_weight_gradient_mlp_cuda",
        types.SimpleNamespace(wgrad_gemm_accum_fp32=_wgrad_gemm_accum, wgrad_gemm_accum_fp16=_wgrad_gemm_accum),
    )
    _patch(layers, "_grad_accum_fusion_available", True)
    _patch(layers, "LinearWithGradAccumulationAndAsyncCommunication", _lean_linear())
    for name in (
        "copy_to_tensor_model_parallel_region",
        "reduce_from_tensor_model_parallel_region",
        "scatter_to_tensor_model_parallel_region",
        "gather_from_tensor_model_parallel_region",
    ):
        _patch(layers, name, _one_rank_region(getattr(mappings, name)))
    _patch(clip_grads, "l2_norm_impl", _multi_tensor_l2norm)
    _patch(clip_grads, "multi_tensor_scale_impl", _multi_tensor_scale)
    _patch(optimizer, "multi_tensor_scale_impl", _multi_tensor_scale)
    _logits_max.megatron = VocabParallelCrossEntropy.calculate_logits_max  # kept for the tests
    _patch(VocabParallelCrossEntropy, "calculate_logits_max", staticmethod(_logits_max))
    if rope_utils.fused_apply_rotary_pos_emb is None:  # no Transformer Engine
        _patch(rope_utils, "fused_apply_rotary_pos_emb", local_ops.apply_rotary)


# ==========================================================================================================
# One-rank collectives
# ==========================================================================================================


class _Done:
    """The handle of a collective that already ran (``async_op=True``)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _copy_into(out: torch.Tensor, inp: torch.Tensor) -> None:
    if out.data_ptr() != inp.data_ptr() or out.stride() != inp.stride():
        out.copy_(inp.view_as(out))


#: collective -> (what it does on a one-rank group, its signature)
_ONE_RANK: dict = {}


def _register_one_rank_collectives() -> None:
    def nothing(a):
        pass

    local = {
        c10d.all_reduce: nothing,
        c10d.broadcast: nothing,
        c10d.barrier: nothing,
        c10d.all_gather_single: lambda a: _copy_into(a["output_tensor"], a["input_tensor"]),
        c10d.reduce_scatter_single: lambda a: _copy_into(a["output"], a["input"]),
        c10d.all_gather: lambda a: _copy_into(a["tensor_list"][0], a["tensor"]),
    }
    for func, run_locally in local.items():
        _ONE_RANK[func] = (run_locally, inspect.signature(func))
        cpu_compat.intercept(func, _one_rank_collective)


def _one_rank_collective(func, args, kwargs):
    """``func`` run here when its group has one rank, else through gloo. Inside ``_coalescing_manager``
    nothing is recorded, which the manager treats as "no work" (sync or async)."""
    local, signature = _ONE_RANK[func]
    bound = signature.bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    a = bound.arguments
    op = a.get("op")
    if (
        not dist.is_initialized()
        or dist.get_world_size(a["group"]) != 1
        or (op is not None and op == dist.ReduceOp.PREMUL_SUM)
    ):
        return cpu_compat.call(func, args, kwargs)
    local(a)
    return _Done() if a.get("async_op") else None


# ==========================================================================================================
# Linear layers
# ==========================================================================================================


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input (2-D [tokens, out] and [tokens, in]). bf16 activations
    with an fp32 main_grad take the GEMM in bf16 and add it, as the unfused path does."""
    if grad_output.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        main_grad.add_(grad_output.t().mm(total_input))


_LEAN_LINEAR = None


def _lean_linear():
    """megatron's linear autograd Function with gradient-accumulation fusion, run lean.

    Without sequence parallelism or deferred embedding wgrads (megatron's general path, taken unchanged),
    forward and backward are the same arithmetic as megatron's without its CUDA autocast decorators (CUDA
    autocast cannot be active without CUDA) and without the device mode: the dummy weight gradient
    megatron hands autograd after a fused accumulation is allocated on CPU directly. A weight without
    ``main_grad`` (a model outside DDP) keeps the unfused path."""
    global _LEAN_LINEAR
    if _LEAN_LINEAR is not None:
        return _LEAN_LINEAR
    from megatron.core.tensor_parallel import layers

    base = layers.LinearWithGradAccumulationAndAsyncCommunication

    class _LeanLinearWithGradAccumulation(base):
        @staticmethod
        def forward(
            ctx,
            input,
            weight,
            bias,
            gradient_accumulation_fusion,
            allreduce_dgrad,
            sequence_parallel,
            grad_output_buffer,
            wgrad_deferral_limit,
            tp_group,
            *later,
        ):
            fuse = gradient_accumulation_fusion and hasattr(weight, "main_grad")
            ctx.lean = not sequence_parallel and grad_output_buffer is None and not compat.gathers_weight(later)
            ctx.inputs = 9 + len(later)
            if not ctx.lean:
                return base.forward(
                    ctx,
                    input,
                    weight,
                    bias,
                    fuse,
                    allreduce_dgrad,
                    sequence_parallel,
                    grad_output_buffer,
                    wgrad_deferral_limit,
                    tp_group,
                    *later,
                )
            ctx.save_for_backward(input, weight)
            ctx.main_grad = weight.main_grad if fuse else None
            ctx.use_bias = bias is not None
            ctx.allreduce_dgrad = allreduce_dgrad
            ctx.tp_group = tp_group
            output = torch.matmul(input, weight.t())
            return output if bias is None else output + bias

        @staticmethod
        def backward(ctx, grad_output):
            if not ctx.lean:
                return base.backward(ctx, grad_output)  # under the device mode (cpu_compat)
            input, weight = ctx.saved_tensors
            grad_input = grad_output.matmul(weight)
            handle = dist.all_reduce(grad_input, group=ctx.tp_group, async_op=True) if ctx.allreduce_dgrad else None
            grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
            input_2d = input.reshape(-1, input.shape[-1])
            if ctx.main_grad is not None:
                weight.main_grad = ctx.main_grad
                kernel = layers.fused_weight_gradient_mlp_cuda
                fp32 = ctx.main_grad.dtype == torch.float32
                accumulate = kernel.wgrad_gemm_accum_fp32 if fp32 else kernel.wgrad_gemm_accum_fp16
                accumulate(input_2d, grad_2d, ctx.main_grad)
                grad_weight = None
                if hasattr(weight, "grad_added_to_main_grad"):
                    # autograd still needs a weight gradient to run DDP's hook; megatron's is an empty one
                    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                    grad_weight = make(ctx.main_grad.shape, dtype=input.dtype)
                    weight.grad_added_to_main_grad = True
            else:
                grad_weight = grad_2d.t().matmul(input_2d)
            grad_bias = grad_2d.sum(dim=0) if ctx.use_bias else None
            if handle is not None:
                handle.wait()
            return (grad_input, grad_weight, grad_bias) + (None,) * (ctx.inputs - 3)

    _LEAN_LINEAR = _LeanLinearWithGradAccumulation
    return _LEAN_LINEAR


def _one_rank_region(megatron_region):
    """On a one-rank TP group megatron's region mappings (copy-to, reduce-from, scatter-to, gather-from)
    are the identity both ways, yet each is an autograd Function: a graph node per linear layer in
    forward and in backward. The linear layers' calls return their input there; with more ranks they
    run megatron's own."""

    def region(input_, group=None):
        if group is not None and group.size() == 1:
            return input_
        return megatron_region(input_, group)

    return region


# ==========================================================================================================
# Grad norm, clipping and cross entropy
# ==========================================================================================================


def _multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Apex's ``multi_tensor_l2norm`` as one foreach norm (megatron's CPU fallback takes one norm per
    tensor and a host round trip per tensor)."""
    if not tensor_lists[0]:
        return torch.zeros(1), None
    norms = _private_torch.foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None


def _multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Apex's ``multi_tensor_scale`` (dst = src * scale) as foreach ops."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        _private_torch.foreach_mul_(dst, scale)
    else:
        _private_torch.foreach_copy_(dst, src if scale == 1.0 else _private_torch.foreach_mul(src, scale))


def _logits_max(vocab_parallel_logits: torch.Tensor) -> tuple:
    """megatron's ``VocabParallelCrossEntropy.calculate_logits_max`` with ``amax``: the same values.
    ``torch.max(x, dim)`` also finds the indices, which megatron drops; on CPU that reduction is not
    vectorized (2.6 ms vs 0.12 ms for [1024, 2048] fp32 logits on 2 cores)."""
    vocab_parallel_logits = vocab_parallel_logits.float()
    return vocab_parallel_logits, torch.amax(vocab_parallel_logits, dim=-1)
