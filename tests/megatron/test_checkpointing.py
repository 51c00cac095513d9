"""Checkpoint helpers that need no process group: where a restored Adam ``step`` lives, and a save that starts
no long-lived helper process (megatron-core's writer would keep its results queue in a multiprocessing
manager, which a Slurm step signal kills, failing every later save; the end-to-end case is tests/slurm,
two-node preemption after a periodic save)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import types

import pytest
import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_resonance.errors import CheckpointError
from megatron_resonance.megatron import checkpoint_layout, checkpointing, compat, save_lock


def _adam_over(param: torch.Tensor, fused: bool) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([param])  # fused=True refuses the meta device at construction; set it below
    group = opt.param_groups[0]
    group["fused"], group["foreach"], group["step"] = fused, False, 5
    opt.state[param] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(param)}
    return opt


def _restore(opt) -> None:
    """What a load does after megatron's optimizer load."""
    optimizer = types.SimpleNamespace(optimizer=opt)
    compat.restore_adam_steps(optimizer)
    checkpointing.place_adam_steps(optimizer)


@pytest.mark.parametrize("fused", [True, False])
def test_restored_adam_step_is_where_the_kernel_reads_it(fused):
    """torch's fused (and capturable) Adam keeps ``step`` on the parameter's device; CUDA's fused kernel
    rejects CPU steps. A parameter on the meta device stands in for a CUDA one."""
    param = torch.nn.Parameter(torch.zeros(4, device="meta"))
    opt = _adam_over(param, fused)
    _restore(opt)
    step = opt.state[param]["step"]
    assert step.device == (param.device if fused else torch.device("cpu"))
    assert step.dtype == torch.float32


def test_restored_adam_step_takes_the_group_count_per_parameter():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = torch.optim.AdamW(params, fused=True)
    opt.param_groups[0]["step"] = 7
    for p in params:
        opt.state[p] = {"step": torch.tensor(1.0)}
    _restore(opt)
    steps = [opt.state[p]["step"] for p in params]
    assert [float(s) for s in steps] == [7.0, 7.0]
    assert steps[0] is not steps[1]  # foreach Adam increments a shared tensor once per parameter


def test_write_results_queue_is_in_process(monkeypatch):
    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a process that has not saved yet
    before = set(multiprocessing.active_children())
    compat.in_process_write_results_queue()
    # what FileSystemWriterAsync takes (0.19.x made the getter public)
    get = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
    results = get()
    assert isinstance(results, queue.Queue)
    assert set(multiprocessing.active_children()) == before


class _Tracker:
    def __init__(self):
        self.loaded = []

    def set_states(self, states):
        self.loaded.append(states)


@pytest.mark.parametrize("saved_on_gpu", [True, False])
def test_rng_state_from_the_other_kind_of_device_keeps_this_runs_seeds(saved_on_gpu, rank0, monkeypatch):
    """A CUDA generator's state (16 bytes: Philox seed and offset) does not load into a CPU generator (5,056
    bytes) or the other way round: across devices only the CPU generator's state is restored; on the same
    kind of device everything is."""
    from megatron.core import tensor_parallel

    tracker, cuda_loaded = _Tracker(), []
    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda: tracker)
    monkeypatch.setattr(torch.cuda, "set_rng_state", cuda_loaded.append)
    philox, twister = torch.zeros(16, dtype=torch.uint8), torch.get_rng_state()
    generator = philox if saved_on_gpu else twister
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": philox if saved_on_gpu else None,
        "tracker": {"model-parallel-rng": generator},
    }
    expected = torch.rand(3)
    for here_gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: here_gpu)
        checkpointing._set_rng(state)
        assert torch.equal(torch.rand(3), expected)  # the CPU generator: restored either way
        same = here_gpu == saved_on_gpu
        assert tracker.loaded == ([state["tracker"]] if same else [])
        assert cuda_loaded == ([philox] if same and saved_on_gpu else [])
        tracker.loaded.clear()
        cuda_loaded.clear()


# ---------------------------------------------------------------- one writer per --save -------------------


@pytest.fixture
def rank0(monkeypatch):
    """``hold_save_dir`` as rank 0 of a one-process job (its verdict broadcast is then a no-op)."""
    monkeypatch.setattr(save_lock.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(save_lock.dist, "broadcast_object_list", lambda objects, src: None)


def _holder(root, seconds: float = 60):
    """Another process holding ``root`` (takes the lock as a run's rank 0 does), until killed."""
    import subprocess
    import sys

    code = (
        "import fcntl, os, sys, time\n"
        f"f = open(os.path.join({str(root)!r}, {checkpoint_layout.LOCK_FILE!r}), 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid %d on somehost, since then' % os.getpid()); f.flush()\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_save_dir_is_refused_naming_the_holder(tmp_path, rank0):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid} on "):
            save_lock.check_save_dir_free(str(tmp_path))
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid} on "):
            with save_lock.hold_save_dir(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the next run takes it and says it holds it
    save_lock.check_save_dir_free(str(tmp_path))
    with save_lock.hold_save_dir(str(tmp_path)):
        text = (tmp_path / checkpoint_layout.LOCK_FILE).read_text()
        assert text.startswith(f"pid {os.getpid()} on ")
        with pytest.raises(CheckpointError, match=rf"\(pid {os.getpid()} on "):
            save_lock.check_save_dir_free(str(tmp_path))
    save_lock.check_save_dir_free(str(tmp_path))  # released at the end of the run


def test_checking_a_save_dir_creates_nothing(tmp_path):
    save_lock.check_save_dir_free(str(tmp_path / "new"))
    save_lock.check_save_dir_free(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
