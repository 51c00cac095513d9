"""``distributed._env_from_slurm``: which Slurm environments count as an ``srun`` direct launch (no Slurm or
processes needed; ``scontrol`` is stubbed)."""

from __future__ import annotations

import os

import pytest

from megatron_resonance.errors import ConfigError
from megatron_resonance.megatron import distributed

LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: what the batch script of `sbatch --nodes=2 --ntasks-per-node=1` sees (Slurm 22.05): no step variables
BATCH = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
         "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_LOCALID": "0"}  # fmt: skip
#: task 1 of `srun` in that job
STEP = {**BATCH, "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "n[1-2]"}  # fmt: skip


@pytest.fixture
def slurm_env(monkeypatch):
    def apply(variables: dict[str, str], nodes: dict[str, str] | None = None) -> dict[str, str]:
        for k in [*LAUNCH, *(k for k in os.environ if k.startswith("SLURM_"))]:
            monkeypatch.delenv(k, raising=False)
        for k, v in variables.items():
            monkeypatch.setenv(k, v)

        def scontrol(*args):
            if args[:2] == ("show", "hostnames") and nodes is not None:
                return "\n".join(nodes) + "\n"
            if args[:2] == ("show", "node") and nodes and args[-1] in nodes:
                return f"NodeName={args[-1]} Arch=x86_64 NodeAddr={nodes[args[-1]]} NodeHostName={args[-1]}\n"
            return None  # no scontrol, or it failed

        monkeypatch.setattr(distributed, "_scontrol", scontrol)
        distributed._env_from_slurm()
        return {k: os.environ[k] for k in LAUNCH if k in os.environ}

    return apply


def test_batch_script_is_one_process(slurm_env):
    assert slurm_env(BATCH) == {}
    assert distributed.world_size_from_env() == 1


def test_one_task_step_is_one_process(slurm_env):
    assert slurm_env({**STEP, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) == {}


def test_srun_step_maps_the_step_and_meets_at_node_addr(slurm_env):
    env = slurm_env({**STEP, "SLURM_NTASKS": "8"}, nodes={"n1": "10.0.0.1", "n2": "10.0.0.2"})
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "20042"}  # fmt: skip


def test_without_scontrol_the_first_name_of_the_node_list(slurm_env):
    env = slurm_env({**STEP, "SLURM_STEP_NODELIST": "gpu[07-10],cpu1"})
    assert env["MASTER_ADDR"] == "gpu07"


def test_torchrun_and_explicit_settings_win(slurm_env):
    assert slurm_env({**STEP, "RANK": "3"}) == {"RANK": "3"}
    env = slurm_env({**STEP, "MASTER_ADDR": "head", "MASTER_PORT": "29400"}, nodes={"n1": "10.0.0.1"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "29400")


# ---------------------------------------------------------------- checks before the process group ---------


@pytest.fixture
def srun_task(monkeypatch):
    """This process as task 0 of an ``srun`` step of ``n`` tasks, not yet mapped (what an entry point sees)."""

    def make(n: int):
        for k in [*LAUNCH, *(k for k in os.environ if k.startswith("SLURM_"))]:
            monkeypatch.delenv(k, raising=False)
        for k, v in {**STEP, "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": str(n)}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(distributed, "_scontrol", lambda *args: None)

    return make


def test_training_validates_against_the_srun_world(srun_task):
    """Validation used to read WORLD_SIZE before the Slurm variables were mapped: it saw 1 and rejected TP=2
    under a 2-task srun. With 3 tasks, the line must name the 3."""
    from megatron_resonance.training import launch, trainer
    from megatron_resonance.training.config import config_from_args
    from tests.training.conftest import TINY_RUN

    cfg = config_from_args(launch.make_parser("x", "").parse_args([*TINY_RUN, "--tensor-model-parallel-size", "2"]))
    srun_task(3)
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by TP\*PP\*CP = 2\*1\*1"):
        trainer.run(cfg)


def test_evaluation_validates_against_the_srun_world(srun_task):
    from megatron_resonance.errors import UserError
    from megatron_resonance.evaluation.loading import Runtime

    srun_task(2)
    Runtime(tensor_model_parallel_size=2).check([])  # a 2-task srun at TP=2 is fine
    srun_task(3)
    with pytest.raises(UserError, match=r"world size 3 is not divisible by TP x PP x CP = 2 x 1 x 1"):
        Runtime(tensor_model_parallel_size=2).check([])
