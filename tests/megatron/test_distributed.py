"""Launch variables: ``srun`` starting the workers directly (one Slurm task per process, no torchrun) is
seen as the world it is by every check that runs before the process group exists."""

from __future__ import annotations

import os

import pytest

from megatron_resonance.cli import UsageError
from megatron_resonance.evaluation.models import Runtime
from megatron_resonance.megatron import distributed
from megatron_resonance.training import launch, trainer
from megatron_resonance.training.config import ConfigError, config_from_args
from tests.training.conftest import TINY_RUN


@pytest.fixture
def srun_task(monkeypatch):
    """This process as task 0 of an ``srun`` step with ``n`` tasks (no torchrun variables)."""

    def make(n: int):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                   SLURM_NTASKS=str(n), SLURM_STEP_NUM_TASKS=str(n), SLURM_JOB_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1")  # fmt: skip (no scontrol look-up of the first node's address)
        monkeypatch.setattr(os, "environ", env)

    return make


def test_world_size_from_srun(srun_task):
    srun_task(4)
    assert distributed.world_size_from_env() == 4
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "4", "0")


def test_training_validates_against_the_srun_world(srun_task):
    """Validation used to read WORLD_SIZE before the Slurm variables were mapped: it saw 1 and rejected TP=2
    under a 2-task srun. With 3 tasks, the line must name the 3."""
    cfg = config_from_args(launch.make_parser("x", "").parse_args([*TINY_RUN, "--tensor-model-parallel-size", "2"]))
    srun_task(3)
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by TP\*PP\*CP = 2\*1\*1"):
        trainer.run(cfg)


def test_evaluation_validates_against_the_srun_world(srun_task):
    srun_task(2)
    Runtime(tensor_model_parallel_size=2).check([])  # a 2-task srun at TP=2 is fine
    srun_task(3)
    with pytest.raises(UsageError, match=r"world size 3 is not divisible by TP x PP = 2 x 1"):
        Runtime(tensor_model_parallel_size=2).check([])
