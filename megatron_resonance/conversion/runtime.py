"""What both converters share at run time: a single-process megatron context, the TP=1 model, the report."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_resonance.cli import library_warnings_quiet
from megatron_resonance.errors import ConversionError
from megatron_resonance.megatron import distributed, llama
from megatron_resonance.megatron.llama import LlamaConfig


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """megatron's groups at TP=1, PP=1 in this process (gloo + cpu_compat without CUDA); torn down after.

    The converters are single-process programs: inside a multi-rank job they refuse rather than have every
    rank write the same files."""
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ConversionError("the converters run as one process; this process belongs to a multi-rank job")
    with library_warnings_quiet():
        distributed.initialize(1, 1)
        try:
            yield
        finally:
            distributed.destroy()


def build_tp1_model(cfg: LlamaConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The full (TP=1, PP=1) GPTModel on CPU, parameters allocated but not initialized: all get overwritten."""
    (model,) = llama.build_model(cfg, dtype=dtype, spec="local", initialize=False, device="cpu")
    return model


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did and how fast."""

    source: str
    destination: str
    tensors: int
    bytes: int
    """Bytes of weights read (import: the Hugging Face tensors) or written (export)."""
    seconds: float
    """Wall time of the whole conversion."""
    setup_seconds: float = 0.0
    """Part of ``seconds`` spent before the first weight moved (imports, process group, model allocation)."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (
            f"{self.source} -> {self.destination}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in "
            f"{self.seconds:.2f} s ({self.gb_per_s:.2f} GB/s; setup {self.setup_seconds:.1f} s of it)"
        )


def use_single_process_env() -> None:
    """For the tools: this process is the whole job, whatever launcher variables it inherited (an ``srun``
    step or a torchrun shell would otherwise make it wait for ranks that never come)."""
    for key in ("SLURM_PROCID", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
