"""The data a run trains on: megatron's GPT datasets (:func:`build_data`) and Megatron-LM's pretraining
sampler (:func:`sample_ranges`, :func:`micro_batches`; PosGen samples its sequences with it too).

megatron.core (and what imports it) is imported where it is used: it is heavy, and PosGen's cells import
this module before they build a model.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator

import torch

from megatron_resonance.data.checks import path_items
from megatron_resonance.data.datasets import build_gpt_datasets
from megatron_resonance.megatron import distributed
from megatron_resonance.megatron.distributed import print_rank0
from megatron_resonance.training.config import Config
from megatron_resonance.training.validation import fallback_cache_dir, load_data_tokenizer


def build_data(cfg: Config, train_samples: int, valid_samples: int):
    """megatron GPTDataset train/validation sets (MockGPTDataset with --mock-data).

    ``--data-path`` alone (one prefix or a blend) is split into train/validation by documents (``--split``,
    Megatron-LM's default 98,2,0); with ``--valid-data-path`` the two are used as they are."""
    d = cfg.data
    if d.tokenizer_model:
        tok = load_data_tokenizer(d.tokenizer_model)
        tokenizer = dict(vocab_size=tok.vocab_size, eod_id=tok.eos_id, tokenizer_name=os.path.basename(tok.path))
    else:
        tokenizer = dict(vocab_size=cfg.model.vocab_size, eod_id=cfg.model.vocab_size - 1)
    if d.mock_data:
        source = dict(mock=True)
    elif d.valid_data_path:
        source = dict(train_data_prefix=path_items(d.data_path), valid_data_prefix=path_items(d.valid_data_path))
    else:
        source = dict(data_prefix=path_items(d.data_path), split=d.split)
    return build_gpt_datasets(
        seq_length=d.seq_length,
        seed=cfg.training.seed,
        train_samples=train_samples,
        valid_samples=valid_samples,
        cache_dir=d.data_cache_path,
        fallback_cache_dir=fallback_cache_dir(cfg),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        **tokenizer,
        **source,
    )


def data_iterators(dataset, start_sample: int, micro_batch_size: int, num_chunks: int):
    """What megatron's schedules take as ``data_iterator``: one iterator, or with virtual pipelining one per
    model chunk (each chunk reads every micro-batch: the first takes its tokens, the last its labels)."""
    if num_chunks == 1:
        return micro_batches(dataset, start_sample, micro_batch_size)
    return [micro_batches(dataset, start_sample, micro_batch_size) for _ in range(num_chunks)]


def sample_ranges(start_sample: int, micro_batch_size: int) -> Iterator[range]:
    """Megatron-LM's pretraining sampler: the global sample indices of this DP rank's micro-batches, in global
    sample order; each DP rank takes its slice of every micro-batch round."""
    from megatron.core import parallel_state as ps

    dp_rank = ps.get_data_parallel_rank()
    dp_size = ps.get_data_parallel_world_size()
    sample = start_sample
    while True:
        first = sample + dp_rank * micro_batch_size
        yield range(first, first + micro_batch_size)
        sample += micro_batch_size * dp_size


def micro_batches(dataset, start_sample: int, micro_batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """The micro-batches of :func:`sample_ranges` from ``dataset`` (cycled). Starting at ``start_sample``
    makes resume continue exactly where it stopped.

    With ``--reset-attention-mask`` each batch also holds ``document_ids`` [b, s], every token's document
    (EODs before it), from which ``forward_step`` masks attention."""
    from megatron_resonance.megatron.documents import document_ids_from_tokens  # imports megatron.core

    config = getattr(dataset, "config", None)
    eod = config.tokenizer.eod if getattr(config, "reset_attention_mask", False) else None
    for indices in sample_ranges(start_sample, micro_batch_size):
        items = [dataset[i % len(dataset)] for i in indices]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0] if k != "attention_mask"}
        if eod is not None:
            batch["document_ids"] = document_ids_from_tokens(batch["tokens"], eod)
        yield batch


def log_documents(cfg: Config, dataset, sample: int) -> None:
    """With document flags, one line on rank 0 about the first sample this run trains on: its documents'
    lengths, where positions restart, the EOD tokens out of the loss."""
    d = cfg.data
    flags = [
        f"--{n.replace('_', '-')}"
        for n in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
        if getattr(d, n)
    ]
    if not flags or not distributed.is_rank0():
        return
    item = dataset[sample % len(dataset)]
    eod = dataset.config.tokenizer.eod
    tokens, positions = torch.as_tensor(item["tokens"]), torch.as_tensor(item["position_ids"])
    ends = (torch.nonzero(tokens == eod).flatten() + 1).tolist()
    lengths = [b - a for a, b in zip([0, *ends], [*ends, len(tokens)]) if b > a]
    restarts = torch.nonzero(positions[1:] == 0).flatten().add(1).tolist()
    print_rank0(
        f"[data] documents ({' '.join(flags)}; EOD id {eod}): sample {sample} holds {len(lengths)} "
        f"(lengths {lengths}), positions restart at {restarts}, "
        f"{int((torch.as_tensor(item['loss_mask']) == 0).sum())} tokens out of the loss"
    )
