"""Will a forward pass at length L fit? The planner's forward-only estimate (``megatron_resonance.planning``,
one estimate for training and evaluation), checked before any model is loaded; where it does not fit, the
layout where it would.

Per process (no autograd, so activations live one layer at a time)::

    weights      params * bytes / (TP * PP)
    layer        b * L / CP * bytes * (3 * hidden + max(4 * hidden + 3 * kv, 3 * ffn) / TP)
    logits       b * L / CP * vocab / TP * (bytes + 8, + 4 from bf16, + 4 with vocabulary padding)

No L x L score matrix: SDPA's flash kernel (GPU, and CPU for a causal mask without an explicit one) and TE
tile it. Available memory is the free GPU memory (``torch.cuda.mem_get_info``), or on CPU the available RAM
(``psutil``) divided by the processes on this node (``LOCAL_WORLD_SIZE``); ``--max-memory-gb`` overrides
it. A length whose estimate exceeds 90 % of that is refused with one line naming the smallest TP x CP (then
PP) that fits and the command that runs it, rather than dying in the OOM killer an hour into a sweep.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from typing import Callable, Optional, Sequence

import psutil
import torch

from megatron_resonance.errors import UserError
from megatron_resonance.layout_planner import propose_forward
from megatron_resonance.planning import HEADROOM, Layout, ModelShape, forward_estimate

__all__ = ["ModelShape", "forward_bytes", "check_fits", "available_bytes", "DoesNotFit", "HEADROOM", "proposing"]

GB = 1024**3
#: the flags of a layout on the evaluation tools' command line
LAYOUT_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size")


def forward_bytes(shape: ModelShape, length: int, **settings) -> int:
    """Estimated peak bytes of one process running a forward pass at ``length`` (see the module docstring);
    ``settings``: :func:`~megatron_resonance.planning.forward_estimate`'s (micro-batch, TP, PP, CP, dtype
    bytes, padded logits, ``generate``: decoding up to ``length``, with the key/value cache)."""
    return int(forward_estimate(shape, length, **settings).total)


def available_bytes(max_memory_gb: Optional[float] = None, processes: Optional[int] = None) -> int:
    """Memory one process may use: ``max_memory_gb``, free GPU memory, or its share of available RAM among
    ``processes`` on this node (default ``LOCAL_WORLD_SIZE``)."""
    if max_memory_gb is not None:
        return int(max_memory_gb * GB)
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))[0])

    share = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(psutil.virtual_memory().available * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) / max(1, share))


class DoesNotFit(UserError):
    """A length that does not fit; ``layout`` is where it would (None: nowhere up to 64 processes). The
    tools add the command that runs it (:meth:`with_command`)."""

    def __init__(self, message: str, layout: Optional[Layout], hf: bool):
        super().__init__(message)
        self.message, self.layout, self.hf = message, layout, hf

    def with_command(self, prog: str, argv: Sequence[str]) -> str:
        lay = self.layout
        if lay is None:
            return self.message + "; no layout up to 64 processes fits: use shorter --lengths or --max-memory-gb"
        args, skip = [], False
        for a in argv:  # the user's arguments without a layout they gave
            if skip:
                skip = False
                continue
            if a in LAYOUT_FLAGS:
                skip = True
                continue
            if self.hf and args and args[-1] == "--hf":  # the conversion's checkpoint in its place
                args[-1:] = ["--load", "CKPT"]
                continue
            if a.split("=")[0] in LAYOUT_FLAGS:
                continue
            args.append(a)
        layout = [f"--tensor-model-parallel-size {lay.tp}"]
        layout += [f"--pipeline-model-parallel-size {lay.pp}"] if lay.pp > 1 else []
        layout += [f"--context-parallel-size {lay.cp}"] if lay.cp > 1 else []
        where = f"TP={lay.tp} x CP={lay.cp}" + (f" x PP={lay.pp}" if lay.pp > 1 else "")
        command = f"torchrun --nproc-per-node {lay.model_parallel} tools/{prog} {shlex.join(args)} {' '.join(layout)}"
        if self.hf:
            return (
                f"{self.message}; its Megatron conversion (tools/convert_hf_to_megatron.py --save CKPT) fits "
                f"at {where}: {command}"
            )
        return f"{self.message}; fits at {where}: {command}"


def check_fits(
    name: str,
    shape: ModelShape,
    length: int,
    *,
    micro_batch_size: int = 1,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    dtype_bytes: int = 4,
    max_memory_gb: Optional[float] = None,
    hf: bool = False,
    generate: bool = False,
) -> None:
    """DoesNotFit (one line, with the layout that would fit) when the estimate at ``length`` exceeds 90 % of
    the available memory (``generate``: decoding up to ``length``, see ``forward_bytes``)."""
    on_gpu = torch.cuda.is_available()
    fixed = dict(micro_batch_size=micro_batch_size, dtype_bytes=dtype_bytes, padded=not hf, generate=generate)
    need = forward_bytes(shape, length, tp=tp, pp=pp, cp=cp, **fixed)
    have = available_bytes(max_memory_gb)
    if need <= HEADROOM * have:
        return
    where = "GPU memory" if on_gpu and max_memory_gb is None else "memory"
    what = f"generation up to {length} tokens" if generate else f"length {length}"
    message = (
        f"{what} does not fit for {name}: {'it' if generate else 'a forward pass'} needs about "
        f"{need / GB:.1f} GiB per process at TP={tp} x CP={cp}"
        + (f" x PP={pp}" if pp > 1 else "")
        + f" (micro-batch {micro_batch_size}), {where} available {have / GB:.1f} GiB"
    )
    per_process: Callable[[int], float]
    if on_gpu or max_memory_gb is not None:

        def per_process(n: int) -> float:
            return have
    else:  # CPU processes share the node's RAM

        def per_process(n: int) -> float:
            return available_bytes(None, processes=n)

    layout = propose_forward(shape, length, per_process, **fixed)
    raise DoesNotFit(message, layout, hf)


@contextlib.contextmanager
def proposing(prog: str, argv: Optional[Sequence[str]]):
    """Inside an evaluation tool's ``main``: DoesNotFit becomes the one line with the command that fits
    (``argv``: the tool's arguments, default ``sys.argv[1:]``)."""
    try:
        yield
    except DoesNotFit as e:
        raise UserError(e.with_command(prog, sys.argv[1:] if argv is None else argv)) from None
