"""The training loop through ``pretrain/pretrain_llama.py`` (2 CPU processes, mock data): it learns, a
stopped-and-resumed run reproduces the uninterrupted one exactly, and TP=2 gives DP=2's losses."""

from __future__ import annotations

import pytest

from tests.training.conftest import ITERS, eval_losses, records, stored_config, train_losses

pytestmark = pytest.mark.slow


def test_loss_goes_down(run_a):
    losses = train_losses(run_a)
    assert sorted(losses) == list(range(1, ITERS + 1))  # --log-interval 1
    first, last = losses[1], losses[ITERS]
    assert first > 5.0  # about ln(256) = 5.55 for a fresh model
    assert last < first - 0.5, losses
    evals = eval_losses(run_a)
    assert sorted(evals) == [5, 10, 15, 20]
    assert evals[20] < evals[5]


def test_metrics_records_have_the_documented_fields(run_a):
    train = [r for r in records(run_a) if "loss" in r]
    for r in train:
        assert {"iteration", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"} <= set(r)
        assert r["consumed_samples"] == 8 * r["iteration"]
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    lrs = {r["iteration"]: r["lr"] for r in train}
    # warm-up over 2 steps to 1e-3, cosine decay to 1e-4 at the last step
    assert lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[ITERS] == pytest.approx(1e-4)


def test_final_checkpoint_and_tracker(run_a):
    assert (run_a / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert sorted(p.name for p in run_a.glob("iter_*")) == [f"iter_{ITERS:07d}"]
    stored = stored_config(run_a / f"iter_{ITERS:07d}")
    assert stored["iteration"] == ITERS
    assert stored["run"]["world_size"] == 2
    assert stored["model"]["hidden_size"] == 64 and stored["model"]["rope"]["kind"] == "rope"


def test_exit_interval_stops_after_saving(run_b):
    first = run_b["after_first"]
    assert first["latest"] == "10"
    assert first["checkpoints"] == ["iter_0000010"]
    assert sorted(first["losses"]) == list(range(1, 11))
    assert "--exit-interval 10 reached at iteration 10" in run_b["first"].stdout
    assert "at iteration 10" in run_b["second"].stdout  # "[build] resumed from ... at iteration 10"


def test_resume_reproduces_the_uninterrupted_run_exactly(run_a, run_b):
    a, b = train_losses(run_a), train_losses(run_b["save"])
    assert sorted(b) == list(range(1, ITERS + 1))
    for i in range(1, ITERS + 1):
        assert b[i] == a[i], f"iteration {i}: resumed {b[i]!r} != uninterrupted {a[i]!r}"
    assert eval_losses(run_b["save"]) == eval_losses(run_a)
    lr_a = {r["iteration"]: r["lr"] for r in records(run_a) if "lr" in r}
    lr_b = {r["iteration"]: r["lr"] for r in records(run_b["save"]) if "lr" in r}
    assert lr_a == lr_b


def test_resumed_metrics_log_each_iteration_once(run_b):
    iterations = [r["iteration"] for r in records(run_b["save"]) if "loss" in r]
    assert iterations == list(range(1, ITERS + 1))
    assert [r["iteration"] for r in records(run_b["save"]) if "eval_loss" in r] == [5, 10, 15, 20]
    assert (run_b["save"] / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)


def test_tensor_parallel_gives_the_data_parallel_losses(run_a, run_tp2):
    """Same global batch of 8: DP=2 runs 2 micro-batches per rank, TP=2 runs 4 on its one DP rank."""
    dp, tp = train_losses(run_a), train_losses(run_tp2)
    assert sorted(tp) == list(range(1, 11))
    for i in range(1, 11):
        assert tp[i] == pytest.approx(dp[i], rel=1e-5), f"iteration {i}"
    for i in (5, 10):
        assert eval_losses(run_tp2)[i] == pytest.approx(eval_losses(run_a)[i], rel=1e-5)
    assert stored_config(run_tp2 / "iter_0000005")["run"]["parallel"]["tensor_model_parallel_size"] == 2
