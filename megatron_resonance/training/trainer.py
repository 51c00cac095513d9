"""The megatron-core training loop shared by pretraining and context extension.

Reads top to bottom, as megatron-core's ``run_simple_mcore_train_loop.py`` grown up; :func:`run` is
validation (``validation.resolve_and_validate``, which decides the ``start.Start``), then ``build``, then
``loop``:

* build  — distributed init, model (the provider's GPTModel chunks with our rotary) in megatron DDP,
  optimizer, scheduler (``model``), the checkpoint the run starts from, data (``data_loop``) (:func:`build`);
* step   — micro-batches through ``get_forward_backward_func`` (1F1B / interleaved pipeline schedules),
  per-token loss, gradient clipping and the optimizer step inside megatron's optimizer (``step``);
* loop   — iterations with logging (console, TensorBoard, ``<save>/metrics.jsonl``: ``metrics``), evaluation
  and periodic saves until ``--train-iters`` or a stop (:func:`_stop_reason`: SIGTERM/SIGUSR1 from Slurm's
  preemption, ``--exit-interval``); the state is saved where the loop ends (:func:`loop`).

megatron.core is imported where it is used (:func:`build`): it is heavy, and the launcher imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_resonance.errors import CheckpointError, TrainingError
from megatron_resonance.hf import assets as hf_assets
from megatron_resonance.megatron import checkpoint_layout, checkpointing, cpu_speed, distributed, save_lock
from megatron_resonance.megatron.distributed import print_rank0
from megatron_resonance.megatron.llama import resolve_spec
from megatron_resonance.training import flops, preemption
from megatron_resonance.training.config import Config
from megatron_resonance.training.data_loop import build_data, data_iterators, log_documents
from megatron_resonance.training.metrics import LossWindow, MetricsLog, train_log
from megatron_resonance.training.model import build_model_and_optimizer, load_weights_only, use_fused_torch_adam
from megatron_resonance.training.start import LOAD, WEIGHTS, Start
from megatron_resonance.training.step import evaluate, train_step
from megatron_resonance.training.validation import resolve_and_validate

# megatron.core (seconds to import) is imported inside the functions that use it: the entry points' --help and config
# checks run without it.


@dataclasses.dataclass
class TrainState:
    """What, besides weights and optimizer, a resume needs: the step and the data position."""

    iteration: int = 0
    consumed_train_samples: int = 0


# ==========================================================================================================
# Signals
# ==========================================================================================================


class SignalFlag:
    """SIGTERM/SIGUSR1, recorded from the process start (``preemption``); every rank learns of one at the same
    point through an all-reduce. A torchrun worker whose launcher died (SIGKILL) counts that as SIGTERM: it
    saves and exits instead of training on as an orphan next to a rerun."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        if enabled:
            preemption.install()  # the entry points did already; keeps what they recorded
        else:
            for sig in preemption.SAVE_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            if preemption.received() is not None:  # came before this run asked for the default
                os.kill(os.getpid(), preemption.received())

    @property
    def received(self) -> Optional[int]:
        if not self.enabled:
            return None
        if preemption.received() is None and self.parent is not None and os.getppid() != self.parent:
            return signal.SIGTERM
        return preemption.received()

    def what(self) -> str:
        """How the stop was asked for, on this rank (for the log line)."""
        return "the launcher is gone" if self.received is not None and preemption.received() is None else "received"

    def any_rank(self) -> bool:
        device = distributed.device()
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ==========================================================================================================
# The run
# ==========================================================================================================


def run(cfg: Config) -> TrainState:
    """Train as configured: resume from ``<save>`` if it holds a checkpoint, else start from ``--load``
    (full state, or weights only with ``finetune``), else from scratch. Returns the final state."""
    start = resolve_and_validate(cfg, distributed.world_size_from_env())
    p = cfg.parallel
    distributed.initialize(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
        p.context_parallel_size,
        seed=cfg.training.seed,
        timeout_minutes=p.distributed_timeout_minutes,
    )
    signals = SignalFlag(cfg.checkpoint.exit_on_signal)
    try:
        with save_lock.hold_save_dir(cfg.checkpoint.save):
            if signals.any_rank():  # nothing trained yet: nothing to save
                print_rank0("[signal] received before training started: nothing new to save, exiting")
                return TrainState()
            job = build(cfg, start)
            if signals.any_rank():  # during the build: the checkpoint loaded is still the latest
                print_rank0(
                    f"[signal] received before iteration {job.state.iteration + 1}: nothing new to save, exiting"
                )
                return job.state
            return loop(cfg, job, signals)
    except RuntimeError as e:
        if "Timed out" not in str(e) and "timed out" not in str(e):  # gloo's and NCCL's collective timeouts
            raise
        raise TrainingError(
            f"a collective waited longer than --distributed-timeout-minutes {p.distributed_timeout_minutes:g} for "
            f"another rank (hung, stopped or gone): stopped without saving; {latest_note(cfg.checkpoint.save)}"
        ) from None


@dataclasses.dataclass
class Job:
    """What :func:`build` makes and :func:`loop` trains: the model chunks (in megatron DDP), optimizer,
    scheduler, the state to continue from, the data and the schedule's function."""

    chunks: list
    optimizer: Any
    scheduler: Any
    state: TrainState
    last_saved: Optional[int]
    """The iteration whose checkpoint ``--save`` holds already (a resumed run), else None."""
    train_iterator: Any
    valid_dataset: Any
    forward_backward: Any
    num_microbatches: int

    def save(self, cfg: Config) -> None:
        """Checkpoint the current state to ``--save`` (if given); TrainingError with one line if it fails."""
        save = cfg.checkpoint.save
        if not save or self.last_saved == self.state.iteration:
            return
        try:
            checkpointing.save_checkpoint(
                save,
                self.state.iteration,
                self.chunks,
                cfg.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                run_config={**cfg.to_dict(), "world_size": dist.get_world_size()},
                train_state=dataclasses.asdict(self.state),
            )
        except CheckpointError as e:
            raise TrainingError(f"{e}; {latest_note(save)}") from None
        self.last_saved = iteration = self.state.iteration
        print_rank0(f"[save] iteration {iteration} -> {checkpoint_layout.iteration_dir(save, iteration)}")


def build(cfg: Config, start: Start) -> Job:
    """Model, optimizer and scheduler; the checkpoint ``start`` names loaded; the data (process groups exist)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    p = cfg.parallel
    bf16 = cfg.training.bf16 if cfg.training.bf16 is not None else torch.cuda.is_available()
    dp = ps.get_data_parallel_world_size()
    num_microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    print_rank0(
        f"[build] world={dist.get_world_size()} TP={p.tensor_model_parallel_size} "
        f"PP={p.pipeline_model_parallel_size} VPP={p.virtual_pipeline_model_parallel_size or 1} "
        f"CP={p.context_parallel_size} DP={dp} micro-batches={num_microbatches} "
        f"dtype={'bf16' if bf16 else 'fp32'} spec={resolve_spec(p.transformer_impl)} rope={cfg.model.rope.kind}"
        + (
            ""
            if torch.cuda.is_available()
            else f" cpu_speed={'on' if cpu_speed.is_enabled() else 'off'} threads={torch.get_num_threads()}"
        )
    )

    # ---------------------------------------------------------------- build: model, optimizer, scheduler
    chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16)
    n_params = sum(prm.numel() for c in chunks for prm in c.parameters())
    print_rank0(f"[build] parameters on rank 0: {n_params / 1e6:.2f} M")

    # ---------------------------------------------------------------- build: checkpoint
    state = TrainState()
    save = cfg.checkpoint.save
    # RESUME: our own run was interrupted: continue it (Slurm requeue), from the newest complete checkpoint
    if start.warning:
        print_rank0(start.warning, file=sys.stderr)
    if start.full_state:
        info = checkpointing.load_checkpoint(start.checkpoint, chunks, optimizer=optimizer, scheduler=scheduler)
        use_fused_torch_adam(optimizer)
        state = TrainState(**(info["train_state"] or {"iteration": info["iteration"]}))
        print_rank0(f"[build] resumed from {info['path']} at iteration {state.iteration}")
    elif start.how == WEIGHTS:
        info = load_weights_only(start.checkpoint, chunks, optimizer)
        print_rank0(f"[build] loaded model weights from {info['path']} (finetune: fresh optimizer and count)")
    if start.how in (LOAD, WEIGHTS) and save and distributed.is_rank0():
        # the source's Hugging Face files (tokenizer, token ids) go on with the weights trained from them
        kept = hf_assets.carry_assets(cfg.checkpoint.load, info["path"], save)
        if kept:
            print_rank0(f"[build] kept the source's Hugging Face files (tokenizer, config) in {kept}")

    # ---------------------------------------------------------------- build: data
    iters = cfg.training.train_iters
    gbs = cfg.data.global_batch_size
    valid_samples = gbs * cfg.training.eval_iters * (iters // max(cfg.training.eval_interval, 1) + 1)
    train_ds, valid_ds = build_data(cfg, train_samples=iters * gbs, valid_samples=valid_samples)
    log_documents(cfg, train_ds, state.consumed_train_samples)
    train_iterator = data_iterators(train_ds, state.consumed_train_samples, cfg.data.micro_batch_size, len(chunks))
    if save and distributed.is_rank0():
        os.makedirs(save, exist_ok=True)
    return Job(
        chunks,
        optimizer,
        scheduler,
        state,
        state.iteration if start.full_state else None,
        train_iterator,
        valid_ds,
        get_forward_backward_func(),
        num_microbatches,
    )


def loop(cfg: Config, job: Job, signals: SignalFlag) -> TrainState:
    """Steps until ``--train-iters`` or a stop (a signal, ``--exit-interval``), with logging, evaluation and
    periodic saves; the state is saved where the loop ends. Returns the final state."""
    state, iters, gbs = job.state, cfg.training.train_iters, cfg.data.global_batch_size
    metrics = MetricsLog(cfg, state.iteration)
    flops_per_token = flops.training_flops_per_token(cfg.model, cfg.data.seq_length)
    peak = flops.peak_tflops()
    window = LossWindow()
    while state.iteration < iters:
        # ------------------------------------------------------------ step
        step_start = time.perf_counter()
        loss, grad_norm, update_ok = train_step(
            job.forward_backward,
            job.train_iterator,
            job.chunks,
            job.optimizer,
            job.scheduler,
            cfg,
            job.num_microbatches,
        )
        seconds = time.perf_counter() - step_start
        poison = _non_finite(loss, grad_norm if update_ok else None)
        if poison:
            raise TrainingError(
                f"{poison} at iteration {state.iteration + 1}: stopped without saving"
                + (f"; {latest_note(cfg.checkpoint.save)}" if cfg.checkpoint.save else "")
            )
        state.iteration += 1
        state.consumed_train_samples += gbs
        window.add(loss, seconds)

        # ------------------------------------------------------------ log, evaluate
        if state.iteration % cfg.logging.log_interval == 0 or state.iteration == iters:
            lr = job.scheduler.get_lr(job.optimizer.param_groups[0])
            record, line = train_log(
                cfg,
                state.iteration,
                window,
                lr,
                grad_norm,
                state.consumed_train_samples,
                update_ok,
                flops_per_token,
                peak,
            )
            print_rank0(line)
            metrics.write(record)
            window.reset()
        if cfg.training.eval_interval and state.iteration % cfg.training.eval_interval == 0:
            _log_eval(job, cfg, metrics)

        # ------------------------------------------------------------ stop or save
        stop = _stop_reason(cfg, state, signals)
        if stop:
            print_rank0(stop)
            break
        if cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
            job.save(cfg)
    else:  # trained to --train-iters: a last evaluation unless one just ran
        if not cfg.training.eval_interval or iters % cfg.training.eval_interval:
            _log_eval(job, cfg, metrics)
    job.save(cfg)
    metrics.close()
    return state


def _stop_reason(cfg: Config, state: TrainState, signals: SignalFlag) -> Optional[str]:
    """The one place that decides to stop before ``--train-iters``: the line to print, or None to go on."""
    if signals.any_rank():
        return f"[signal] {signals.what()} at iteration {state.iteration}: saving and exiting"
    interval = cfg.training.exit_interval
    if interval and state.iteration % interval == 0 and state.iteration < cfg.training.train_iters:
        return f"[exit] --exit-interval {interval} reached at iteration {state.iteration}"
    return None


def _non_finite(loss: Optional[float], grad_norm) -> Optional[str]:
    """What is not finite of a step's loss and gradient norm (None: both fine). Checked before anything is
    logged or saved, as Megatron-LM's ``check_for_nan_in_loss_and_grad``."""
    if loss is not None and not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        return f"non-finite gradient norm ({float(grad_norm)})"
    return None


def latest_note(save: Optional[str]) -> str:
    """What stays of a run that stops without saving: the latest checkpoint in ``save``."""
    if not save:
        return "nothing to keep (no --save)"
    iteration = checkpoint_layout.read_latest_iteration(save)
    if iteration is None:
        return f"{save} holds no checkpoint yet"
    return f"the latest checkpoint in {save} is still iteration {iteration}"


def _log_eval(job: Job, cfg: Config, metrics: MetricsLog) -> None:
    if cfg.training.eval_iters <= 0:
        return
    loss = evaluate(job.forward_backward, job.valid_dataset, job.chunks, cfg, job.num_microbatches)
    if loss is None:
        return
    ppl = math.exp(min(loss, 50))
    print_rank0(f"[eval]  iter {job.state.iteration:>6} | validation loss {loss:.4f} | perplexity {ppl:.2f}")
    metrics.write({"iteration": job.state.iteration, "eval_loss": loss, "eval_perplexity": ppl})
