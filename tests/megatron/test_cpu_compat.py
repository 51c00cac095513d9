"""``cpu_compat``: what megatron-core needs to run on CPU, checked with ``cpu_speed`` off in the ``model_checks``
worker, ``workers/cpu_compat_checks.py`` (the process-wide mode and patches stay out of the pytest process).
Whole models through megatron's own code at every parallel layout: ``test_parallel_equivalence.py``."""

from __future__ import annotations


def test_megatron_s_device_calls_run_on_the_cpu(model_checks):
    record = model_checks["check_cpu_compat"]
    assert record["devices"] == ["cpu"]  # device="cuda", 0, torch.device("cuda"), .to("cuda"), pin_memory
    assert record["cuda_is_identity"]
    # what megatron's optimizer and grad clipping assert of a parameter
    assert record["type_names"] == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.HalfTensor"]


def test_megatron_s_rng_tracker_forks_the_cpu_generator(model_checks):
    assert model_checks["check_cpu_compat"]["rng"] == {"fork_draws_elsewhere": True, "default_stream_restored": True}


def test_megatron_s_linear_runs_its_sequence_parallel_backward(model_checks):
    """megatron's own Function (not cpu_speed's) at TP=1 with sequence parallelism: its backward allocates
    on ``torch.cuda.current_device()`` outside the process-wide mode; the gradients are the plain ones."""
    record = model_checks["check_cpu_compat"]
    assert record["megatron_linear"] == (
        "megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication"
    )
    assert max(record["sequence_parallel_grads"]) < 1e-5, record
