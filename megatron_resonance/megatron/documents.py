"""Document masking for packed sequences: attention within each document, rotary positions per document.

Megatron-LM's ``--reset-attention-mask`` and ``--reset-position-ids`` describe a packed sample by its EOD
tokens: a document ends at (and includes) an EOD, the next starts after it. megatron-core builds a dense
[s, s] mask for that (``create_attention_mask``), which TE's causal kernels ignore and which is s² memory;
its rotary ignores ``position_ids``. Here the layout of the documents travels as :class:`DocumentLayout`, a
``PackedSeqParams`` (qkv format ``sbhd``, so megatron's THD branches stay off) that the trainer passes as
``packed_seq_params``:

* ``document_ids`` [b, S]: each token's document (count of EODs before it), over the whole sequence (all
  context-parallel chunks, global order). ``SDPAAttention`` then calls :func:`document_attention`: one
  causal SDPA per run of queries that are contiguous and in one document, against that document's keys
  only. No mask is materialized but a [run, keys] one where a run starts inside its document (a
  context-parallel chunk that begins mid-document).
* ``position_ids`` [b, s]: this rank's tokens' rotary positions (megatron's dataset restarts them after each
  EOD). ``rotary.install_rotary`` hooks the decoder so its rotary angles are the exact table's rows at
  these positions ([s, b, 1, d] instead of megatron's [s, 1, 1, d] for 0..s-1).
* ``query_index`` [s]: the global position of each of this rank's tokens in the sequence (context
  parallelism's load-balanced chunks); None means all of them, in order (CP = 1).

Context parallelism composes through that contract: a CP attention that gathers K/V into global order calls
``document_attention(q_local, k_global, v_global, layout)`` with ``layout.query_index`` set (the trainer sets
it from megatron's ``get_batch_on_this_cp_rank`` layout, :func:`cp_query_index`).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams


@dataclasses.dataclass
class DocumentLayout(PackedSeqParams):
    """Where the documents of a packed micro-batch are; see the module docstring."""

    document_ids: Optional[torch.Tensor] = None
    """[b, S] int: document index of every token of the whole sequence; None: attention crosses documents."""
    position_ids: Optional[torch.Tensor] = None
    """[b, s] int: rotary position of each of this rank's tokens; None: megatron's own 0..s-1."""
    query_index: Optional[torch.Tensor] = None
    """[s] int: global sequence index of each of this rank's tokens; None: 0..S-1 (no context parallelism)."""

    def __post_init__(self):
        self.qkv_format = "sbhd"  # not "thd": megatron's packed (THD) rotary and reshapes stay off
        if self.max_seqlen_q is None:  # the whole sequence's length (all CP ranks)
            length = None
            if self.document_ids is not None:
                length = self.document_ids.shape[1]
            elif self.position_ids is not None and self.query_index is None:
                length = self.position_ids.shape[1]
            self.max_seqlen_q = length
        # megatron's get_rotary_seq_len reads these (its table is replaced where position_ids are given)
        self.max_seqlen_kv = self.max_seqlen_kv or self.max_seqlen_q
        self._runs: Optional[List[List[Tuple[int, int, int, int]]]] = None

    @property
    def masks_documents(self) -> bool:
        return self.document_ids is not None

    def runs(self) -> List[List[Tuple[int, int, int, int]]]:
        """Per sample, the runs ``(lo, hi, key_lo, key_hi)`` of local queries ``lo:hi`` that are contiguous
        in the global sequence and in one document, whose keys are the global positions ``key_lo:key_hi``
        (the document's start up to the run's last query). Computed once per micro-batch (every layer
        shares it)."""
        if self._runs is None:
            self._runs = [_runs(row, self.query_index) for row in self.document_ids.cpu()]
        return self._runs


def document_ids_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] tokens -> [b, s] document index: the number of EODs before each token (an EOD is the last
    token of its document), Megatron-LM's ``reset_attention_mask`` boundaries."""
    is_eod = (tokens == eod).to(torch.int64)
    return torch.cumsum(is_eod, dim=1) - is_eod


def cp_query_index(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global indices of the tokens ``megatron.core.utils.get_batch_on_this_cp_rank`` gives CP rank
    ``cp_rank``: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of ``2*cp_size``."""
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def _runs(document_ids: torch.Tensor, query_index: Optional[torch.Tensor]) -> List[Tuple[int, int, int, int]]:
    total = document_ids.shape[0]
    index = torch.arange(total) if query_index is None else query_index.cpu().to(torch.int64)
    # first global position of every token's document (documents are contiguous)
    new_doc = torch.ones(total, dtype=torch.bool)
    new_doc[1:] = document_ids[1:] != document_ids[:-1]
    starts = torch.where(new_doc, torch.arange(total), torch.zeros(total, dtype=torch.int64))
    doc_start = torch.cummax(starts, dim=0).values
    docs = document_ids[index]
    breaks = torch.ones(len(index), dtype=torch.bool)
    breaks[1:] = (index[1:] != index[:-1] + 1) | (docs[1:] != docs[:-1])
    los = torch.nonzero(breaks).flatten().tolist()
    his = los[1:] + [len(index)]
    key_los = doc_start[index[los]].tolist()
    key_his = (index[torch.tensor(his) - 1] + 1).tolist()
    return list(zip(los, his, key_los, key_his))


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: DocumentLayout,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention that never crosses a document: q [b, hq, s, d] (this rank's queries, at
    ``layout.query_index``), k/v [b, hk, S, d] (every key, global order; hk may divide hq: GQA) ->
    [b, hq, s, d].

    Each run of queries contiguous in one document attends to its document's keys up to itself: one SDPA
    call per run, causal (top-left aligned) where the run starts at its document's start, else with a
    [run, keys] lower-right causal mask. Cost: sum of the documents' squares, not the sequence's."""
    gqa = k.shape[1] != q.shape[1]
    outputs = []
    for b, runs in enumerate(layout.runs()):
        parts = []
        for lo, hi, key_lo, key_hi in runs:
            n_q, n_k = hi - lo, key_hi - key_lo
            mask = None
            if n_q != n_k:  # the run starts after its document's start: lower-right aligned causal
                mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            parts.append(
                F.scaled_dot_product_attention(
                    q[b : b + 1, :, lo:hi],
                    k[b : b + 1, :, key_lo:key_hi],
                    v[b : b + 1, :, key_lo:key_hi],
                    attn_mask=mask,
                    dropout_p=dropout_p,
                    is_causal=mask is None,
                    scale=scale,
                    enable_gqa=gqa,
                )
            )
        outputs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
