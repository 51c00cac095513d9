"""Run a worker script from a test, under torchrun (gloo on CPU) or as one process, and return its output.

Worker scripts live next to the tests that use them, guard their body with ``if __name__ == "__main__"``
(dist_checkpointing starts a spawn-context Manager, which re-imports ``__main__``), and report results by
printing or by writing files into a directory the test passes in.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**overrides) -> dict:
    """``os.environ`` for a worker: this repository first on PYTHONPATH, ahead of what was there (where
    ``make gpu-check`` puts the megatron-core it installed), one OpenMP thread, no warnings."""
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), PYTHONWARNINGS="ignore", **overrides)


def run_command(cmd, timeout: int, env=None) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root with :func:`child_env` (plus ``env``); raises AssertionError with the
    output on failure."""
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun(script, *args, nproc: int = 2, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc script args``; raises AssertionError with the output on failure."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(script),
        *map(str, args),
    ]
    return run_command(cmd, timeout, env)


def python(script, *args, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """``python script args`` (one process); raises AssertionError with the output on failure."""
    return run_command([sys.executable, str(script), *map(str, args)], timeout, env)


def load_tool(name: str):
    """The module of ``tools/<name>.py`` (tools are scripts, not a package), imported once per process."""
    import importlib.util

    key = f"tools.{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
