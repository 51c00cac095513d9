"""Worker: ``torch.cuda.max_memory_allocated`` of the trainer's bf16 training steps against the planner's
estimate (megatron_resonance/planning.py), one GPU.

    python tests/gpu/workers/planner_memory.py OUT.json

A 4-layer LLaMA (width 1024, SwiGLU 2816, GQA 16:4, vocabulary 32000) at length 8192, micro-batch 1, built
and stepped by ``training.step`` with the layer spec ``auto`` picks (TE where installed, else local), once
without recomputation and once with full recomputation, three steps each. The peak is everything the
caching allocator handed out (weights, fp32 gradient buffer, the optimizer state the first step allocates,
activations, logits), against the estimate's total.
"""

from __future__ import annotations

import json
import sys

import torch

SEQ, VOCAB = 8192, 32000


def config(recompute: str):
    from megatron_resonance.megatron.llama import LlamaConfig
    from megatron_resonance.training.config import Config, DataConfig

    model = LlamaConfig(
        num_layers=4,
        hidden_size=1024,
        ffn_hidden_size=2816,
        num_attention_heads=16,
        num_query_groups=4,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    cfg = Config(model=model, data=DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=1, mock_data=True))
    if recompute == "full":
        cfg.parallel.recompute_granularity, cfg.parallel.recompute_method = "full", "uniform"
        cfg.parallel.recompute_num_layers = 1
    cfg.training.train_iters = 10
    return cfg


def measure(recompute: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.megatron import distributed
    from megatron_resonance.megatron.llama import resolve_spec
    from megatron_resonance.planning import Layout, ModelShape, training_estimate
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = config(recompute)
    distributed.initialize(1, 1)
    chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=True)
    torch.cuda.synchronize()
    built = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, SEQ),
        "position_ids": torch.arange(SEQ)[None],
    }

    def data():
        while True:
            yield batch

    it = data()
    for _ in range(3):
        train_step(get_forward_backward_func(), it, chunks, optimizer, scheduler, cfg, num_microbatches=1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    spec = resolve_spec(cfg.parallel.transformer_impl)
    shape = ModelShape.from_llama(cfg.model)
    est = training_estimate(
        shape,
        SEQ,
        Layout(recompute=recompute, sequence_parallel=False),
        bf16=True,
        spec="te" if spec == "te" else "local",
    )
    del chunks, optimizer
    distributed.destroy()
    return {
        "recompute": recompute,
        "spec": spec,
        "built_bytes": built,
        "peak_bytes": peak,
        "estimate_parts": est.parts,
        "estimate_bytes": est.total,
    }


if __name__ == "__main__":
    results = [measure("none"), measure("full")]
    with open(sys.argv[1], "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "runs": results}, f, indent=1)
