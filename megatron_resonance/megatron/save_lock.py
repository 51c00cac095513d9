"""One run at a time writes a checkpoint directory: :func:`hold_save_dir` takes an ``flock`` on its
``LOCK_FILE`` that the kernel releases when the holder dies, even by SIGKILL, and writes who holds it;
:func:`check_save_dir_free` checks before a launch."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from typing import Iterator, Optional

import torch.distributed as dist

from megatron_resonance.errors import CheckpointError
from megatron_resonance.megatron.checkpoint_layout import LOCK_FILE
from megatron_resonance.megatron.checkpointing import raise_on_every_rank


@contextlib.contextmanager
def hold_save_dir(root: Optional[str]) -> Iterator[None]:
    """Hold ``root`` for this run (collective): rank 0 takes an exclusive ``flock`` on ``root/LOCK_FILE`` and
    writes who holds it; CheckpointError on every rank, naming the holder, when another run has it."""
    handle, problem = None, None
    if root and dist.get_rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            handle = open(os.path.join(root, LOCK_FILE), "a+")
        except OSError as e:
            problem = f"--save {root}: {e.strerror or e}"
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                problem = _held_message(root, _read_holder(handle))
                handle.close()
                handle = None
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(_holder_text())
                handle.flush()
    if root:
        raise_on_every_rank(problem)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def check_save_dir_free(root: Optional[str]) -> None:
    """CheckpointError naming the holder when another run holds ``root`` (see :func:`hold_save_dir`). Creates
    nothing: for the checks before a launch."""
    path = os.path.join(root, LOCK_FILE) if root else None
    if not path or not os.path.isfile(path):
        return
    try:
        handle = open(path)
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointError(_held_message(root, _read_holder(handle))) from None


def _held_message(root: str, holder: str) -> str:
    return f"--save {root} is in use by another run ({holder}): wait for it to end, or give another --save"


def _holder_text() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f", Slurm job {job}" if job else "") + f", since {since}"


def _read_holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "holder unknown"
