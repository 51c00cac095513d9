"""What a measurement ran on: date, commit, hardware and library versions, recorded with every report."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    """``git describe --always --dirty`` of this checkout, or "unknown" (no git, a copied tree)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


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
