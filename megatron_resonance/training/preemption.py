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

A save at a signal is collective: one hung rank (a stuck collective, a dying node, a stopped process) would
hold every other rank until the job's time runs out. :func:`arm_deadline` bounds it: a worker still alive
``--signal-save-timeout`` seconds after the signal gives up (its caller's line, exit 1), and the launcher
kills the workers that outlive that by :data:`KILL_GRACE` (:func:`forward_to_children`). A save cut short is
a ``.iter_N.partial`` directory, never ``latest``. The same bound holds for any other work in flight at
the signal (a long dataset index build, a checkpoint load).

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional

#: the signals answered by finishing the step, saving and exiting 0
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: seconds the launcher waits, past the workers' own deadline, before it kills the workers still alive
KILL_GRACE = 5.0

_received: List[int] = []
_first: List[tuple] = []  # (time.monotonic(), signum) of the first save signal, as the kernel delivered it
_got_one = threading.Event()
_wakeup: List[int] = []  # the read end of the wakeup pipe, once installed


def _arrived(signum: int) -> None:
    if not _first:
        _first.append((time.monotonic(), signum))
    _got_one.set()


def _record(signum, frame) -> None:
    _received.append(signum)
    _arrived(signum)


def _watch_wakeup(fd: int) -> None:
    """Python runs a handler only when the main thread is back in the interpreter, never while it is blocked
    in a collective; the C-level handler writes each signal's number to the wakeup fd at once."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        for signum in data:
            if signum in SAVE_SIGNALS:
                _arrived(signum)


def install() -> None:
    """Record SIGTERM/SIGUSR1 in this process from now on (replaces their default: terminate), and take any
    that arrived while they were blocked (a worker of :func:`block_for_children` starts with them blocked).
    Their arrival is also noted at once by a thread reading ``signal.set_wakeup_fd``'s pipe
    (:func:`arm_deadline` counts from it)."""
    for sig in SAVE_SIGNALS:
        signal.signal(sig, _record)
    if not _wakeup and threading.current_thread() is threading.main_thread():
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        _wakeup.append(read_end)
        threading.Thread(target=_watch_wakeup, args=(read_end,), name="signal-wakeup", daemon=True).start()
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


def seconds_since_signal() -> Optional[float]:
    """Seconds since the first save signal, or None before one."""
    return time.monotonic() - _first[0][0] if _first else None


def arm_deadline(seconds: float, give_up: Callable[[int], int]) -> threading.Thread:
    """Start a daemon thread that, once a save signal has come and this process is still alive ``seconds``
    after it, calls ``give_up(signum)`` (it reports) and ends the process with the status it returns (1 if
    it raises): a rank blocked in a collective with a hung peer never returns to check a flag."""

    def watch():
        _got_one.wait()
        time.sleep(max(0.0, seconds - seconds_since_signal()))
        status = 1
        try:
            status = give_up(_first[0][1])
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(status)

    thread = threading.Thread(target=watch, name="signal-deadline", daemon=True)
    thread.start()
    return thread


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


_STATES = {"R": "running", "S": "waiting", "D": "waiting in the kernel", "T": "stopped", "t": "stopped"}


def describe_worker(pid: int) -> Optional[str]:
    """``rank N (stopped)``: a live child's torchrun rank and its state from ``/proc``; None when it is gone
    or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except (OSError, IndexError):
        return None
    if state in ("Z", "X"):
        return None
    rank = env.get(b"RANK", b"?").decode(errors="replace")
    return f"rank {rank} ({_STATES.get(state, 'state ' + state)})"


def forward_to_children(
    interval: float = 0.05, deadline: Optional[float] = None, killed: Optional[Dict[int, str]] = None
) -> threading.Thread:
    """Start a daemon thread that passes every signal this process records on to each child process, once per
    signal and child, as soon as the child catches it (see the module docstring). Needs ``/proc``.

    With ``deadline`` (the workers' ``--signal-save-timeout``), children still alive ``deadline +
    KILL_GRACE`` seconds after the first signal are killed (SIGKILL: a stopped process takes nothing else),
    and ``killed`` records each one by pid (:func:`describe_worker`)."""
    delivered: Dict[int, int] = {}

    def loop():
        while True:
            time.sleep(interval)
            signals = list(_received)
            if not signals:
                continue
            if deadline is not None and seconds_since_signal() > deadline + KILL_GRACE:
                for pid in child_pids():
                    what = describe_worker(pid)
                    if what:
                        if killed is not None:
                            killed[pid] = what
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
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
