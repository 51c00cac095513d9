"""SIGUSR1 / SIGTERM (Slurm preemption): the workers finish the step, save, exit 0, and a requeued run
resumes from that checkpoint.

Both ways a signal arrives are covered (``signal_runs`` in conftest): to the launcher
(``pretrain_llama.py --nproc-per-node 2``, which passes it on to its torchrun workers), and to the
workers themselves (what ``srun`` / a Slurm step signal does).
"""

from __future__ import annotations

import os

import pytest

from tests.training.conftest import stored_config

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("which", ["first", "second"])
def test_signal_saves_and_exits_zero(signal_runs, which):
    r = signal_runs[which]
    assert r["returncode"] == 0, r["output"][-4000:]
    saved = int(r["latest"])
    # saved at the end of the step in flight when the signal came, long before the 1000 iterations
    assert r["reached"] <= saved < 1000
    assert f"[signal] received at iteration {saved}: saving and exiting" in r["output"]
    assert f"iter_{saved:07d}" in r["checkpoints"]
    assert stored_config(signal_runs["save"] / f"iter_{saved:07d}")["iteration"] == saved
    assert r["iterations"][-1] == saved  # nothing logged past the checkpoint
    assert len(r["workers"]) == 2 and not any(_alive(pid) for pid in r["workers"])


def test_requeued_run_resumes_from_the_signal_checkpoint(signal_runs):
    first, second = signal_runs["first"], signal_runs["second"]
    k = int(first["latest"])
    assert f"resumed from {signal_runs['save'] / f'iter_{k:07d}'} at iteration {k}" in second["output"]
    assert int(second["latest"]) > k
    assert second["checkpoints"] == [f"iter_{k:07d}", f"iter_{int(second['latest']):07d}"]
    # each iteration logged once: 1..k by the first run, k+1.. by the resumed one
    assert second["iterations"] == list(range(1, int(second["latest"]) + 1))
