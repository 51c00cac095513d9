"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local (non-TE) spec.

megatron's local ``DotProductAttention`` materializes the [b*np, sq, sk] score matrix with baddbmm and an
unfused masked softmax, and repeats K/V for GQA. On CPU, torch's SDPA (flash-style kernel, native GQA) is
faster and uses less memory; ``SDPAAttention`` keeps the parent's constructor, sharded state dict and
softmax-scale handling and only replaces the math. Used by the builder when Transformer Engine is absent.

Document masking (``--reset-attention-mask``) arrives as ``packed_seq_params``, a
``documents.DocumentLayout``: then each document attends only to itself (``_document_forward``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_resonance.megatron.documents import DocumentLayout, document_attention


class SDPAAttention(DotProductAttention):
    """Drop-in core attention: [sq, b, np, hn] q, [sk, b, ng, hn] k/v -> [sq, b, np*hn]."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None:
            documents = _document_layout(packed_seq_params)
            if documents is not None:
                return self._document_forward(query, key, value, documents)
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by SDPAAttention")
        attn_mask_type = attn_mask_type or self.attn_mask_type
        sq, b, np_, hn = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        is_causal = False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        elif attn_mask_type == AttnMaskType.causal:
            is_causal = True
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else _null():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, np, sq, hn] -> [sq, b, np*hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _document_forward(self, query, key, value, documents: DocumentLayout) -> torch.Tensor:
        """``--reset-attention-mask``: each document attends only to itself (``documents.document_attention``
        on q [b, np, sq, hn] and k/v in global sequence order)."""
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else _null():
            context = document_attention(q, k, v, documents, scale=self.softmax_scale, dropout_p=dropout)
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def _document_layout(packed_seq_params) -> Optional[DocumentLayout]:
    """The document layout to mask attention by; None for a layout that only resets rotary positions
    (plain causal attention). Megatron's THD packing is TE's."""
    if not isinstance(packed_seq_params, DocumentLayout):
        raise NotImplementedError("packed (THD) sequences need Transformer Engine attention")
    return packed_seq_params if packed_seq_params.masks_documents else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
