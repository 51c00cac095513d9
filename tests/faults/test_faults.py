"""Faults a cluster injects into a training job, through ``pretrain_llama.py --nproc-per-node 2``.

One checkpoint directory goes through a chain of starts, as a job that Slurm requeues after every fault:
each start resumes from what the last one left and gets one fault (``CHAIN``): SIGKILL of a worker or of
the launcher, before and in the middle of a save; SIGTERM/SIGUSR1 to the launcher, to one worker and to every
process of the job, early (before the workers exist, while they start, while they load the checkpoint),
before and after periodic saves; a second run on the same ``--save``; a step with a non-finite loss; a torn
``metrics.jsonl`` line. After every fault: ``latest`` names a complete checkpoint, no ``iter_*`` is
partial, no process of the job (workers, a multiprocessing manager or resource tracker) survives it. At the
end the metrics hold every iteration exactly once, with the losses of an uninterrupted run, bit for bit.

A full disk is a small tmpfs (root only).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from typing import Callable, Dict, NamedTuple

import pytest

from megatron_resonance.training.preemption import catches
from tests.faults.harness import Job, latest, saving, trained
from tests.training.conftest import PRETRAIN, TINY_RUN, records, run, train_losses

pytestmark = pytest.mark.slow

ARGS = [*TINY_RUN, "--train-iters", "1000", "--eval-interval", "0", "--save-interval", "4"]
KILL, TERM, USR1 = signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1


class Fault(NamedTuple):
    #: "start" (the launcher's first line), "workers" (they exist), "load" (checkpoint loading), "step"
    #: (two more iterations trained), "saved" (after a periodic save and a step), "save" (during a save)
    when: str
    sig: int
    target: str  # launcher, worker, all (every process of the job, as Slurm signals a step)
    saves: bool  # the job ends with a checkpoint of the iteration it reached


CHAIN: Dict[str, Fault] = {
    "kill_worker_before_any_save": Fault("step", KILL, "worker", False),
    "usr1_launcher_at_start": Fault("start", USR1, "launcher", False),
    "term_all_while_workers_start": Fault("workers", TERM, "all", False),
    "usr1_worker_before_first_save": Fault("step", USR1, "worker", True),
    "term_all_after_periodic_save": Fault("saved", TERM, "all", True),
    "usr1_launcher_after_periodic_save": Fault("saved", USR1, "launcher", True),
    "usr1_all_after_periodic_save": Fault("saved", USR1, "all", True),
    "term_worker_during_load": Fault("load", TERM, "worker", False),
    "term_launcher_during_load": Fault("load", TERM, "launcher", False),
    "kill_worker_mid_save": Fault("save", KILL, "worker", False),
    "kill_launcher_mid_step": Fault("step", KILL, "launcher", True),  # the orphaned workers save and exit
    "kill_launcher_mid_save": Fault("save", KILL, "launcher", True),
    "kill_all_mid_save": Fault("save", KILL, "all", False),
    "term_worker_after_periodic_save": Fault("saved", TERM, "worker", True),
}


def _inject(job: Job, save: Path, fault: Fault) -> None:
    start_latest, start_trained = latest(save) or 0, trained(save)
    waits: Dict[str, Callable[[], bool]] = {
        "start": lambda: catches(job.pid, fault.sig),
        "workers": lambda: len(job.workers()) == 2,
        "load": lambda: "[build] parameters on rank 0" in job.output,
        "step": lambda: trained(save) >= max(start_trained, start_latest) + 2,
        "saved": lambda: (latest(save) or 0) > start_latest and trained(save) > latest(save),
        "save": lambda: saving(save, since=job.started_at),
    }
    job.wait_for(waits[fault.when], fault.when, poll=0.005 if fault.when == "save" else 0.05)
    job.send(fault.sig, fault.target)


def _state(save: Path) -> dict:
    return {
        "latest": latest(save),
        "checkpoints": sorted(p.name for p in save.glob("iter_*")) if save.exists() else [],
        "partial": sorted(p.name for p in save.glob(".iter_*.partial")) if save.exists() else [],
        "trained": trained(save),
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Every start of the chain: its fault, exit status, output, the directory before and after, and the
    error when the harness found processes left or the job hung."""
    tmp = tmp_path_factory.mktemp("faults")
    save = tmp / "ckpt"
    results = {}
    for name, fault in CHAIN.items():
        before = _state(save)
        job = Job([*ARGS, "--save", save], tmp / f"{name}.log")
        result = {"fault": fault, "before": before, "error": None}
        try:
            _inject(job, save, fault)
            result["returncode"] = job.finish()
        except AssertionError as e:
            result["error"] = str(e)
        result.update(output=job.output, after=_state(save))
        results[name] = result

    # a second run on the same --save while the first trains; then the first is preempted
    first = Job([*ARGS, "--save", save], tmp / "first.log")
    first.wait_for(lambda: trained(save) > (latest(save) or 0), "training")
    second = Job([*ARGS, "--save", save], tmp / "second.log")
    results["second_run"] = {"returncode": second.finish(), "output": second.output, "holder": first.workers()}
    first.send(USR1, "launcher")
    results["first_run"] = {"returncode": first.finish(), "output": first.output, "after": _state(save)}

    # a torn last metrics line (a full disk or a kill during the append), then a last run to a signal
    with open(save / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 999, "loss": 1.2')
    last = Job([*ARGS, "--save", save], tmp / "last.log")
    _inject(last, save, Fault("step", USR1, "launcher", True))
    results["last"] = {"returncode": last.finish(), "output": last.output, "after": _state(save)}

    # the reference: the same command, uninterrupted, to the iteration the chain reached
    reference = tmp / "reference"
    run(PRETRAIN, *ARGS, "--save", reference, "--exit-interval", latest(save))
    return {"save": save, "results": results, "reference": reference}


def _complete(save: Path, iteration: int) -> bool:
    ckpt = save / f"iter_{iteration:07d}"
    return (ckpt / "megatron_resonance.json").is_file() and (ckpt / ".metadata").is_file()


@pytest.mark.parametrize("name", list(CHAIN))
def test_fault_loses_nothing(chain, name):
    r = chain["results"][name]
    assert r["error"] is None, r["error"]
    fault, before, after = r["fault"], r["before"], r["after"]
    expected = {"launcher": -KILL, "all": -KILL, "worker": 1}[fault.target] if fault.sig == KILL else 0
    assert r["returncode"] == expected, r["output"][-3000:]
    # latest names a complete checkpoint; nothing partial left under an iter_* name
    if after["latest"] is not None:
        assert _complete(chain["save"], after["latest"])
    assert all(_complete(chain["save"], int(c.split("_")[1])) for c in after["checkpoints"])
    if fault.saves:
        assert after["latest"] > (before["latest"] or 0), r["output"][-3000:]
        assert after["latest"] == after["trained"]  # the iteration it reached, not an older one
    else:
        assert after["latest"] == before["latest"], r["output"][-3000:]
    if fault.sig != KILL and fault.when in ("start", "workers", "load"):
        assert "nothing new to save, exiting" in r["output"] or "nothing to save, exiting" in r["output"]


def test_a_save_killed_midway_leaves_no_iteration_directory(chain):
    r = chain["results"]["kill_all_mid_save"]
    assert r["after"]["partial"], "the kill came after the save: the test did not hit a save in progress"
    assert not any(c not in r["before"]["checkpoints"] for c in r["after"]["checkpoints"])
    # the next start removed the partial directory when it saved
    assert not chain["results"]["term_worker_after_periodic_save"]["after"]["partial"]


def test_a_killed_worker_is_named_in_one_line(chain):
    r = chain["results"]["kill_worker_mid_save"]
    assert r["output"].rstrip().splitlines()[-1] == "pretrain_llama.py: error: worker rank 1 was killed by SIGKILL"


def test_non_finite_loss_stops_without_saving(tmp_path):
    # lr 1e30 (a resumed run takes the checkpoint's schedule, so a fresh one): the gradient norm of
    # iteration 3 is NaN, after saves at 1 and 2
    save = tmp_path / "ckpt"
    job = Job([*TINY_RUN, "--train-iters", "20", "--lr", "1e30", "--min-lr", "1e29", "--save-interval", "1",
               "--save", save], tmp_path / "nan.log")  # fmt: skip
    assert job.finish() == 1
    line = _one_error_line(job.output)
    assert line.startswith("pretrain_llama.py: error: non-finite gradient norm (nan) at iteration 3: stopped"), line
    assert line.endswith(f"stopped without saving; the latest checkpoint in {save} is still iteration 2"), line
    assert latest(save) == 2 and _complete(save, 2)
    assert sorted(p.name for p in save.glob("*iter_*")) == ["iter_0000001", "iter_0000002"]
    assert max(r["iteration"] for r in records(save)) == 2  # nothing of iteration 3 logged


def test_second_run_on_one_save_is_refused_naming_the_holder(chain):
    r = chain["results"]["second_run"]
    assert r["returncode"] == 2
    lines = r["output"].strip().splitlines()
    assert len(lines) == 1, r["output"]
    assert lines[0].startswith(f"pretrain_llama.py: error: --save {chain['save']} is in use by another run (pid ")
    assert int(lines[0].split("(pid ")[1].split()[0]) in r["holder"]  # rank 0 of the first run holds it
    assert chain["results"]["first_run"]["returncode"] == 0


def test_torn_metrics_line_is_dropped_with_a_warning(chain):
    r = chain["results"]["last"]
    assert r["returncode"] == 0
    assert "[metrics] warning: dropped the torn last line of" in r["output"]


def test_every_iteration_once_with_the_uninterrupted_losses(chain):
    save = chain["save"]
    iterations = [rec["iteration"] for rec in records(save) if "loss" in rec]
    assert iterations == list(range(1, latest(save) + 1))
    assert train_losses(save) == train_losses(chain["reference"])


# ---------------------------------------------------------------- full disk --------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A mount point for a tmpfs of a given size (root only)."""
    mounts = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("pretrain_llama.py: error:")]
    assert len(errors) == 1, output[-3000:]
    assert output.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


DISK_ARGS = [*TINY_RUN, "--eval-interval", "0", "--save-interval", "2"]


def _failed_run(save: Path, iters: int, log: Path) -> str:
    """Run ``DISK_ARGS`` to ``iters``, which must fail with exit 1 and one error line (returned)."""
    job = Job([*DISK_ARGS, "--train-iters", iters, "--save", save], log)
    assert job.finish() == 1
    return _one_error_line(job.output)


def test_full_disk_keeps_the_last_checkpoint_and_resumes(small_disk, tmp_path):
    # room for one checkpoint (2.2 MB) and the metrics: the second save is refused before it writes
    disk = small_disk("disk", "3m")
    save = disk / "ckpt"
    line = _failed_run(save, 8, tmp_path / "full.log")
    assert f"not enough space to save iteration 4 in {save}" in line
    assert "the latest checkpoint in" in line and "is still iteration 2" in line
    assert latest(save) == 2 and _complete(save, 2)
    assert sorted(p.name for p in save.iterdir() if p.name.startswith((".iter", "iter"))) == ["iter_0000002"]
    # on a disk with room, the requeued job resumes from it and trains every iteration once
    moved = tmp_path / "ckpt"
    shutil.copytree(save, moved)
    proc = run(PRETRAIN, *DISK_ARGS, "--train-iters", 8, "--save", moved)
    assert f"resumed from {moved / 'iter_0000002'} at iteration 2" in proc.stdout
    assert [rec["iteration"] for rec in records(moved) if "loss" in rec] == list(range(1, 9))


def test_disk_full_during_the_write_leaves_nothing_partial(small_disk, tmp_path):
    # smaller than one checkpoint: the first save fails inside megatron's writer
    disk = small_disk("tiny", "1m")
    save = disk / "ckpt"
    line = _failed_run(save, 4, tmp_path / "tiny.log")
    assert f"saving iteration 2 in {save} failed (" in line and f"{save} holds no checkpoint yet" in line
    assert latest(save) is None
    assert not [p.name for p in save.iterdir() if p.name.startswith((".iter", "iter"))]


def test_orphaned_workers_save_and_say_why(chain):
    r = chain["results"]["kill_launcher_mid_step"]
    k = r["after"]["latest"]
    assert f"[signal] the launcher is gone at iteration {k}: saving and exiting" in r["output"]
