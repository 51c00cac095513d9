"""Every private torch API this package uses, each wrapped once with the reason it is needed.

Private names can change in any torch release: a break shows up here, and in the tests of the one feature
that uses it (the CPU speed measures, ``cpu_speed``/``local_ops``, of which nothing here runs with them
off; and context parallelism's attention on CPU, ``sdpa_attention``, which runs either way).
"""

from __future__ import annotations

from typing import List

import torch


# torch._C._len_torch_function_stack / _pop_torch_function_stack / _push_on_torch_function_stack.
# ``cpu_speed.suspended()`` takes cpu_compat's device mode off the stack while the model's forward runs
# (the mode's Python hook on every torch call is the CPU path's one per-op cost) and puts it back. The
# public ``TorchFunctionMode.__exit__`` pops whatever mode is on top, and nothing public says which that is.
def function_mode_depth() -> int:
    return torch._C._len_torch_function_stack()


def pop_function_mode():
    return torch._C._pop_torch_function_stack()


def push_function_mode(mode) -> None:
    torch._C._push_on_torch_function_stack(mode)


# torch._foreach_norm / _foreach_mul_ / _foreach_mul / _foreach_copy_ (documented as beta, underscored):
# Apex's multi-tensor norm and scale behind megatron's grad clipping as one kernel per tensor list, as
# torch's own optimizers and ``clip_grad_norm_`` run them (megatron's fallback loops in Python).
def foreach_norm(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    return torch._foreach_norm(tensors)


def foreach_mul_(tensors: List[torch.Tensor], scale: float) -> None:
    torch._foreach_mul_(tensors, scale)


def foreach_mul(tensors: List[torch.Tensor], scale: float) -> List[torch.Tensor]:
    return torch._foreach_mul(tensors, scale)


def foreach_copy_(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    torch._foreach_copy_(dst, src)


# torch.ops.aten.silu_backward.grad_input: SiLU's gradient written into a given tensor (``local_ops.SwiGLU``
# writes the gate's half-gradient into its half of one buffer); no public function takes an output.
def silu_backward_into(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)


# Tensor._version: autograd's count of in-place changes. ``local_ops`` keeps cos/sin of the last angle
# table and must recompute them after the table changed in place (same tensor, new values).
def version(tensor: torch.Tensor) -> int:
    return tensor._version


# torch.ops.aten._scaled_dot_product_flash_attention_for_cpu and its _backward: the CPU flash kernel behind
# SDPA, which also returns the log-sum-exp of each query row and takes it back in backward.
# ``SDPAAttention``'s context parallelism attends a query chunk to its own keys (causal) and to the earlier
# keys (unmasked) in two calls merged by log-sum-exp, the backward of each from the merged output and
# log-sum-exp (as ring attention does): SDPA's public function returns no log-sum-exp, and with one call and
# a boolean mask the kernel saves an L x (c+1)L float copy of the mask per layer.
def flash_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)


def flash_attention_cpu_backward(grad, q, k, v, out, logsumexp, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, logsumexp, 0.0, is_causal, scale=scale
    )
