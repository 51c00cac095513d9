"""Run megatron-core's parallel stack (TP, PP schedules, DP, DDP, distributed optimizer) on CPU with gloo.

megatron-core has no CPU path: it allocates on ``torch.cuda.current_device()``, calls ``.cuda()``,
checks ``param.type() == 'torch.cuda.FloatTensor'``, synchronizes streams and tracks CUDA RNG states.
``enable()`` installs a small compatibility layer so the *unchanged* megatron code runs on CPU:

* a ``TorchFunctionMode`` rewrites any CUDA ``device=`` argument (``"cuda"``, ``0``, ``torch.device('cuda')``)
  of tensor factories and ``Tensor.to`` to ``cpu``, and drops ``pin_memory=True``; the same mode runs
  collectives over one-rank groups (DP=1, TP=1, ...) in place of gloo, which has no one-rank fast path;
* ``Tensor.cuda()`` returns the tensor itself; ``Tensor.type()`` (no argument) reports the CUDA type name
  of a CPU tensor, which is what megatron's optimizer and grad-clipping asserts expect;
* megatron's gradient-accumulation fusion (Apex's ``fused_weight_gradient_mlp_cuda``: the weight gradient
  GEMM accumulates straight into DDP's fp32 ``main_grad``) runs as ``main_grad.addmm_(grad.t(), input)``;
  without it every weight gradient is a fresh tensor that DDP's hook then adds into ``main_grad``. Without
  sequence parallelism the linear layers' autograd Function runs lean (``_install_linear``); a weight
  without ``main_grad`` (a model outside DDP) keeps the unfused path;
* Apex's multi-tensor kernels behind megatron's grad-norm and clipping are foreach ops, and at TP=1 the
  linear layers skip megatron's identity region mappings (autograd nodes that do nothing on one rank);
  the vocab-parallel cross entropy takes its row maxima with ``amax`` (``max(dim)``'s index search is
  not vectorized on CPU);
* megatron's region mappings' gathers and reduce-scatters, which allocate on the device, run under the
  mode in backward too (sequence parallelism), like the linear layers' backward;
* ``torch.cuda.current_device`` returns 0; ``synchronize``/``empty_cache`` do nothing; streams and events
  are inert stand-ins; the CUDA RNG API (``get_rng_state``, ``set_rng_state``, ``manual_seed``) and
  ``tensor_parallel.random._get/_set_cuda_rng_state`` act on the CPU default generator, so megatron's
  RNG tracker (``get_cuda_rng_tracker().fork()``) forks and restores the generator CPU ops really use.

It does nothing when CUDA is available (``enable()`` returns False). Process-wide and idempotent.

The mode's Python hook on every torch call is the layer's one per-op cost: code known to make no CUDA
device calls (the model's forward at CP=1 without sequence parallelism, see ``training.trainer``) runs
inside ``suspended()``.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE = None


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function and tensor method call, and runs
    collectives over one-rank groups locally (see ``_local_collective``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _KINDS.get(func)
        if kind is None:
            kind = _KINDS[func] = _kind(func)
        if kind == _COLLECTIVE:
            done, result = _local_collective(func, args, kwargs or {})
            if done:
                return result
        elif kind == _TO:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        if not kwargs:
            return func(*args)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):  # no pinned allocator without an accelerator (CP's rotary slicing)
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


_OTHER, _COLLECTIVE, _TO = 0, 1, 2
#: func -> what the mode does with its positional arguments (it sees every torch call: keep this cheap)
_KINDS: dict = {}


def _kind(func) -> int:
    if func in _LOCAL_COLLECTIVES:
        return _COLLECTIVE
    if func in (torch.Tensor.to, torch.Tensor.cuda) or getattr(func, "__name__", "") == "to":
        return _TO
    return _OTHER


def _copy_into(out: torch.Tensor, inp: torch.Tensor) -> None:
    if out.data_ptr() != inp.data_ptr() or out.stride() != inp.stride():
        out.copy_(inp.view_as(out))


#: collective -> (what it does on a one-rank group, its signature); filled in by ``enable()``
_LOCAL_COLLECTIVES: dict = {}


def _local_collective(func, args, kwargs):
    """(True, result) when ``func`` ran here because its group has one rank, else (False, None).

    gloo has no one-rank fast path: every collective goes through its worker thread, and the gather and
    scatter ones copy through freshly allocated buffers. At DP=1 that is the DDP grad buffer's
    reduce-scatter and the distributed optimizer's param all-gather, the whole model each step; on a
    2-core machine that was a third of a training step (page faults in gloo's threads, idle OMP workers).
    On one rank every collective is the identity or a copy, so it runs inline. Inside
    ``_coalescing_manager`` nothing is recorded, which the manager treats as "no work" (sync or async)."""
    import torch.distributed as dist

    local, signature = _LOCAL_COLLECTIVES[func]
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    group = a["group"]
    if not dist.is_initialized() or dist.get_world_size(group) != 1:
        return False, None
    op = a.get("op")
    if op is not None and op == dist.ReduceOp.PREMUL_SUM:
        return False, None
    local(a)
    if not a.get("async_op"):
        return True, None
    future = torch.futures.Future()
    future.set_result(None)
    return True, torch._C._distributed_c10d._create_work_from_future(future)


def _register_local_collectives() -> None:
    import inspect

    from torch.distributed import distributed_c10d as c10d

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
        _LOCAL_COLLECTIVES[func] = (run_locally, inspect.signature(func))


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input (2-D [tokens, out] and [tokens, in]). bf16 activations
    with an fp32 main_grad take the GEMM in bf16 and add it, as the unfused path does."""
    if grad_output.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        main_grad.add_(grad_output.t().mm(total_input))


def _install_linear() -> None:
    """megatron's linear autograd Function with gradient-accumulation fusion, run lean on CPU.

    On GPUs megatron accumulates weight-gradient GEMMs straight into DDP's fp32 ``main_grad`` (Apex's
    ``fused_weight_gradient_mlp_cuda``); here that kernel is ``main_grad.addmm_``. Without sequence
    parallelism or deferred embedding wgrads (megatron's general path, taken unchanged under the device
    mode), forward and backward are the same arithmetic as megatron's without its CUDA autocast
    decorators (CUDA autocast cannot be active without CUDA) and without the device mode: the dummy
    weight gradient megatron hands autograd after a fused accumulation is allocated on CPU directly."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import layers

    base = layers.LinearWithGradAccumulationAndAsyncCommunication

    class _CpuLinearWithGradAccumulation(base):
        @staticmethod
        def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                    grad_output_buffer, wgrad_deferral_limit, tp_group):
            fuse = gradient_accumulation_fusion and hasattr(weight, "main_grad")
            ctx.lean = not sequence_parallel and grad_output_buffer is None
            if not ctx.lean:
                return base.forward(ctx, input, weight, bias, fuse, allreduce_dgrad, sequence_parallel,
                                    grad_output_buffer, wgrad_deferral_limit, tp_group)
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
                with _CpuDeviceMode():
                    return base.backward(ctx, grad_output)
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
            return grad_input, grad_weight, grad_bias, None, None, None, None, None, None

    layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=_wgrad_gemm_accum, wgrad_gemm_accum_fp16=_wgrad_gemm_accum
    )
    layers._grad_accum_fusion_available = True
    layers.LinearWithGradAccumulationAndAsyncCommunication = _CpuLinearWithGradAccumulation


def _install_one_rank_regions() -> None:
    """On a one-rank TP group megatron's region mappings (copy-to, reduce-from, scatter-to, gather-from)
    are the identity both ways, yet each is an autograd Function: a graph node per linear layer in
    forward and in backward. The linear layers' calls return their input there; with more ranks they
    run megatron's own."""
    from megatron.core.tensor_parallel import layers, mappings

    for name in ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                 "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region"):

        def region(input_, group=None, _megatron=getattr(mappings, name)):
            if group is not None and group.size() == 1:
                return input_
            return _megatron(input_, group)

        setattr(layers, name, region)


def _install_region_device_mode() -> None:
    """megatron's tensor- and sequence-parallel region mappings allocate their gather and reduce-scatter
    outputs on ``torch.cuda.current_device()``, in backward too (sequence parallelism: the embedding's
    scatter and the row-parallel layers' reduce-scatter gather their gradients). The backward pass runs
    without the device mode: the mode sees ``torch.autograd.backward`` as one call and, as every mode
    does with what it intercepts, runs it with itself popped. These helpers run under the device mode
    wherever they are called, like the linear layers' backward (``_install_linear``)."""
    from megatron.core.tensor_parallel import mappings

    for name in ("_gather_along_first_dim", "_gather_along_last_dim", "_reduce_scatter_along_first_dim",
                 "_reduce_scatter_along_last_dim"):

        @functools.wraps(getattr(mappings, name))
        def helper(*args, _megatron=getattr(mappings, name), **kwargs):
            with _CpuDeviceMode():
                return _megatron(*args, **kwargs)

        setattr(mappings, name, helper)


def _multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Apex's ``multi_tensor_l2norm`` as one foreach norm (megatron's CPU fallback takes one norm per
    tensor and a host round trip per tensor)."""
    if not tensor_lists[0]:
        return torch.zeros(1), None
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None


def _multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Apex's ``multi_tensor_scale`` (dst = src * scale) as foreach ops."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


def _install_multi_tensor_ops() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.l2_norm_impl = _multi_tensor_l2norm
    clip_grads.multi_tensor_scale_impl = _multi_tensor_scale
    optimizer.multi_tensor_scale_impl = _multi_tensor_scale


def _logits_max(vocab_parallel_logits: torch.Tensor) -> tuple:
    """megatron's ``VocabParallelCrossEntropy.calculate_logits_max`` with ``amax``: the same values.
    ``torch.max(x, dim)`` also finds the indices, which megatron drops; on CPU that reduction is not
    vectorized (2.6 ms vs 0.12 ms for [1024, 2048] fp32 logits on 2 cores)."""
    vocab_parallel_logits = vocab_parallel_logits.float()
    return vocab_parallel_logits, torch.amax(vocab_parallel_logits, dim=-1)


def _install_cross_entropy() -> None:
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    if VocabParallelCrossEntropy.calculate_logits_max is not _logits_max:
        _logits_max.megatron = VocabParallelCrossEntropy.calculate_logits_max  # kept for the tests
        VocabParallelCrossEntropy.calculate_logits_max = staticmethod(_logits_max)


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def enable() -> bool:
    """Install the CPU compatibility layer if CUDA is not available. Returns whether it is active."""
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    # The "CUDA" RNG is the CPU default generator: megatron's tracker forks what CPU ops draw from.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    torch.Tensor.cuda = lambda self, *a, **k: self

    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _TYPE_NAMES:
            return _TYPE_NAMES[self.dtype]
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    _register_local_collectives()
    _install_linear()
    _install_one_rank_regions()
    _install_region_device_mode()
    _install_multi_tensor_ops()
    _install_cross_entropy()
    _MODE = _CpuDeviceMode()
    _MODE.__enter__()
    _ENABLED = True
    return True


@contextlib.contextmanager
def suspended():
    """Run a block without the device mode, for code that makes no CUDA device calls (a CUDA device
    argument in it fails as it would on any CPU-only torch). Collectives in it go through gloo. A mode
    pushed above the device mode is left alone (and the device mode then stays)."""
    if not _ENABLED or torch._C._len_torch_function_stack() == 0:
        yield
        return
    top = torch._C._pop_torch_function_stack()
    try:
        if top is not _MODE:
            torch._C._push_on_torch_function_stack(top)
            top = None
        yield
    finally:
        if top is not None:
            torch._C._push_on_torch_function_stack(top)


def is_enabled() -> bool:
    return _ENABLED
