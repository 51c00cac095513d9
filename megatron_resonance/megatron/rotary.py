"""Megatron-Core rotary embedding that carries any kind of ``megatron_resonance.rope``.

``ResonanceRotaryEmbedding`` subclasses megatron's ``RotaryEmbedding`` and only changes where the angle
table comes from (``get_freqs_non_repeated``): exact angles from the float64 plan, reduced into
[0, 2*pi). Everything downstream — rotate-half layout, context-parallel slicing, packed sequences, the
unfused apply and TE's fused RoPE (which both consume the angle tensor) — is megatron's own code.

YaRN's attention factor m multiplies cos and sin in Hugging Face; megatron's fused paths do not carry it,
so ``install_rotary`` folds it into ``config.softmax_scale = m^2 / sqrt(head_dim)`` (identical logits).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer import attention

from megatron_resonance.megatron import compat, distributed
from megatron_resonance.megatron.documents import DocumentLayout
from megatron_resonance.rope import RopeConfig, compute_frequencies, rotary_angle_table


@compat.use_get_emb
class ResonanceRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` whose angles come from a ``RopeConfig`` (any kind, resonance or not)."""

    def __init__(
        self,
        rope: RopeConfig,
        rotary_interleaved: bool = False,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        # use_cpu_initialization: megatron would otherwise put its own inv_freq on CUDA at construction.
        super().__init__(
            kv_channels=rope.head_dim,
            rotary_percent=1.0,
            rotary_interleaved=rotary_interleaved,
            rotary_base=rope.base,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        self.rope = rope
        self.frequencies = compute_frequencies(rope)
        # fp32 copy for anyone who reads inv_freq (logging, megatron utilities); angles use float64.
        self.inv_freq = self.frequencies.inv_freq.float()
        self._angle_table: Optional[torch.Tensor] = None  # angles_at's [n, d] rows, the longest asked for

    @property
    def attention_factor(self) -> float:
        return self.frequencies.attention_factor

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """Exact [max_seq_len, d/2] fp32 angles for positions offset .. offset+max_seq_len-1."""
        device = distributed.device()
        return rotary_angle_table(self.frequencies, max_seq_len, offset, device=device)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        # Megatron's get_emb first moves inv_freq to CUDA (fails on CPU); the table is built on the
        # right device by get_freqs_non_repeated instead.
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]

    def angles_at(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[s, b, 1, d] angles for per-token positions ``position_ids`` [b, s] (document masking: positions
        restart at each document): rows of the same exact table, in megatron's layout for q/k [s, b, h, d]
        (the unfused and ``local_ops`` rotary apply broadcast over the batch dimension)."""
        length = int(position_ids.max()) + 1
        table = self._angle_table
        if table is None or table.shape[0] < length or table.device != position_ids.device:
            table = self._angle_table = self.get_emb(length)[:, 0, 0, :].to(position_ids.device)
        return table[position_ids.t()].unsqueeze(2)


def _document_positions(gpt: torch.nn.Module):
    """Forward pre-hook of a GPTModel's decoder: with a ``documents.DocumentLayout`` carrying position ids
    as ``packed_seq_params``, the decoder's rotary angles are taken at those positions (megatron-core's
    rotary ignores ``position_ids``)."""

    def hook(module, args, kwargs):
        layout = kwargs.get("packed_seq_params")
        if not isinstance(layout, DocumentLayout) or layout.position_ids is None:
            return None
        if kwargs.get("rotary_pos_emb") is None:
            return None
        return args, {**kwargs, "rotary_pos_emb": gpt.rotary_pos_emb.angles_at(layout.position_ids)}

    return hook


def softmax_scale_for(rope: RopeConfig) -> Optional[float]:
    """``config.softmax_scale`` carrying the attention factor; None (megatron's default) when m == 1."""
    m = compute_frequencies(rope).attention_factor
    if m == 1.0:
        return None
    return m * m / math.sqrt(rope.head_dim)


def install_rotary(model_chunks: Iterable[torch.nn.Module], rope: RopeConfig) -> None:
    """Replace ``rotary_pos_emb`` on every GPTModel chunk (each PP / virtual-PP chunk has its own), and hook
    each decoder so per-document positions (``documents.DocumentLayout.position_ids``) reach the rotary."""
    for chunk in model_chunks:
        gpt = unwrap(chunk)
        if getattr(gpt, "position_embedding_type", None) != "rope":
            raise ValueError("model was not built with position_embedding_type='rope'")
        old = gpt.rotary_pos_emb
        gpt.rotary_pos_emb = ResonanceRotaryEmbedding(
            rope, rotary_interleaved=old.rotary_interleaved, cp_group=old.cp_group
        )
        scale = softmax_scale_for(rope)
        set_softmax_scale(gpt, scale)
        if not getattr(gpt.decoder, "_document_positions_hook", False):
            gpt.decoder.register_forward_pre_hook(_document_positions(gpt), with_kwargs=True)
            gpt.decoder._document_positions_hook = True


def set_softmax_scale(gpt: torch.nn.Module, scale: Optional[float]) -> None:
    """Set the softmax scale on the config and on every built core-attention module."""
    gpt.config.softmax_scale = scale
    head_dim = gpt.config.kv_channels
    effective = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    for module in gpt.modules():
        if hasattr(module, "softmax_scale") and module is not gpt:
            module.softmax_scale = effective


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


@functools.lru_cache(maxsize=None)
def cached_key_self_attention():
    """megatron's ``SelfAttention`` whose static inference cache holds rotated keys.

    megatron-core 0.16.1's static KV cache stores keys before the rotary and rotates every cached key again
    at every decode step (O(context) work per layer per token; its ``flash_decode`` path, which caches rotated
    keys, needs flash-attn's kernel and drops our softmax scale). This subclass rotates each new key once, at
    its own positions, before megatron stores it, and tells megatron's forward that the keys are rotated.
    The arithmetic is megatron's own ``apply_rotary_pos_emb`` with the arguments its forward passes, so the
    keys are the same numbers; training and dynamic batching take megatron's path unchanged.
    """

    class CachedKeySelfAttention(attention.SelfAttention):
        def _adjust_key_value_for_inference(
            self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
        ):
            if (
                inference_context is None
                or not inference_context.is_static_batching()
                or rotary_pos_emb is None
                or self.config.flash_decode
            ):
                return super()._adjust_key_value_for_inference(
                    inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
                )
            q_pos_emb, k_pos_emb = rotary_pos_emb
            start = inference_context.sequence_len_offset
            key = attention.apply_rotary_pos_emb(
                key,
                k_pos_emb[start : start + key.shape[0]],
                config=self.config,
                cu_seqlens=None,
                mscale=attention._yarn_get_concentration_factor_from_config(self.config),
                cp_group=self.pg_collection.cp,
            )
            query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
            return query, key, value, (rotary_pos_emb[0], None), mask_type, block_table

    return CachedKeySelfAttention
