"""torch.distributed + megatron ``parallel_state`` initialization from torchrun or Slurm variables.

gloo on CPU (with ``cpu_compat``, and ``cpu_speed`` as the environment chooses), NCCL on GPU.
``initialize`` is what every entry point and multi-process test calls; ``destroy`` undoes it so a process
can re-initialize with another layout.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from typing import Optional

import torch
import torch.distributed as dist

from megatron_resonance.cli import is_rank0
from megatron_resonance.megatron import cpu_compat, cpu_speed

# megatron.core (seconds to import) is imported inside the functions that use it: the tools' --help and input checks
# run without it.


def _env_from_slurm() -> None:
    """Map Slurm's per-task variables onto torchrun's when ``srun`` started the workers directly (one Slurm
    task per process, no torchrun).

    Only inside an ``srun`` step of several tasks: the batch script itself also has ``SLURM_PROCID=0`` and
    the *job's* ``SLURM_NTASKS``, and a plain ``python tool.py`` there (or in a one-task step) is one
    process. The world size is the step's task count, the rendezvous host the step's first node, by its
    ``NodeAddr`` (node names need not resolve), the port derived from the job id unless ``MASTER_PORT`` is
    set. Under torchrun (``RANK`` set) nothing changes.
    """
    env = os.environ
    if "RANK" in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")
    if int(tasks) <= 1:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = tasks
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "9500")) % 10000))
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        env["MASTER_ADDR"] = _node_addr(_first_host(nodelist))


def _scontrol(*args: str) -> Optional[str]:
    """``scontrol ARGS`` stdout, or None where scontrol is missing or fails (a container without Slurm)."""
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[01-04],gpu7`` -> ``node01``): scontrol's expansion, else
    a parse of the first entry."""
    out = _scontrol("show", "hostnames", nodelist)
    if out and out.split():
        return out.split()[0]
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].split("]")[0]
    return head


def _node_addr(node: str) -> str:
    """The node's ``NodeAddr`` (``scontrol show node``), else its name."""
    out = _scontrol("show", "node", "--oneliner", node)
    match = re.search(r"\bNodeAddr=(\S+)", out or "")
    return match.group(1) if match and match.group(1) not in ("", "(null)") else node


def world_size_from_env() -> int:
    """The launch's world size before any process group exists: torchrun's ``WORLD_SIZE``, or Slurm's task
    count when ``srun`` started the workers directly (its variables are mapped onto torchrun's first)."""
    _env_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(timeout_minutes: float = 30) -> None:
    """Initialize torch.distributed (single process if no launcher variables are set); a collective that
    waits longer than ``timeout_minutes`` for another rank raises."""
    if dist.is_initialized():
        return
    _env_from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        cpu_compat.enable()
        cpu_speed.set_enabled()
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 30,
) -> None:
    """Process group (collectives time out after ``timeout_minutes``), megatron model-parallel groups and
    seeds (same seed on every rank, as Megatron-LM; the TP-region RNG tracker offsets by TP rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_process_group(timeout_minutes)
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {tensor_model_parallel_size} x "
            f"{pipeline_model_parallel_size} x {context_parallel_size}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron's groups (keeps the process group, so another layout can follow)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def shutdown() -> None:
    """Tear the process group down at the end of a run: left to the interpreter's exit, gloo's worker
    threads were destroyed while still joinable now and then (``terminate called without an active
    exception``, SIGABRT after a run had finished and saved)."""
    destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank's tensors for the model and collectives live: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
