"""What ``cpu_compat`` does for megatron's code, asserted in ``tests/megatron/test_cpu_compat.py``; run by
``model_checks.py``."""

from __future__ import annotations

import torch


def check_cpu_compat():
    """What ``cpu_compat`` does for megatron's code, with ``cpu_speed`` off: CUDA device arguments land on
    the CPU, ``.cuda()`` and ``.type()`` answer as on a GPU, megatron's RNG tracker forks the CPU generator,
    and megatron's own linear Function runs its sequence-parallel backward (device allocations in backward).

    Asserted by ``test_megatron_s_device_calls_run_on_the_cpu``,
    ``test_megatron_s_rng_tracker_forks_the_cpu_generator``,
    ``test_megatron_s_linear_runs_its_sequence_parallel_backward``."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, layers

    from megatron_resonance.megatron import cpu_speed

    out = {}
    try:
        cpu_speed.set_enabled(False)
        x = torch.ones(3)
        made = [
            torch.zeros(2, device="cuda"),
            torch.zeros(2, device=0),
            torch.zeros(2, device=torch.device("cuda")),
            x.to("cuda"),
            x.to(torch.device("cuda", 0)),
            torch.empty(2, pin_memory=True),
        ]
        out["devices"] = sorted({t.device.type for t in made})
        out["cuda_is_identity"] = x.cuda() is x
        out["type_names"] = [torch.ones(1, dtype=d).type() for d in (torch.float32, torch.bfloat16, torch.float16)]

        torch.manual_seed(7)
        plain = torch.rand(4)
        torch.manual_seed(7)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        after_fork = torch.rand(4)
        out["rng"] = {
            "fork_draws_elsewhere": not torch.equal(forked, plain),
            "default_stream_restored": torch.equal(after_fork, plain),
        }

        function = layers.LinearWithGradAccumulationAndAsyncCommunication
        g = torch.Generator().manual_seed(6)
        inp = torch.randn(5, 2, 8, generator=g).requires_grad_(True)
        weight = torch.nn.Parameter(torch.randn(6, 8, generator=g))
        y = function.apply(inp, weight, None, False, False, True, None, 0, ps.get_tensor_model_parallel_group())
        y.backward(torch.ones_like(y))
        out["megatron_linear"] = f"{function.__module__}.{function.__qualname__}"
        out["sequence_parallel_grads"] = [
            (inp.grad - torch.ones(5, 2, 6) @ weight.detach()).abs().max().item(),
            (weight.grad - torch.ones(10, 6).t() @ inp.detach().reshape(10, 8)).abs().max().item(),
        ]
    finally:
        cpu_speed.set_enabled(True)
    return out
