"""What a run or measurement runs on: date, commit, hardware and library versions, recorded with every
report; the CPU threads each worker process gets."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Mapping, Optional, Tuple

# torch and megatron.core (seconds to import) are imported inside describe/hardware: light tools import
# this module.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    """``git describe --always --dirty`` of this checkout, or "unknown" (no git, a copied tree)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what a scheduler gave it), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def threads_per_process(
    processes: int,
    cores_given: Optional[int] = None,
    source: str = "the CPU affinity",
    environ: Mapping[str, str] = os.environ,
) -> Tuple[int, str]:
    """``(threads, why)``: the OMP_NUM_THREADS for each of ``processes`` workers sharing ``cores_given`` cores
    (default :func:`cores`, named by ``source``): the cores divided among them, at least 1. An
    OMP_NUM_THREADS already set wins. torchrun alone sets 1 whenever it starts several workers, which leaves
    the other cores idle on a CPU run. slurm/common.sh applies the same rule to the job's CPUs."""
    user = environ.get("OMP_NUM_THREADS", "").strip()
    if user.isdigit() and int(user) > 0:
        return int(user), "from OMP_NUM_THREADS"
    if cores_given is None:
        cores_given = cores()
    plural = "process" if processes == 1 else "processes"
    return max(1, cores_given // max(1, processes)), f"{cores_given} cores from {source} / {processes} {plural}"


def threads_line(threads: int, why: str) -> str:
    """The log line for :func:`threads_per_process`'s answer (the Slurm scripts print the same words)."""
    return f"CPU threads: {threads} per process ({why})"


def hardware() -> str:
    """The GPU's name, or the CPU model with the cores this process sees."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores visible)"


def describe() -> dict:
    """``{"date", "commit", "hardware", "python", "torch", "megatron_core", "threads"}``."""
    import torch

    try:
        import megatron.core

        megatron_core = getattr(megatron.core, "__version__", "unknown")
    except ImportError:
        megatron_core = "not installed"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit(),
        "hardware": hardware(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron_core,
        "threads": torch.get_num_threads(),
    }
