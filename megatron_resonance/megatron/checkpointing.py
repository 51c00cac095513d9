"""Saving and loading Megatron dist checkpoints (torch_dist) with the model's rope plan, atomic ``latest`` and
exact resume; the directory's layout and its verification: megatron/checkpoint_layout.py.

A save writes ``<dir>/.iter_0000010.partial/``, renames it to ``iter_0000010`` once every rank finished and
``megatron_resonance.json`` is in it, then replaces the tracker atomically: an interrupted or failed save
never leaves an ``iter_*`` behind nor moves ``latest``. One run at a time writes a directory
(megatron/save_lock.py).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pickle
import shutil
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_resonance import atomic
from megatron_resonance.cli import one_line
from megatron_resonance.errors import CheckpointError
from megatron_resonance.megatron import compat, distributed
from megatron_resonance.megatron.checkpoint_layout import (
    CONFIG_FILE,
    TRACKER,
    iteration_dir,
    read_config,
    read_latest_iteration,
    resolve_checkpoint,
    verify_checkpoint,
)
from megatron_resonance.megatron.llama import LlamaConfig

# megatron.core (seconds to import) is imported inside the functions that use it, with torch.distributed.checkpoint and
# megatron.rotary, which import it: the tools' --help and input checks run without it.

FORMAT_VERSION = 1
#: the distributed optimizer's state in model-parameter space, so a run resumes at another TP, PP, VPP or DP
#: (megatron's ``dp_reshardable`` bucket layout reshards over DP only)
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


#: a weight of larger magnitude is no trained value (an exponent bit flipped in a file): loads refuse it
MAX_WEIGHT = 1e19


def peak_magnitudes(tensors: List[torch.Tensor]) -> List[float]:
    """The largest magnitude of each non-empty tensor (NaN if it holds a NaN, inf if an Inf), read back at
    once: from its minimum and maximum, one pass without a copy (an inf-norm is several times slower on CPU
    in bfloat16)."""
    if not tensors:
        return []
    extremes = torch.stack([torch.stack(torch.aminmax(t)).float() for t in tensors])
    return extremes.abs().amax(dim=1).tolist()


def check_finite(model_chunks: List[torch.nn.Module], ckpt: str) -> None:
    """CheckpointError naming the first parameter with non-finite values, or values beyond any trained weight
    (``MAX_WEIGHT``: an exponent bit flipped in a shard), after a load. Every rank learns of a bad rank."""
    named = [
        (name if len(model_chunks) == 1 else f"{name} (model chunk {i})", param.detach())
        for i, chunk in enumerate(model_chunks)
        for name, param in chunk.named_parameters()
        if param.numel()
    ]
    bad = None
    if named:
        peaks = peak_magnitudes([p for _, p in named])
        for (name, _), peak in zip(named, peaks):
            if not math.isfinite(peak) or peak > MAX_WEIGHT:
                what = "non-finite values" if not math.isfinite(peak) else f"a value of magnitude {peak:.3g}"
                bad = f"{ckpt}: parameter {name} holds {what} (a corrupted shard)"
                break
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = distributed.device()
        flag = torch.tensor([1 if bad else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = f"{ckpt}: another rank loaded non-finite or huge parameter values (a corrupted shard)"
    if bad:
        raise CheckpointError(bad)


def _model_sharded_state_dict(model_chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    from megatron_resonance.megatron.rotary import unwrap

    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _rng_sharded_object():
    """Per-rank RNG states (CPU, CUDA, megatron's tracker) as one ShardedObject entry per global rank."""
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng(state: Dict[str, Any]) -> None:
    """Restore the saved RNG states. The CPU generator's state is the same on every machine; the CUDA and
    tracker states are restored only on the kind of device that saved them: a CUDA generator's state is a
    Philox seed and offset, the tracker's on CPU (cpu_compat's) a Mersenne Twister state, and neither
    loads into the other. Across devices the run keeps its own seeds; an exact resume needs the same
    device anyway."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    saved_on_gpu = state.get("cuda") is not None
    if saved_on_gpu != torch.cuda.is_available():
        if dist.get_rank() == 0:
            print(
                f"[checkpoint] RNG state saved on {'GPU' if saved_on_gpu else 'CPU'}, loaded on "
                f"{'CPU' if saved_on_gpu else 'GPU'}: the CUDA and model-parallel generators keep this "
                "run's seeds",
                flush=True,
            )
        return
    if saved_on_gpu:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: List[torch.nn.Module],
    model_config: LlamaConfig,
    *,
    optimizer=None,
    scheduler=None,
    run_config: Optional[Dict[str, Any]] = None,
    train_state: Optional[Dict[str, Any]] = None,
) -> str:
    """Save a complete checkpoint, then point ``latest`` at it. Collective: every rank calls it.

    Raises CheckpointError (on every rank) when it cannot: ``root`` lacks the space the last checkpoint took,
    or a write failed; the partial directory is removed and ``latest`` stays where it was."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    ckpt = iteration_dir(root, iteration)
    partial = os.path.join(root, f".{os.path.basename(ckpt)}.partial")
    problem = None
    if dist.get_rank() == 0:
        problem = _prepare_save(root, partial, iteration)
    raise_on_every_rank(problem)
    meta = {"model": model_config.to_dict(), "run": run_config or {}, "format_version": FORMAT_VERSION}
    try:
        sharded = _model_sharded_state_dict(model_chunks)
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=OPTIMIZER_METADATA)
            sharded["rng_state"] = _rng_sharded_object()
        sharded["megatron_resonance"] = meta
        sharded["iteration"] = iteration
        if scheduler is not None:
            sharded["opt_param_scheduler"] = scheduler.state_dict()
        if train_state is not None:
            sharded["train_state"] = train_state
        compat.in_process_write_results_queue()
        # megatron reports a failed write on every rank (its finalize step broadcasts the failure); a rank
        # that dies makes the others' collectives fail
        dist_checkpointing.save(sharded, partial, content_metadata=OPTIMIZER_METADATA)
    except (Exception, CheckpointException) as e:
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**20
        raise CheckpointError(
            f"saving iteration {iteration} in {root} failed ({free:.1f} MiB free there): {one_line(e)}"
        ) from None
    dist.barrier()
    if dist.get_rank() == 0:
        try:
            record = json.dumps({**meta, "iteration": iteration}, indent=2)
            atomic.write_text(os.path.join(partial, CONFIG_FILE), record)
            if os.path.exists(ckpt):  # the same iteration saved before (a rerun from an earlier checkpoint)
                shutil.rmtree(ckpt)
            os.rename(partial, ckpt)
            atomic.fsync(root)
            atomic.write_text(os.path.join(root, TRACKER), str(iteration))
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            problem = f"saving iteration {iteration} in {root} failed: {e}"
    raise_on_every_rank(problem)
    return ckpt


def _prepare_save(root: str, partial: str, iteration: int) -> Optional[str]:
    """Rank 0 before a save: remove the partial directories of interrupted saves (this run holds ``root``),
    check the space, create ``partial``. Returns what stops the save, or None."""
    for stale in glob.glob(os.path.join(root, ".iter_*.partial")):
        shutil.rmtree(stale, ignore_errors=True)
    latest = read_latest_iteration(root) if os.path.isfile(os.path.join(root, TRACKER)) else None
    previous = iteration_dir(root, latest) if latest is not None else None
    if previous and os.path.isdir(previous):
        need = _dir_size(previous)
        if os.path.exists(iteration_dir(root, iteration)):  # replaced by this save: its space comes back
            need = 0
        free = shutil.disk_usage(root).free
        if free < need:
            return (
                f"not enough space to save iteration {iteration} in {root}: {free / 2**20:.1f} MiB free, "
                f"the last checkpoint took {need / 2**20:.1f} MiB"
            )
    try:
        os.makedirs(partial)
    except OSError as e:
        return f"saving iteration {iteration} in {root} failed: {e}"
    return None


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f))


def raise_on_every_rank(problem: Optional[str]) -> None:
    """Rank 0's verdict (``problem``: None when fine) on every rank, as CheckpointError; a barrier either way."""
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def place_adam_steps(optimizer) -> None:
    """Put torch Adam's per-parameter ``step`` tensors where its kernels read them: on the parameter's
    device for the fused and capturable kernels (CUDA's fused Adam rejects CPU steps), as float32."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if not (group.get("fused") or group.get("capturable")):
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


@contextlib.contextmanager
def _load_errors(ckpt: str):
    """megatron's CheckpointingException, torch DCP's CheckpointException (a BaseException, which
    ``except Exception`` misses) and the unpickling/reading errors of damaged files, as one CheckpointError
    line naming the checkpoint and the cause (:func:`cli.one_line`)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    # RuntimeError, ValueError: torch.load's zip reader, tensors of the wrong size
    except (CheckpointingException, CheckpointException, pickle.UnpicklingError, EOFError, OSError,
            RuntimeError, ValueError) as e:  # fmt: skip
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded ({one_line(e)})") from None


def load_checkpoint(
    path: str,
    model_chunks: List[torch.nn.Module],
    *,
    optimizer=None,
    scheduler=None,
    strict: bool = True,
) -> Dict[str, Any]:
    """Load model (and optimizer, scheduler, RNG when given) from a checkpoint at any TP/PP.

    Returns the common state: ``iteration``, ``train_state``, ``megatron_resonance`` (configs)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    meta = read_config(ckpt)
    sharded = _model_sharded_state_dict(model_chunks)
    same_world = meta.get("run", {}).get("world_size") == dist.get_world_size()
    with _load_errors(ckpt):
        if optimizer is not None:
            compat.ensure_optimizer_state(optimizer)
            # the format the checkpoint was saved in (older checkpoints: dp_reshardable, same layout only)
            metadata = dist_checkpointing.load_content_metadata(ckpt) or OPTIMIZER_METADATA
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
            if same_world:
                sharded["rng_state"] = _rng_sharded_object()
        loaded = dist_checkpointing.load(
            sharded,
            ckpt,
            strict=StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.ASSUME_OK_UNEXPECTED,
        )
    from megatron_resonance.megatron.rotary import unwrap

    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=strict)
    else:
        for i, c in enumerate(model_chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}"], strict=strict)
    if optimizer is not None:
        # fp32 main params are views of leaf parameters; megatron copies in place
        with torch.no_grad(), compat.states_without_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        compat.restore_adam_steps(optimizer)
        place_adam_steps(optimizer)
        if scheduler is not None and "opt_param_scheduler" in loaded:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if "rng_state" in loaded:
            _set_rng(loaded["rng_state"])
    check_finite([unwrap(c) for c in model_chunks], ckpt)  # after the optimizer's copy of the weights
    return {
        "iteration": loaded.get("iteration", meta.get("iteration", 0)),
        "train_state": loaded.get("train_state"),
        "megatron_resonance": meta,
        "path": ckpt,
    }
