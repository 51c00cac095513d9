"""The tiny LLaMA the tests build in-process (workers, fixtures): its config, the trainer's config around
it, and a micro-batch in the trainer's format.

``tiny_llama()`` is 2 layers, width 128 (head dim 32), GQA 4:2, a 256-token vocabulary, 64 positions;
a test changes what it measures through the fields (``tiny_llama("yarn", hidden_size=64)``). (The
entry-point tests give their tiny model as flags: ``TINY_MODEL`` in ``tests/training/conftest.py``.)
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from megatron_resonance.megatron.llama import LlamaConfig
from megatron_resonance.rope import RopeConfig
from megatron_resonance.training.config import Config, DataConfig, OptimizerConfig

TINY = {
    "num_layers": 2,
    "hidden_size": 128,
    "ffn_hidden_size": 256,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "vocab_size": 256,
    "max_position_embeddings": 64,
}
#: the context extension of every non-``rope`` kind
FACTOR = 4.0


def tiny_llama(
    rope: Union[str, RopeConfig] = "rope", original_max_position: Optional[int] = None, **fields
) -> LlamaConfig:
    """``TINY`` with ``fields`` replaced. ``rope`` is a RopeConfig or a kind: plain ``rope`` at the default
    base, any other kind extended ``FACTOR`` times from ``original_max_position`` (default: the model's
    ``max_position_embeddings / FACTOR``, so that the extension ends at the model's length). The rotary's
    head dim is the model's."""
    cfg = {**TINY, **fields}
    if isinstance(rope, str):
        if rope == "rope":
            rope = RopeConfig(kind="rope")
        else:
            original = original_max_position or int(cfg["max_position_embeddings"] // FACTOR)
            rope = RopeConfig(kind=rope, factor=FACTOR, original_max_position=original)
    return LlamaConfig(**cfg, rope=rope)


def training_config(model: LlamaConfig, iters: int, batch: int = 2, **optimizer) -> Config:
    """The trainer's config for ``model`` on mock data: sequences of the model's length, micro-batch = global
    batch = ``batch``, ``iters`` iterations, constant learning rate ``optimizer["lr"]``."""
    cfg = Config(
        model=model,
        data=DataConfig(
            seq_length=model.max_position_embeddings, micro_batch_size=batch, global_batch_size=batch, mock_data=True
        ),
        optimizer=OptimizerConfig(min_lr=optimizer["lr"], lr_decay_style="constant", **optimizer),
    )
    cfg.training.train_iters = iters
    return cfg


def train_batch(model: LlamaConfig, batch: int = 2, seed: int = 3) -> dict:
    """One micro-batch of ``batch`` random sequences of the model's length, in the trainer's format."""
    seq = model.max_position_embeddings
    tokens = torch.randint(0, model.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(batch, seq),
        "position_ids": torch.arange(seq).expand(batch, seq),
    }
