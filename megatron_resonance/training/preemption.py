"""SIGTERM/SIGUSR1 (Slurm preemption), recorded from the first line of an entry point to its exit.

The training entry points call :func:`install` before importing torch (seconds of a worker's start), so a
signal is never lost to a default disposition: it is recorded, and the trainer acts on it at the next point
where every rank can agree (``trainer.SignalFlag``): before building when it came that early (nothing to
save: exit 0), else after the step in flight (save, exit 0).

A launcher (``--nproc-per-node``) forwards each recorded signal to its workers with :func:`forward_to_children`,
also when the signal came before the workers existed or had installed their handlers: a worker receives it
once the kernel shows it catching the signal (``SigCgt`` in ``/proc/PID/status``). Its workers start with
the signals blocked (:func:`block_for_children`), so one sent to them directly while they start waits for
their handler instead of killing them.

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Dict, Iterator, List, Optional

#: the signals answered by finishing the step, saving and exiting 0
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: List[int] = []


def _record(signum, frame) -> None:
    _received.append(signum)


def install() -> None:
    """Record SIGTERM/SIGUSR1 in this process from now on (replaces their default: terminate), and take any
    that arrived while they were blocked (a worker of :func:`block_for_children` starts with them blocked)."""
    for sig in SAVE_SIGNALS:
        signal.signal(sig, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SAVE_SIGNALS)


@contextlib.contextmanager
def block_for_children() -> Iterator[None]:
    """Block SIGTERM/SIGUSR1 in this (the main) thread while it starts child processes: the mask is inherited
    through ``exec``, so a child holds a signal pending until its :func:`install`, where a handler would be
    reset to the default action (terminate) by ``exec``. This process still records them: the kernel delivers
    them to a thread that does not block them (:func:`forward_to_children`'s), and Python runs the handler in
    the main thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SAVE_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SAVE_SIGNALS)


def received() -> Optional[int]:
    """The last save signal this process received, or None."""
    return _received[-1] if _received else None


def count() -> int:
    """How many save signals this process has received."""
    return len(_received)


def child_pids(parent: Optional[int] = None) -> List[int]:
    """Processes whose parent is ``parent`` (default: this process), from ``/proc``."""
    parent, pids = os.getpid() if parent is None else parent, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone, or not ours to read
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            pids.append(int(entry))
    return pids


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (its ``SigCgt`` mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def forward_to_children(interval: float = 0.05) -> threading.Thread:
    """Start a daemon thread that passes every signal this process records on to each child process, once per
    signal and child, as soon as the child catches it (see the module docstring). Needs ``/proc``."""
    delivered: Dict[int, int] = {}

    def loop():
        while True:
            time.sleep(interval)
            signals = list(_received)
            if not signals:
                continue
            for pid in child_pids():
                done = delivered.get(pid, 0)
                for signum in signals[done:]:
                    if not catches(pid, signum):
                        break
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:  # exited in the meantime
                        break
                    done += 1
                delivered[pid] = done

    thread = threading.Thread(target=loop, name="forward-signals", daemon=True)
    thread.start()
    return thread
