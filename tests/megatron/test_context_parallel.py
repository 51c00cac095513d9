"""Context parallelism without Transformer Engine: ``SDPAAttention`` at CP=2 (all-gathered K/V, megatron's
load-balanced chunks) computes what CP=1 computes, and so does a whole model for each rope kind.

One torchrun job (``workers/context_parallel.py``, gloo, 2 processes) with the ``cpu_speed`` measures on
(the default); the entry-point tests (``tests/training/test_context_parallel.py``) also run it with them
off.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch import torchrun
from tests.worker_checks import CheckResults

WORKER = Path(__file__).parent / "workers" / "context_parallel.py"
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> CheckResults:
    out = tmp_path_factory.mktemp("context_parallel")
    torchrun(WORKER, out, nproc=2, timeout=300)
    return CheckResults.read(out / "results.json")


def test_attention_output_and_input_gradients_equal_cp1(results):
    """Each rank's 32 of 64 positions (chunks r and 3 - r): output and q/k/v gradients (the K/V gradients
    reduce-scattered back through the all-gather) equal the CP=1 attention's on the full sequence."""
    record = results["attention"]
    assert record["local_shape"] == [32, 2, 4 * 16]
    assert record["reference_is_causal"]
    for name in ("forward", "grad_q", "grad_k", "grad_v"):
        assert record[name] <= RTOL, (name, record[name])


def test_attention_refuses_a_group_of_another_size(results):
    assert results["attention"]["wrong_group_refused"] == ("the context-parallel group has 2 ranks, the config says 4")


@pytest.mark.parametrize("kind", ["rope", "yarn", "resonance_yarn"])
def test_model_logits_and_gradients_equal_cp1(results, kind):
    """Same weights at CP=1 and CP=2: each rank's logits are CP=1's at its positions (so the exact rotary
    angles reach the right positions), and the parameter gradients summed over CP ranks are CP=1's."""
    record = results["models"][kind]
    assert record["num_params"] == 2 + 2 * 6 + 1
    assert record["logits"] <= RTOL, record
    assert record["grads"] <= RTOL, record
    assert results["cpu_speed"] is True
