"""Per-token scores of a token batch: the reusable forward of every evaluation (and of ``make demo``).

``megatron_token_scores(model_chunks, tokens, vocab_size=...)`` runs Megatron GPTModel chunks (any TP, PP,
virtual PP) through megatron's ``get_forward_backward_func()`` with ``forward_only=True``;
``hf_token_scores(model, tokens)`` runs a Hugging Face causal LM. Both return :class:`TokenScores` for the
``L - 1`` next-token predictions of an ``[B, L]`` batch: the negative log-likelihood of ``tokens[:, 1:]``
and whether each target is the greedy (arg-max) choice.

The softmax runs over the model's *real* vocabulary: Megatron pads the embedding table for TP (to a
multiple of 128), and megatron's own cross entropy normalizes over those padding rows too. Excluding them
is what makes a Megatron checkpoint and its Hugging Face export (which has no padding) score the same.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_resonance.megatron.compat import batch_on_this_cp_rank
from megatron_resonance.megatron.distributed import device as rank_device

# megatron.core (seconds to import) is imported inside the functions that use it: the evaluation tools' --help and
# input checks run without it.


@dataclasses.dataclass
class TokenScores:
    """Scores of the ``L - 1`` predictions of an ``[B, L]`` batch (prediction j is of token j + 1)."""

    nll: torch.Tensor
    """[B, L-1] float32: -log p(tokens[:, j+1] | tokens[:, :j+1])."""
    greedy: torch.Tensor
    """[B, L-1] bool: the target is the arg-max of the prediction (what greedy decoding would emit)."""


def real_vocabulary(logits: torch.Tensor, vocab_size: Optional[int], *, vocab_start: int = 0) -> torch.Tensor:
    """``logits`` ``[..., V_shard]`` (ids ``vocab_start ..``) with the ids at or above ``vocab_size`` (TP
    padding rows of the embedding table) at -inf, so no softmax or arg-max chooses them."""
    shard = logits.shape[-1]
    if vocab_size is None or vocab_start + shard <= vocab_size:
        return logits
    padding = torch.arange(vocab_start, vocab_start + shard, device=logits.device) >= vocab_size
    return logits.masked_fill(padding, float("-inf"))


def vocab_parallel_scores(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: Optional[int] = None,
    *,
    vocab_start: int = 0,
    group=None,
) -> TokenScores:
    """NLL and greedy match from logits split over the vocabulary (one shard per TP rank).

    Args:
        logits: ``[..., V_shard]`` this rank's slice of the logits, ids ``vocab_start .. vocab_start+V_shard-1``.
        targets: ``[...]`` target ids (global).
        vocab_size: the real vocabulary; ids at or above it (TP padding) are left out of the softmax.
        group: the tensor-parallel process group (None: the logits are the whole vocabulary).
    """
    logits = real_vocabulary(logits.float(), vocab_size, vocab_start=vocab_start)
    shard = logits.shape[-1]
    parallel = group is not None and dist.get_world_size(group) > 1
    top = logits.max(dim=-1).values
    if parallel:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - top.unsqueeze(-1)).sum(dim=-1)
    local = targets - vocab_start
    here = (local >= 0) & (local < shard)
    target_logit = logits.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(here, target_logit, torch.zeros_like(target_logit))
    if parallel:
        dist.all_reduce(sum_exp, group=group)
        dist.all_reduce(target_logit, group=group)
    nll = torch.log(sum_exp) + top - target_logit
    return TokenScores(nll=nll, greedy=target_logit >= top)


# ----------------------------------------------------------------------------------------------------------
# Megatron: model chunks (any TP / PP / VPP) through megatron's pipeline schedules
# ----------------------------------------------------------------------------------------------------------


def megatron_logit_scores(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> TokenScores:
    """Scores from a GPTModel's output on this rank (``[B, S, V / TP]``, this TP rank's vocabulary slice)
    over the real vocabulary: what the trainer's validation loss and the evaluation tools both compute."""
    from megatron.core import parallel_state as ps

    shard = logits.shape[-1]
    return vocab_parallel_scores(
        logits,
        targets,
        vocab_size,
        vocab_start=ps.get_tensor_model_parallel_rank() * shard,
        group=ps.get_tensor_model_parallel_group(),
    )


def _scores_func(
    targets: torch.Tensor,
    vocab_size: int,
    logits: torch.Tensor,
    non_loss_data: bool = False,
    every_position: bool = False,
):
    """The schedule's loss function on the last stage: keep the scores instead of a loss (of every
    position but the last, or with ``every_position`` of all: context parallelism's part of the sequence)."""
    scores = megatron_logit_scores(logits if every_position else logits[:, :-1], targets, vocab_size)
    return torch.stack([scores.nll, scores.greedy.float()])


def _forward_step(data_iterator, model, vocab_size: int):
    batch = next(data_iterator)
    if "targets" in batch:  # context parallelism: this rank's chunks of the sequence and of its targets
        batch = batch_on_this_cp_rank(dict(batch))
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, functools.partial(_scores_func, batch["targets"], vocab_size, every_position=True)
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, functools.partial(_scores_func, batch["tokens"][:, 1:], vocab_size)


def _gather_context_parallel(local: torch.Tensor, length: int) -> torch.Tensor:
    """[..., L / CP] scores of this rank's load-balanced chunks -> [..., L - 1] in sequence order (the last
    position, which predicts nothing, dropped), on every CP rank."""
    from megatron.core import parallel_state as ps

    from megatron_resonance.megatron.sdpa_attention import load_balanced_order

    cp = ps.get_context_parallel_world_size()
    moved = local.movedim(-1, 0).contiguous()  # [L / CP, ...]
    gathered = torch.empty((cp * moved.shape[0], *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
    dist.all_gather_into_tensor(gathered, moved, group=ps.get_context_parallel_group())
    chunks = gathered.view(2 * cp, length // (2 * cp), *moved.shape[1:])
    ordered = chunks.index_select(0, load_balanced_order(cp, device=chunks.device)).reshape(gathered.shape)
    return ordered.movedim(0, -1)[..., : length - 1]


@torch.no_grad()
def megatron_token_scores(
    model_chunks: List[torch.nn.Module],
    tokens: torch.Tensor,
    *,
    vocab_size: int,
    micro_batch_size: int = 1,
) -> TokenScores:
    """Per-token scores of ``tokens`` ([B, L] ids) under Megatron GPTModel chunks built for this rank.

    Collective over the model-parallel group (every TP and PP rank of a replica calls it with the same
    tokens); each rank gets the full result (the last pipeline stage broadcasts it; with context
    parallelism, ``length`` divisible by 2 x CP, each CP rank scores its load-balanced part of the sequence
    and the parts are gathered back into order). Data-parallel
    replicas are independent: give each its own rows. Needs megatron's ``parallel_state`` initialized
    (``megatron_resonance.megatron.distributed.initialize``) and the chunks in eval mode.

    The batch is cut into ``micro_batch_size`` rows per micro-batch (the last one padded by repeating a
    row) and run through ``get_forward_backward_func()`` with ``forward_only=True``, so pipeline and
    interleaved schedules work. ``vocab_size`` is the real vocabulary (TP padding rows are excluded).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, length >= 2], got {tuple(tokens.shape)}")

    device = rank_device()
    rows, length = tokens.shape
    mbs = max(1, min(micro_batch_size, rows))
    count = -(-rows // mbs)
    padded = torch.cat([tokens, tokens[-1:].expand(count * mbs - rows, length)]) if count * mbs > rows else tokens
    padded = padded.to(device=device, dtype=torch.long)
    positions = torch.arange(length, device=device).unsqueeze(0).expand(mbs, length)
    batches = [{"tokens": padded[i * mbs : (i + 1) * mbs], "position_ids": positions} for i in range(count)]
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        if length % (2 * cp):
            raise ValueError(f"length {length} is not divisible by 2 x context-parallel-size = {2 * cp}")
        # every position's target (the last one's is a placeholder, dropped after the gather)
        targets = torch.cat([padded[:, 1:], padded[:, -1:]], dim=1)
        for i, batch in enumerate(batches):
            batch["targets"] = targets[i * mbs : (i + 1) * mbs]
    collected = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, vocab_size=vocab_size),
        # one iterator per virtual-pipeline chunk: each chunk reads every micro-batch
        data_iterator=[iter(batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(batches),
        model=model_chunks,
        num_microbatches=count,
        seq_length=length,
        micro_batch_size=mbs,
        forward_only=True,
        collect_non_loss_data=True,
    )
    scored = length if cp > 1 else length - 1  # positions scored on this rank: its part, or all but the last
    result = torch.empty(2, count * mbs, scored // cp, dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        result.copy_(torch.cat(list(collected), dim=1))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            result, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    if cp > 1:
        result = _gather_context_parallel(result, length)
    result = result[:, :rows].cpu()
    return TokenScores(nll=result[0], greedy=result[1] > 0.5)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_token_scores(model: torch.nn.Module, tokens: torch.Tensor, *, vocab_size: Optional[int] = None) -> TokenScores:
    """Per-token scores of ``tokens`` ([B, L] ids) under a Hugging Face causal LM (``model(ids).logits``)."""
    device = next(model.parameters()).device
    logits = model(tokens.to(device=device, dtype=torch.long)).logits
    scores = vocab_parallel_scores(logits[:, :-1], tokens[:, 1:].to(device), vocab_size)
    return TokenScores(nll=scores.nll.cpu(), greedy=scores.greedy.cpu())
