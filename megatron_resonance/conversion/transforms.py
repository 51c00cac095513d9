"""Named tensor transforms between Hugging Face LLaMA and Megatron-Core layouts (TP=1, full tensors).

Each transform maps a tuple of Hugging Face tensors to one Megatron tensor and back, exactly (no arithmetic,
only reshapes, concatenations and slices), so a round trip is bit-exact.

* ``copy``: the same tensor on both sides (norms, ``o_proj`` -> ``linear_proj``, ``down_proj`` -> ``linear_fc2``).
* ``qkv``: q/k/v projections -> ``linear_qkv`` packed per query group (GQA):
  ``[q (heads_per_group * head_dim), k (head_dim), v (head_dim)]`` for each of the ``num_query_groups``
  groups. Tensor parallelism then hands each rank whole groups. Hugging Face q/k rows are already in
  rotate-half order, so no row permutation is needed.
* ``gate_up``: ``gate_proj``, ``up_proj`` -> ``linear_fc1 = [gate; up]``. megatron's sharded state dict
  re-chunks this per TP rank into ``[gate_r; up_r]``, so the checkpoint itself stays TP-independent.
* ``vocab``: embedding / output rows padded with zeros to the padded vocabulary, and cut back on export.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from megatron_resonance.megatron.llama import LlamaConfig

Tensors = Tuple[torch.Tensor, ...]


class Transform:
    """Exact conversion of a tuple of Hugging Face tensors to one Megatron tensor and back."""

    name = ""

    def to_megatron(self, hf: Tensors, cfg: LlamaConfig) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, megatron: torch.Tensor, cfg: LlamaConfig) -> Tensors:
        raise NotImplementedError


class Copy(Transform):
    name = "copy"

    def to_megatron(self, hf, cfg):
        (t,) = hf
        return t

    def to_hf(self, megatron, cfg):
        return (megatron,)


class QKV(Transform):
    """q [heads*hd, H], k/v [groups*hd, H] <-> linear_qkv [(heads + 2*groups)*hd, H], grouped per query group."""

    name = "qkv"

    def to_megatron(self, hf, cfg):
        q, k, v = hf
        groups, hidden = cfg.num_query_groups, q.shape[-1]
        return torch.cat(
            [q.reshape(groups, -1, hidden), k.reshape(groups, -1, hidden), v.reshape(groups, -1, hidden)], dim=1
        ).reshape(-1, hidden)

    def to_hf(self, megatron, cfg):
        groups, hd = cfg.num_query_groups, cfg.head_dim
        q_rows = cfg.num_attention_heads // groups * hd
        per_group = megatron.reshape(groups, q_rows + 2 * hd, megatron.shape[-1])
        q, k, v = per_group.split([q_rows, hd, hd], dim=1)
        return tuple(t.reshape(-1, megatron.shape[-1]) for t in (q, k, v))


class GateUp(Transform):
    """gate [F, H], up [F, H] <-> linear_fc1 [2F, H] = [gate; up]."""

    name = "gate_up"

    def to_megatron(self, hf, cfg):
        return torch.cat(hf, dim=0)

    def to_hf(self, megatron, cfg):
        return tuple(megatron.chunk(2, dim=0))


class Vocab(Transform):
    """[vocab, H] <-> [padded vocab, H]: zero rows appended (never looked up; their logits are 0)."""

    name = "vocab"

    def to_megatron(self, hf, cfg):
        (t,) = hf
        pad = cfg.padded_vocab_size() - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t

    def to_hf(self, megatron, cfg):
        return (megatron[: cfg.vocab_size],)


TRANSFORMS: Dict[str, Transform] = {t.name: t for t in (Copy(), QKV(), GateUp(), Vocab())}
