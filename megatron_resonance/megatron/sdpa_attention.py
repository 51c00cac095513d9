"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local (non-TE) spec.

megatron's local ``DotProductAttention`` materializes the [b*np, sq, sk] score matrix with baddbmm and an
unfused masked softmax, and repeats K/V for GQA. On CPU, torch's SDPA (flash-style kernel, native GQA) is
faster and uses less memory; ``SDPAAttention`` keeps the parent's constructor, sharded state dict and
softmax-scale handling and only replaces the math. Used by the builder when Transformer Engine is absent.

Document masking (``--reset-attention-mask``) arrives as ``packed_seq_params``, a
``documents.DocumentLayout``: then each document attends only to itself (``_document_forward``).

**Context parallelism** (CP > 1; megatron's local attention refuses it, TE's is the only one it has): the
``all_gather`` scheme of TE's ``cp_comm_type`` and of Llama 3's training. Each CP rank holds megatron's
load-balanced part of the sequence (``get_batch_on_this_cp_rank``: the sequence in 2·CP chunks of
L = s / (2·CP) tokens, rank r holding chunks r and 2·CP−1−r, its rotary angles sliced the same way by
``get_pos_emb_on_this_cp_rank``). K and V (unexpanded GQA heads, after the rotary) are all-gathered over
the CP group in one collective whose backward reduce-scatters their gradients (megatron's
``gather_from_sequence_parallel_region`` on the CP group), put back into sequence order, and each local
query chunk c attends to keys 0 .. (c+1)·L−1: the keys before c·L fully, its own chunk causally. On CPU
that is two flash-kernel calls merged by log-sum-exp (``_ChunkAttention``), with no mask at all;
elsewhere (a GPU without TE, or attention dropout) one SDPA call with an L × (c+1)·L boolean mask (never
s × s; chunk 0 takes SDPA's causal path). Queries and outputs never leave the rank.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_resonance.megatron import _private_torch
from megatron_resonance.megatron.documents import DocumentLayout, document_attention

#: the context-parallel communication scheme SDPAAttention implements (TE's name for it)
CP_COMM_TYPE = "all_gather"


class SDPAAttention(DotProductAttention):
    """Drop-in core attention: [sq, b, np, hn] q, [sk, b, ng, hn] k/v -> [sq, b, np*hn]; with context
    parallelism, sq = sk = this rank's s / CP tokens (see the module docstring)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        cp_size = config.context_parallel_size
        parent_config = config
        if cp_size > 1:
            if cp_comm_type not in (None, CP_COMM_TYPE):
                raise ValueError(f"SDPAAttention runs context parallelism as {CP_COMM_TYPE!r}, not {cp_comm_type!r}")
            if attention_type != "self":
                raise ValueError(f"SDPAAttention runs context parallelism for self-attention, not {attention_type}")
            # megatron's local attention asserts CP == 1 (only TE's runs CP); the CP part is ours
            parent_config = copy.copy(config)
            parent_config.context_parallel_size = 1
        super().__init__(
            parent_config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout,
            softmax_scale,
            cp_comm_type,
            pg_collection,
        )
        self.config = config
        self.cp_group = None
        if cp_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None) or ps.get_context_parallel_group()
            if self.cp_group.size() != cp_size:
                raise ValueError(
                    f"the context-parallel group has {self.cp_group.size()} ranks, the config says {cp_size}"
                )

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
        if self.cp_group is not None and self.cp_group.size() > 1:
            return self._context_parallel(query, key, value, attention_mask, attn_mask_type)
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
        if self.cp_group is not None and self.cp_group.size() > 1:  # keys and values of the whole sequence
            kv = all_gather_sequence(torch.cat([key, value], dim=-1), self.cp_group)
            key, value = kv[..., :hn], kv[..., hn:]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else _null():
            context = document_attention(q, k, v, documents, scale=self.softmax_scale, dropout_p=dropout)
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _context_parallel(self, query, key, value, attention_mask, attn_mask_type):
        """Causal attention of this rank's two query chunks against the all-gathered keys and values."""
        if attention_mask is not None or attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(
                "context parallelism without Transformer Engine runs causal attention without an explicit mask"
            )
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        sq, b, np_, hn = query.shape
        if sq % 2 or key.shape[0] != sq:
            raise ValueError(
                f"context parallelism: {sq} query and {key.shape[0]} key positions on this rank; "
                "expected the same even number (two chunks)"
            )
        chunk = sq // 2
        kv = all_gather_sequence(torch.cat([key, value], dim=-1), self.cp_group)  # [s, b, ng, 2hn], rank order
        kv = kv.permute(1, 2, 0, 3)  # [b, ng, s, 2hn]
        k, v = kv[..., :hn], kv[..., hn:]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        outputs = []
        dropout = self.attention_dropout.p if self.training else 0.0
        merged = q.device.type == "cpu" and not dropout
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else _null():
            for half, c in enumerate((rank, 2 * cp - 1 - rank)):
                q_c = q[:, :, half * chunk : (half + 1) * chunk]
                if merged:  # own chunk causal + earlier chunks unmasked, merged by log-sum-exp: no mask at all
                    own = slice(c * chunk, (c + 1) * chunk)
                    outputs.append(
                        _ChunkAttention.apply(
                            q_c,
                            k[:, :, own],
                            v[:, :, own],
                            k[:, :, : c * chunk] if c else None,
                            v[:, :, : c * chunk] if c else None,
                            self.softmax_scale,
                        )
                    )
                    continue
                visible = (c + 1) * chunk
                mask = None if c == 0 else causal_chunk_mask(chunk, c, q.device)
                outputs.append(
                    F.scaled_dot_product_attention(
                        q_c,
                        k[:, :, :visible],
                        v[:, :, :visible],
                        attn_mask=mask,
                        dropout_p=dropout,
                        is_causal=c == 0,
                        scale=self.softmax_scale,
                        enable_gqa=k.shape[1] != q.shape[1],
                    )
                )
        context = torch.cat(outputs, dim=2)  # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def _document_layout(packed_seq_params) -> Optional[DocumentLayout]:
    """The document layout to mask attention by; None for a layout that only resets rotary positions
    (plain causal attention). Megatron's THD packing is TE's."""
    if not isinstance(packed_seq_params, DocumentLayout):
        raise NotImplementedError("packed (THD) sequences need Transformer Engine attention")
    return packed_seq_params if packed_seq_params.masks_documents else None


def load_balanced_order(cp_size: int, device=None) -> torch.Tensor:
    """Chunk index into the CP all-gather's rank order ([r0: c0, c2cp-1, r1: c1, c2cp-2, ...]) of each
    sequence chunk 0 .. 2·CP−1 (megatron's load-balanced assignment)."""
    order = []
    for c in range(2 * cp_size):
        order.append(2 * c if c < cp_size else 2 * (2 * cp_size - 1 - c) + 1)
    return torch.tensor(order, dtype=torch.long, device=device)


def all_gather_sequence(local: torch.Tensor, cp_group) -> torch.Tensor:
    """[s/CP, ...] load-balanced local part -> [s, ...] in sequence order, over the CP group; the backward
    reduce-scatters the gradient back to each rank's part (megatron's sequence-parallel gather, on the CP
    group, then a chunk permutation)."""
    cp = cp_group.size()
    gathered = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True, group=cp_group)
    chunks = gathered.view(2 * cp, gathered.shape[0] // (2 * cp), *gathered.shape[1:])
    ordered = chunks.index_select(0, load_balanced_order(cp, device=gathered.device))
    return ordered.view(gathered.shape)


class _ChunkAttention(torch.autograd.Function):
    """CPU: a query chunk [b, np, L, hn] against its own keys/values (causal) and, when given, the earlier
    ones (fully visible), [b, ng, *, hn] (GQA native): two flash-kernel calls merged by their log-sum-exp;
    the backward of each part runs from the merged output and log-sum-exp (ring attention's backward), so
    it adds up to the gradient of the one softmax over all the keys. No mask is built or saved."""

    @staticmethod
    def forward(ctx, q, k_own, v_own, k_prev, v_prev, scale):
        out, lse = _private_torch.flash_attention_cpu(q, k_own, v_own, True, scale)
        if k_prev is not None:
            out_prev, lse_prev = _private_torch.flash_attention_cpu(q, k_prev, v_prev, False, scale)
            total = torch.logaddexp(lse, lse_prev)
            out = out * torch.exp(lse - total).unsqueeze(-1) + out_prev * torch.exp(lse_prev - total).unsqueeze(-1)
            lse = total
        ctx.save_for_backward(q, k_own, v_own, k_prev, v_prev, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_own, v_own, k_prev, v_prev, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk_own, dv_own = _private_torch.flash_attention_cpu_backward(
            grad, q, k_own, v_own, out, lse, True, ctx.scale
        )
        dk_prev = dv_prev = None
        if k_prev is not None:
            dq_prev, dk_prev, dv_prev = _private_torch.flash_attention_cpu_backward(
                grad, q, k_prev, v_prev, out, lse, False, ctx.scale
            )
            dq = dq + dq_prev
        return dq, dk_own, dv_own, dk_prev, dv_prev, None


def causal_chunk_mask(chunk: int, c: int, device=None) -> torch.Tensor:
    """[chunk, (c+1)·chunk] boolean SDPA mask (True = attend) of query chunk c against keys 0 .. (c+1)·chunk−1:
    every earlier chunk fully, its own chunk causally."""
    return torch.ones(chunk, (c + 1) * chunk, dtype=torch.bool, device=device).tril_(diagonal=c * chunk)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
