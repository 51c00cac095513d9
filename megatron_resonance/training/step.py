"""One training step and the validation loss: micro-batches through megatron's schedule
(``get_forward_backward_func``: 1F1B / interleaved pipelining), the per-token loss, the optimizer step.
Also PosGen's step (``posgen/cell.py``).

megatron.core (and what imports it) is imported where it is used: it is heavy, and PosGen's cells import
this module before they build a model.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_resonance.evaluation.scoring import megatron_logit_scores
from megatron_resonance.megatron import compat, cpu_speed, distributed
from megatron_resonance.training.config import Config
from megatron_resonance.training.data_loop import data_iterators


def forward_step(
    data_iterator,
    model,
    cp_size: int = 1,
    sequence_parallel: bool = False,
    score_vocab: Optional[int] = None,
    reset_position_ids: bool = False,
):
    """One micro-batch: returns the per-token losses and the function megatron reduces them with.

    Training takes megatron's fused vocab-parallel cross entropy (over the padded vocabulary, as
    Megatron-LM). Evaluation (``score_vocab``: the real vocabulary size) scores the logits over the real
    vocabulary only, the evaluation tools' definition, so a checkpoint has one validation perplexity.

    Document masking goes to the model as ``packed_seq_params`` (:func:`document_layout`): the batch's
    ``document_ids`` (``--reset-attention-mask``) and, with ``reset_position_ids``, its position ids."""
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    document_ids = batch.pop("document_ids", None)  # whole sequence: keys of every CP rank
    if cp_size > 1:
        batch = compat.batch_on_this_cp_rank(batch)
    layout = document_layout(batch, document_ids, reset_position_ids, cp_size)
    # With cpu_speed on, the model runs without cpu_compat's device mode (a Python hook on every torch
    # call): megatron's forward allocates on the device only for context parallelism (rotary slicing) and
    # sequence parallelism (gather buffers), which keep it.
    device_free = cp_size == 1 and not sequence_parallel
    labels = None if score_vocab else batch["labels"]
    with cpu_speed.suspended() if device_free else contextlib.nullcontext():
        output = model(batch["tokens"], batch["position_ids"], None, labels=labels, packed_seq_params=layout)
    if score_vocab:
        return output, functools.partial(_real_vocab_loss, batch["labels"], batch["loss_mask"], score_vocab)
    return output, functools.partial(loss_func, batch["loss_mask"])


def document_layout(
    batch: Dict[str, torch.Tensor], document_ids: Optional[torch.Tensor], reset_position_ids: bool, cp_size: int = 1
):
    """The ``DocumentLayout`` of a micro-batch (this CP rank's part of it), or None without document masking:
    ``document_ids`` [b, S] of the whole sequence, this rank's ``position_ids`` when they restart per
    document, and under context parallelism the global index of this rank's tokens."""
    if document_ids is None and not reset_position_ids:
        return None
    from megatron.core import parallel_state as ps

    from megatron_resonance.megatron.documents import DocumentLayout, cp_query_index

    query_index = None
    if cp_size > 1 and document_ids is not None:
        query_index = cp_query_index(
            document_ids.shape[1], cp_size, ps.get_context_parallel_rank(), device=document_ids.device
        )
    length = batch["tokens"].shape[1] * cp_size
    return DocumentLayout(
        document_ids=document_ids,
        query_index=query_index,
        max_seqlen_q=length,
        position_ids=batch["position_ids"] if reset_position_ids else None,
    )


def _schedule(forward_backward, data_iterator, chunks, cfg: Config, num_microbatches: int, evaluation: bool = False):
    """The loss dicts of megatron's schedule over ``num_microbatches`` micro-batches: forward and backward, or
    forward only for ``evaluation``."""
    return forward_backward(
        forward_step_func=_forward_step_func(cfg, evaluation),
        data_iterator=data_iterator,
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.data.micro_batch_size,
        forward_only=evaluation,
    )


def _forward_step_func(cfg: Config, evaluation: bool = False):
    return functools.partial(
        forward_step,
        cp_size=cfg.parallel.context_parallel_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        score_vocab=cfg.model.vocab_size if evaluation else None,
        reset_position_ids=cfg.data.reset_position_ids,
    )


def _real_vocab_loss(labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int, logits: torch.Tensor):
    """``loss_func`` of the logits' token losses over the real vocabulary (padding rows left out)."""
    return loss_func(loss_mask, megatron_logit_scores(logits, labels, vocab_size).nll)


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of masked token losses and the token count (megatron divides by the global count)."""
    losses = output.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    reporting = torch.stack([loss.detach(), mask.sum().detach()])
    return loss, num_tokens, {"lm loss": reporting}


def reduce_loss(loss_dicts: List[Dict[str, torch.Tensor]]) -> Optional[float]:
    """Token-weighted mean loss over micro-batches and DP x CP ranks, known on every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for d in loss_dicts:
            total += d["lm loss"].detach().double().cpu()
    device = distributed.device()
    total = total.to(device)
    dist.all_reduce(total)  # only last-stage TP-rank-0 replicas contribute
    loss_sum, tokens = total.tolist()
    return loss_sum / tokens if tokens else None


def train_step(forward_backward, data_iterator, chunks, optimizer, scheduler, cfg: Config, num_microbatches: int):
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _schedule(forward_backward, data_iterator, chunks, cfg, num_microbatches)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=cfg.data.global_batch_size)
    return reduce_loss(losses), grad_norm, update_ok


@torch.no_grad()
def evaluate(forward_backward, valid_dataset, chunks, cfg: Config, num_microbatches: int) -> Optional[float]:
    """Mean validation loss over ``eval_iters`` global batches (always the same batches), over the real
    vocabulary (``forward_step``'s ``score_vocab``)."""
    iterator = data_iterators(valid_dataset, 0, cfg.data.micro_batch_size, len(chunks))
    total = []
    with eval_mode(chunks):
        for _ in range(cfg.training.eval_iters):
            total += _schedule(forward_backward, iterator, chunks, cfg, num_microbatches, evaluation=True)
    return reduce_loss(total)


@contextlib.contextmanager
def eval_mode(chunks) -> Iterator[None]:
    """The model chunks in eval mode (no dropout) inside, back in training mode after."""
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c in chunks:
            c.train()
