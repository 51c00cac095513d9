"""The trainer's checkpoints between a GPU and a CPU. Worker: ``workers/trainer_steps.py save|load``;
comparison: ``checks.py``."""

from __future__ import annotations

import pytest
import torch

from tests.gpu import checks
from tests.gpu.conftest import transfer
from tests.gpu.workers.trainer_steps import STEPS


@pytest.mark.gpu
@pytest.mark.parametrize("save_on, load_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_moves_between_gpu_and_cpu(tmp_path, save_on, load_on):
    """A full training checkpoint (model, distributed optimizer, scheduler, RNG) saved on one device loads on
    the other: every weight and Adam entry bit for bit, and training goes on from it."""
    saved, loaded = transfer(tmp_path, save_on, load_on)
    assert saved["device"].startswith(save_on) and loaded["device"].startswith(load_on)
    assert loaded["iteration"] == STEPS
    checks.assert_same_training_state(saved, loaded)


# ---------------------------------------------------------------- the same workers and check on CPU -------


@pytest.mark.slow
def test_checkpoint_check_on_cpu(tmp_path):
    """The checkpoint worker and its check with both sides on the CPU."""
    saved, loaded = transfer(tmp_path, "cpu", "cpu")
    assert loaded["iteration"] == STEPS
    checks.assert_same_training_state(saved, loaded)
    assert saved["next_loss"] == loaded["next_loss"]  # the same device: exactly


def test_checkpoint_check_fails_on_what_it_guards():
    state = {
        "device": "cpu",
        "weights": {"w": torch.ones(3)},
        "scheduler_steps": 32,
        "next_loss": 3.0,
        "adam": [{"param": torch.ones(3), "exp_avg": torch.zeros(3), "step": torch.tensor(8.0)}],
    }
    same = {**state, "weights": {"w": torch.ones(3)}}
    checks.assert_same_training_state(state, same)
    for broken, message in (
        ({**state, "weights": {"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}}, "weight w"),
        ({**state, "adam": [{**state["adam"][0], "step": torch.tensor(0.0)}]}, "'step'"),
        ({**state, "scheduler_steps": 0}, "scheduler steps"),
        ({**state, "next_loss": 3.1}, "next loss"),
    ):
        with pytest.raises(AssertionError, match=message):
            checks.assert_same_training_state(state, broken)
