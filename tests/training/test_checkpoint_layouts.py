"""A checkpoint saved at TP=2 loads at TP=1 (DP=2) and at PP=2: dist_checkpointing reshards the weights,
and the model gives the saving run's numbers.

``run_tp2`` saved at iteration 5 (and evaluated there); ``workers/checks.py`` loads that checkpoint's weights
at each layout into the model the trainer builds, runs the trainer's ``evaluate`` and a forward pass over
the batch of iteration 6, and compares with what the TP=2 run logged.
"""

from __future__ import annotations

import pytest

from tests.training.conftest import RESHARD_LAYOUTS, eval_losses, train_losses

pytestmark = pytest.mark.slow

RTOL = 1e-5  # the layouts sum in different orders (fp32)


@pytest.mark.parametrize("layout", RESHARD_LAYOUTS)
def test_eval_loss_matches_the_saving_run(model_checks, run_tp2, layout):
    r = model_checks["reshard"][layout]
    assert r["iteration"] == 5
    assert r["eval_loss"] == pytest.approx(eval_losses(run_tp2)[5], rel=RTOL)


@pytest.mark.parametrize("layout", RESHARD_LAYOUTS)
def test_next_training_loss_matches_the_saving_run(model_checks, run_tp2, layout):
    """The loss of iteration 6 is computed with the weights saved after iteration 5."""
    r = model_checks["reshard"][layout]
    assert r["next_train_loss"] == pytest.approx(train_losses(run_tp2)[6], rel=RTOL)


def test_layouts_are_what_they_claim(model_checks):
    tp1 = model_checks["reshard"]["tp1_dp2"]
    assert tp1["dp"] == 2 and tp1["num_microbatches"] == 2
    assert tp1["layers_per_rank"] == [[1, 2], [1, 2]]
    pp2 = model_checks["reshard"]["pp2"]
    assert pp2["dp"] == 1 and pp2["num_microbatches"] == 4
    assert pp2["layers_per_rank"] == [[1], [2]]
