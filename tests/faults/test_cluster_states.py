"""Checkpoint directories in the states clusters leave them, and hung ranks, through ``pretrain_llama.py``.

* A ``--save`` whose ``iter_*`` directories lost their tracker (a partial copy, a cleanup script) resumes
  from the newest complete one with a ``[resume]`` line; a tracker that is a directory, or checkpoints none
  of which is complete, are refused in one line. No run starts over on top of checkpoints.
* A worker stopped (``SIGSTOP``: what a stuck collective or a dying node looks like) when the preemption
  signal comes: the job gives up after ``--signal-save-timeout`` (and the launcher's grace), exits 1 with
  one line naming the rank, leaves the last complete checkpoint as ``latest``, and the requeued job resumes.
* The same stopped worker without a signal: the others' collective gives up after
  ``--distributed-timeout-minutes`` with one line.
* A ``--save`` holding an entry the run must write but cannot (a read-only mount; another user's files).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_resonance.training import preemption
from tests.faults.harness import TRACKER, Job, latest, trained
from tests.training.conftest import PRETRAIN, TINY_RUN, records, run, train_losses

pytestmark = pytest.mark.slow

ARGS = [*TINY_RUN, "--eval-interval", "0", "--save-interval", "3"]
ERROR = "pretrain_llama.py: error: "


def _tree_digest(root: Path) -> dict:
    """Every file under ``root`` (relative path -> sha256), to see that a refused run changed nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, output[-3000:]
    assert output.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run to iteration 6 with checkpoints at 3 and 6 (copied by each test that changes it)."""
    save = tmp_path_factory.mktemp("states") / "ckpt"
    run(PRETRAIN, *ARGS, "--train-iters", 6, "--save", save)
    assert latest(save) == 6
    return save


def _refused(save: Path, tmp: Path) -> str:
    """Run on ``save``: must exit 2 with one line and leave ``save`` byte for byte as it was."""
    before = _tree_digest(save)
    job = Job([*ARGS, "--train-iters", 8, "--save", save], tmp / "refused.log")
    assert job.finish(timeout=120) == 2, job.output[-3000:]
    assert _tree_digest(save) == before
    return _one_error_line(job.output)


def test_missing_tracker_resumes_from_the_newest_complete_checkpoint(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved, save)
    (save / TRACKER).unlink()
    kept = _tree_digest(save / "iter_0000003")
    proc = run(PRETRAIN, *ARGS, "--train-iters", 8, "--save", save)
    resumed = f"[resume] {save} has no {TRACKER}; resuming from iter_0000006, the newest complete checkpoint"
    assert resumed in proc.stderr
    assert f"resumed from {save / 'iter_0000006'} at iteration 6" in proc.stdout
    assert _tree_digest(save / "iter_0000003") == kept
    assert latest(save) == 8
    assert [r["iteration"] for r in records(save) if "loss" in r] == list(range(1, 9))
    original = train_losses(saved)
    assert {k: v for k, v in train_losses(save).items() if k <= 6} == original


def test_missing_tracker_skips_an_incomplete_newest_checkpoint(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved, save)
    (save / TRACKER).unlink()
    (save / "iter_0000006" / ".metadata").unlink()  # a copy cut short
    proc = run(PRETRAIN, *ARGS, "--train-iters", 4, "--save", save)
    assert "resuming from iter_0000003, the newest complete checkpoint" in proc.stderr
    assert f"resumed from {save / 'iter_0000003'} at iteration 3" in proc.stdout


def test_a_tracker_that_is_a_directory_is_refused(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved, save)
    (save / TRACKER).unlink()
    (save / TRACKER).mkdir()
    line = _refused(save, tmp_path)
    assert line == (
        f"{ERROR}{save / TRACKER} is not a file (Megatron's tracker of the latest iteration): remove or rename "
        f"it, and the run resumes from the newest complete iter_* in {save}"
    )


def test_checkpoints_none_complete_without_tracker_are_refused(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved, save)
    (save / TRACKER).unlink()
    for ckpt in save.glob("iter_*"):
        (ckpt / "common.pt").unlink()
    line = _refused(save, tmp_path)
    assert line == (
        f"{ERROR}{save} holds iter_* directories but no {TRACKER} and none of them is a complete checkpoint: "
        "give another --save, or move them away to start over"
    )


# ---------------------------------------------------------------- hung ranks -------------------------------


def _stop_a_worker_after_a_save(job: Job, save: Path) -> int:
    job.wait_for(lambda: (latest(save) or 0) >= 3 and trained(save) > latest(save), "a periodic save")
    pid = job.workers()[-1]
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_a_hung_rank_at_preemption_gives_up_in_bounded_time(tmp_path):
    save, timeout = tmp_path / "ckpt", 4
    job = Job([*ARGS, "--train-iters", 1000, "--signal-save-timeout", timeout, "--save", save], tmp_path / "hung.log")
    _stop_a_worker_after_a_save(job, save)
    saved_iteration = latest(save)
    start = time.monotonic()
    job.send(signal.SIGTERM, "launcher")
    assert job.finish(timeout=120) == 1  # also: no process of the job is left, the stopped one included
    took = time.monotonic() - start
    assert took < timeout + preemption.KILL_GRACE + 5, took
    line = _one_error_line(job.output)
    assert line == (
        f"{ERROR}the save at SIGTERM did not finish within {timeout} s (--signal-save-timeout): rank 1 (stopped) "
        f"did not answer and was killed; gave up without saving, the latest checkpoint in {save} is still "
        f"iteration {saved_iteration}"
    )
    assert latest(save) == saved_iteration and not list(save.glob("iter_*/.partial"))
    # the requeued job resumes from it and logs every iteration once
    proc = run(PRETRAIN, *ARGS, "--train-iters", saved_iteration + 2, "--save", save)
    assert f"resumed from {save / f'iter_{saved_iteration:07d}'}" in proc.stdout
    assert [r["iteration"] for r in records(save) if "loss" in r] == list(range(1, saved_iteration + 3))


def test_a_hung_rank_times_out_the_collectives(tmp_path):
    save = tmp_path / "ckpt"
    job = Job([*ARGS, "--train-iters", 1000, "--distributed-timeout-minutes", 0.1, "--save", save], tmp_path / "t.log")
    _stop_a_worker_after_a_save(job, save)
    saved_iteration = latest(save)
    assert job.finish(timeout=120) == 1  # 6 s, then torchrun's 30 s for the stopped worker to stop
    assert _one_error_line(job.output) == (
        f"{ERROR}a collective waited longer than --distributed-timeout-minutes 0.1 for another rank (hung, "
        f"stopped or gone): stopped without saving; the latest checkpoint in {save} is still iteration "
        f"{saved_iteration}"
    )
    assert latest(save) == saved_iteration


# ---------------------------------------------------------------- --save contents --------------------------


def test_an_unwritable_entry_in_save_is_refused(tmp_path):
    save = tmp_path / "ckpt"
    board = save / "tensorboard"
    board.mkdir(parents=True)
    (board / "events.out.tfevents.1").write_text("old")
    for cmd in (["mount", "--bind", board, board], ["mount", "-o", "remount,bind,ro", board]):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True)
        if proc.returncode:
            subprocess.run(["umount", "-l", str(board)], check=False)
            pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.decode().strip()}")
    try:
        before = _tree_digest(save)
        job = Job([*ARGS, "--train-iters", 4, "--save", save], tmp_path / "ro.log")
        assert job.finish(timeout=120) == 2, job.output[-3000:]
        line = _one_error_line(job.output)
        assert line.startswith(f"{ERROR}--save {save}: {board} is not writable by this run (owner uid 0"), line
        assert _tree_digest(save) == before
    finally:
        subprocess.run(["umount", "-l", str(board)], check=False)
