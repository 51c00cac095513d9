"""Context parallelism without Transformer Engine through ``pretrain/pretrain_llama.py`` (gloo, CPU):
CP=2 logs CP=1's losses for ``rope``, ``yarn`` and ``resonance_yarn``, and TP=2 x CP=2 (4 processes) TP=1's.

Each CP run is compared with the same command at CP=1 (DP=2, the same global batch); the CP=2 ``yarn`` run
has the ``cpu_speed`` measures off (megatron-core's own code, ``MEGATRON_RESONANCE_CPU_SPEED=0``), the
others on. Seven torchrun jobs of 10 iterations, each run once per module when a test asks for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import pytest

from megatron_resonance.megatron.checkpoint_layout import read_config
from tests.training.conftest import PRETRAIN, TINY_RUN, eval_losses, run, train_losses

pytestmark = pytest.mark.slow

ITERS = 10
#: weights far from LLaMA's 0.02 init, so attention is far from uniform and positions shape the losses
INIT = ["--init-method-std", "0.1"]
#: CP=2 equals CP=1 to float rounding (measured ~1e-7; the ranks sum the loss and gradients in another order)
RTOL = 1e-5
KINDS = {
    "rope": [],
    "yarn": ["--rope-kind", "yarn", "--rope-factor", "4", "--original-max-position", "8"],
    "resonance_yarn": [
        "--rope-kind",
        "resonance_yarn",
        "--rope-factor",
        "4",
        "--original-max-position",
        "8",
        "--rotary-base",
        "5000",
    ],
}
#: run name -> (rope kind, layout flags, processes, environment)
RUNS = {
    **{f"{kind}_cp1": (kind, [], 2, {}) for kind in KINDS},
    "rope_cp2": ("rope", ["--context-parallel-size", "2"], 2, {}),
    "yarn_cp2": ("yarn", ["--context-parallel-size", "2"], 2, {"MEGATRON_RESONANCE_CPU_SPEED": "0"}),
    "resonance_yarn_cp2": ("resonance_yarn", ["--context-parallel-size", "2"], 2, {}),
    "resonance_yarn_tp2_cp2": (
        "resonance_yarn",
        ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"],
        4,
        {},
    ),
}


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("context_parallel")
    done: Dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            kind, layout, nproc, extra_env = RUNS[name]
            save = root / name
            try:
                proc = run(
                    PRETRAIN,
                    *TINY_RUN,
                    *INIT,
                    *KINDS[kind],
                    *layout,
                    "--train-iters",
                    ITERS,
                    "--save",
                    save,
                    nproc=nproc,
                    extra_env=extra_env,
                )
                done[name] = {"save": save, "stdout": proc.stdout}
            except AssertionError as e:
                done[name] = {"error": str(e)}
        if "error" in done[name]:
            pytest.fail(f"run {name} failed:\n{done[name]['error']}", pytrace=False)
        return done[name]

    return get


def _build_line(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("[build] world="))
    return dict(item.split("=") for item in line.split()[1:])


def _assert_same_run(actual: Path, expected: Path) -> float:
    """Same iterations and losses (training and validation) to RTOL; returns the largest relative difference."""
    worst = 0.0
    for losses in (train_losses, eval_losses):
        a, e = losses(actual), losses(expected)
        assert sorted(a) == sorted(e) and a
        for i in e:
            assert math.isfinite(a[i])
            assert a[i] == pytest.approx(e[i], rel=RTOL), f"iteration {i}"
            worst = max(worst, abs(a[i] - e[i]) / abs(e[i]))
    return worst


@pytest.mark.parametrize("kind", list(KINDS))
def test_cp2_logs_the_losses_of_cp1(cp_runs, kind):
    cp2, cp1 = cp_runs(f"{kind}_cp2"), cp_runs(f"{kind}_cp1")
    build = _build_line(cp2["stdout"])
    assert (build["world"], build["TP"], build["CP"], build["DP"], build["spec"]) == ("2", "1", "2", "1", "local")
    assert build["rope"] == kind
    assert build["cpu_speed"] == ("off" if kind == "yarn" else "on")
    assert _build_line(cp1["stdout"])["CP"] == "1"
    assert sorted(train_losses(cp2["save"])) == list(range(1, ITERS + 1))
    _assert_same_run(cp2["save"], cp1["save"])
    stored = read_config(str(cp2["save"]))["run"]
    assert stored["parallel"]["context_parallel_size"] == 2


def test_tp2_cp2_logs_the_losses_of_tp1(cp_runs):
    """4 processes: TP=2 x CP=2 (DP=1) against TP=1, CP=1 (DP=2)."""
    both, reference = cp_runs("resonance_yarn_tp2_cp2"), cp_runs("resonance_yarn_cp1")
    build = _build_line(both["stdout"])
    assert (build["world"], build["TP"], build["CP"], build["DP"]) == ("4", "2", "2", "1")
    _assert_same_run(both["save"], reference["save"])


def test_rope_kinds_reach_the_cp_runs(cp_runs):
    """The three kinds train differently (the comparisons above are not of one model three times)."""
    first = {kind: train_losses(cp_runs(f"{kind}_cp2")["save"])[ITERS] for kind in KINDS}
    values = sorted(first.values())
    assert all(b - a > 1e-3 * b for a, b in zip(values, values[1:])), first
