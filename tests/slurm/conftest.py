"""A real two-node Slurm for the tests marked ``slurm``: ``slurm/local_cluster.sh`` started once per session
with ``LOCAL_SLURM_NODES=2``: nodes ``n1`` and ``n2``, one slurmd each on this host. Their names resolve
nowhere (``NodeAddr=127.0.0.1`` is how anything reaches them), as on clusters whose node names are not host
names. One-node jobs run on either node.

Each session runs its own cluster (its own state directory in /tmp, free ports), so it never touches a
cluster someone started by hand and two sessions on one host do not collide. Where the Slurm packages are
missing the fixture installs them (``local_cluster.sh install``, apt) when it runs as root; the tests skip,
with the reason, only where that is impossible. A cluster that is installed but fails to start is an
error, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
NODES = 2
"""Nodes of the session's cluster: ``n1``, ``n2``."""
SLURM_COMMANDS = ("sbatch", "srun", "scontrol", "squeue", "slurmctld", "slurmd", "munged")
# States after which a job never runs again (a requeued job passes through REQUEUED/PENDING instead).
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT",
}  # fmt: skip


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_block(n: int, tries: int = 50) -> int:
    """The first of ``n`` consecutive ports free right now (local_cluster.sh gives node I port base + I - 1)."""
    for _ in range(tries):
        (base,) = _free_ports(1)
        if base + n > 65536:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def _missing_commands() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [c for c in SLURM_COMMANDS if shutil.which(c, path=path) is None]


@dataclass
class LocalSlurm:
    """Handle on the session's cluster: submit with :meth:`sbatch`, watch with :meth:`job` and :meth:`wait`."""

    state_dir: Path
    env: dict[str, str]
    """Environment for Slurm commands: ``SLURM_CONF`` of this cluster, no inherited ``SLURM_*`` job vars."""

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster; fails the test with its stderr if it fails."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: Path, *args: str, cwd: Path | None = None) -> int:
        """Submit ``script`` (with extra sbatch ``args``); returns the job id."""
        out = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd or script.parent).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...). Finished jobs stay visible
        for MinJobAge (300 s) after they end."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = 120, until=lambda job: job["JobState"] in FINAL_STATES) -> dict:
        """Poll the job every second until ``until(job)``; fails the test with the cluster logs on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {job['JobState']} after {timeout:.0f}s\n{job}\n{self.logs()}")
            time.sleep(1)

    def logs(self, lines: int = 30) -> str:
        tails = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            tails.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)


@pytest.fixture(scope="session")
def local_slurm():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("local Slurm needs root (slurmd launches jobs, munged reads /etc/munge/munge.key)")
    if _missing_commands():
        if shutil.which("apt-get") is None:
            pytest.skip(f"Slurm not installed ({', '.join(_missing_commands())} missing) and no apt-get")
        install = subprocess.run(
            ["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900, check=False
        )
        if install.returncode != 0 or _missing_commands():
            pytest.skip(f"could not install slurm-wlm/munge with apt-get:\n{install.stdout[-2000:]}{install.stderr}")

    # Short path under /tmp: slurmd's step sockets live in the spool and must fit sun_path (108 bytes).
    state_dir = Path(tempfile.mkdtemp(prefix="mr-slurm-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    slurmd_port = _free_port_block(NODES)
    ctld_port = next(p for p in _free_ports(NODES + 1) if not slurmd_port <= p < slurmd_port + NODES)
    env.update(
        LOCAL_SLURM_DIR=str(state_dir),
        LOCAL_SLURM_NODES=str(NODES),
        LOCAL_SLURM_CTLD_PORT=str(ctld_port),
        LOCAL_SLURM_D_PORT=str(slurmd_port),
        SLURM_CONF=str(state_dir / "etc" / "slurm.conf"),
    )
    cluster = LocalSlurm(state_dir, env)
    start = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
    if start.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"local Slurm did not start:\n{start.stdout}{start.stderr}\n{cluster.logs()}")
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
