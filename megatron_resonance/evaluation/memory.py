"""Will a forward pass at length L fit? An explicit estimate, checked before any model is loaded.

Forward-only (no autograd), so activations live one layer at a time. Per process::

    weights      params * bytes / (TP * PP)
    hidden       b * L/CP * (6 * hidden + 3 * ffn / TP) * bytes     residual, norm, QKV, context, SwiGLU
    scores       b * heads / TP * L^2 / CP * 4 * 2                  CPU only (torch may pick the math SDPA
                                                                    kernel); GPU kernels (TE, flash) tile it
    logits       b * L/CP * vocab / TP * 4 * 3                      fp32 logits, exp, and the model's copy
    gathered K/V b * L * 2 * kv_hidden / TP * bytes                 context parallelism only (CP > 1)

Available memory is the free GPU memory (``torch.cuda.mem_get_info``), or on CPU the available RAM
(``psutil``) divided by the processes on this node (``LOCAL_WORLD_SIZE``); ``--max-memory-gb`` overrides
it. A length whose estimate exceeds 90 % of that is refused with one line, rather than dying in the OOM
killer an hour into a sweep.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from megatron_resonance.cli import UsageError

HEADROOM = 0.9
GB = 1024**3


@dataclasses.dataclass
class ModelShape:
    """The sizes the estimate needs, from a ``LlamaConfig`` or (``hf.config.model_sizes``) a Hugging Face
    ``config.json``."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def parameters(self) -> int:
        h, kv = self.hidden_size, self.hidden_size // self.num_attention_heads * self.num_query_groups
        layer = h * (h + 2 * kv) + h * h + 3 * h * self.ffn_hidden_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    @classmethod
    def from_llama(cls, cfg) -> "ModelShape":
        return cls(cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
                   cfg.num_query_groups, cfg.vocab_size, cfg.tie_word_embeddings)


def forward_bytes(shape: ModelShape, length: int, *, micro_batch_size: int = 1, tp: int = 1, pp: int = 1,
                  dtype_bytes: int = 4, on_gpu: bool = False, cp: int = 1) -> int:
    """Estimated peak bytes of one process running a forward pass at ``length`` (see the module docstring)."""
    b, L = micro_batch_size, length
    weights = shape.parameters * dtype_bytes / (tp * pp)
    hidden = b * L / cp * (6 * shape.hidden_size + 3 * shape.ffn_hidden_size / tp) * dtype_bytes
    scores = 0 if on_gpu else b * shape.num_attention_heads / tp * L * L / cp * 4 * 2
    logits = b * L / cp * shape.vocab_size / tp * 4 * 3
    kv_hidden = shape.hidden_size // shape.num_attention_heads * shape.num_query_groups
    gathered = b * L * 2 * kv_hidden / tp * dtype_bytes if cp > 1 else 0
    return int(weights + hidden + scores + logits + gathered)


def available_bytes(max_memory_gb: Optional[float] = None) -> int:
    """Memory one process may use: ``max_memory_gb``, free GPU memory, or its share of available RAM."""
    if max_memory_gb is not None:
        return int(max_memory_gb * GB)
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))[0])
    import psutil

    return int(psutil.virtual_memory().available / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def check_fits(name: str, shape: ModelShape, length: int, *, micro_batch_size: int = 1, tp: int = 1,
               pp: int = 1, dtype_bytes: int = 4, max_memory_gb: Optional[float] = None, cp: int = 1) -> None:
    """UsageError (one line) when the estimate at ``length`` exceeds 90 % of the available memory."""
    on_gpu = torch.cuda.is_available()
    need = forward_bytes(shape, length, micro_batch_size=micro_batch_size, tp=tp, pp=pp,
                         dtype_bytes=dtype_bytes, on_gpu=on_gpu, cp=cp)
    have = available_bytes(max_memory_gb)
    if need > HEADROOM * have:
        where = "GPU memory" if on_gpu and max_memory_gb is None else "memory"
        raise UsageError(
            f"length {length} does not fit for {name}: a forward pass needs about {need / GB:.1f} GiB per process "
            f"(micro-batch {micro_batch_size}, TP {tp}, PP {pp}{f', CP {cp}' if cp > 1 else ''}), "
            f"{where} available {have / GB:.1f} GiB; "
            "use shorter --lengths, more tensor/pipeline/context parallelism, or --max-memory-gb"
        )
