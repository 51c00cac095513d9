"""Fault injection into the real entry point, as a cluster does it to a job.

A :class:`Job` is ``pretrain_llama.py --nproc-per-node 2 ...`` started in its own session, with its output in
a log file. torchrun starts each worker in a session of its own, so the job's processes are those of the
launcher's session and of every worker's (whatever megatron spawns stays in its worker's session): found by
session id, and signalled all at once to do what Slurm does to a step. Tests wait for a point of the run (an
iteration in ``metrics.jsonl``, a save in progress, a log line), inject a fault there (a signal or SIGKILL
to the launcher, one worker, or every process), and check what a requeued job finds: ``latest`` names a
complete checkpoint, no ``iter_*`` is partial, and no process of the job survives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional

from megatron_resonance.training.preemption import child_pids
from tests.training.conftest import PRETRAIN, REPO, command, env

TRACKER = "latest_checkpointed_iteration.txt"


def session_processes(sid: int) -> List[str]:
    """``pid cmdline`` of every live process in session ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(f"{entry} {cmdline.strip()}")
    return out


def latest(save: Path) -> Optional[int]:
    path = Path(save) / TRACKER
    return int(path.read_text()) if path.is_file() else None


def trained(save: Path) -> int:
    """The last iteration logged in ``metrics.jsonl`` (0 before the first); a torn line does not count."""
    path, last = Path(save) / "metrics.jsonl", 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record:
                last = max(last, record["iteration"])
    return last


def saving(save: Path, since: float = 0.0) -> bool:
    """A save is being written: a partial directory made after ``since`` (``time.time()``) exists."""
    for partial in Path(save).glob(".iter_*.partial"):
        try:
            if partial.stat().st_mtime >= since:
                return True
        except OSError:  # renamed in the meantime
            pass
    return False


class Job:
    """One start of the entry point (``args`` after the script name), in its own session."""

    def __init__(self, args, log: Path, script: Path = PRETRAIN, nproc: int = 2):
        self.log = log
        self.started_at = time.time()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                command(script, *args, nproc=nproc), cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pid = self.proc.pid
        self.sessions = {self.pid}

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 180, poll: float = 0.005) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.workers()
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {what}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                self.kill_all()
                raise AssertionError(f"no {what} after {timeout} s:\n{self.output[-4000:]}")
            time.sleep(poll)

    def workers(self) -> List[int]:
        pids = child_pids(self.pid)
        self.sessions.update(pids)
        return pids

    def processes(self) -> List[str]:
        return [line for sid in sorted(self.sessions) for line in session_processes(sid)]

    def send(self, sig: int, target: str) -> None:
        """``sig`` to the ``launcher``, one ``worker`` (the last rank's), or ``all`` the job's processes."""
        if target == "launcher":
            os.kill(self.pid, sig)
        elif target == "worker":
            os.kill(self.workers()[-1], sig)
        elif target == "all":
            self.workers()
            for line in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[0]), sig)
            # Slurm kills a step's cgroup at once; a process listed one by one can fork in between (megatron's
            # checkpoint writer forks during a save), so SIGKILL goes round until none is left
            deadline = time.monotonic() + 10
            while sig == signal.SIGKILL and self.processes() and time.monotonic() < deadline:
                for line in self.processes():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line.split()[0]), sig)
                time.sleep(0.05)
        else:
            raise ValueError(target)

    def finish(self, timeout: float = 180) -> int:
        """Wait for the launcher and for every process of the job (orphaned workers finish their save);
        AssertionError listing any that outlive ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.workers()
            if time.monotonic() > deadline:
                self.kill_all()
                raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}")
            time.sleep(0.1)
        while self.processes():
            if time.monotonic() > deadline:
                left = self.processes()
                self.kill_all()
                raise AssertionError(f"processes survived the job: {left}\n{self.output[-4000:]}")
            time.sleep(0.1)
        return self.proc.returncode

    def kill_all(self) -> None:
        self.workers()
        for line in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        self.proc.wait()
