"""Worker: the ``local`` spec against ``local_compiled`` (the same layers under ``torch.compile``), built by
the trainer from one seed, on this process's device (CUDA when there is one, in bf16; else CPU, fp32)::

    python tests/gpu/workers/local_compiled.py OUT.json

Writes, for each spec: the logits of one forward and every parameter's gradient in one training step (DDP's
``main_grad``) as float32 CPU tensors (``OUT.pt``), that step's loss, the ``state_dict`` and
``sharded_state_dict`` keys; and dynamo's counters for the compiled model (graphs, graph breaks, frames).
The model is a tiny LLaMA (2 layers, width 64, GQA 4:2) with Resonance YaRN (s = 4 over 16 positions).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

SEQ, BATCH, VOCAB = 64, 2, 256
SPECS = ("local", "local_compiled")


def config(spec: str):
    from megatron_resonance.megatron.llama import LlamaConfig
    from megatron_resonance.rope import RopeConfig
    from megatron_resonance.training.config import Config, DataConfig, OptimizerConfig, ParallelConfig

    model = LlamaConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        rope=RopeConfig(kind="resonance_yarn", head_dim=16, original_max_position=16, factor=4.0),
    )
    cfg = Config(
        model=model,
        data=DataConfig(seq_length=SEQ, micro_batch_size=BATCH, global_batch_size=BATCH, mock_data=True),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-3, lr_decay_style="constant", clip_grad=1.0),
        parallel=ParallelConfig(transformer_impl=spec),
    )
    cfg.training.train_iters = 1000
    return cfg


def batch() -> dict:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(BATCH, SEQ),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
    }


def run(spec: str, bf16: bool) -> tuple:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_resonance.megatron import cpu_speed, distributed
    from megatron_resonance.megatron.rotary import unwrap
    from megatron_resonance.training import trainer

    cfg = config(spec)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    chunks, optimizer, scheduler, _ = trainer.build_model_and_optimizer(cfg, bf16=bf16)
    gpt = unwrap(chunks[0])
    b = batch()
    dev = distributed.device()
    with torch.no_grad(), cpu_speed.suspended():  # (the trainer runs its forward outside the device mode too)
        logits = chunks[0](b["tokens"].to(dev), b["position_ids"].to(dev), None)
    loss, _, update_ok = trainer.train_step(
        get_forward_backward_func(), itertools.repeat(b), chunks, optimizer, scheduler, cfg, num_microbatches=1
    )
    assert update_ok, "the optimizer skipped the update"
    tensors = {"logits": logits.float().cpu()}
    for name, p in gpt.named_parameters():
        tensors[f"grad/{name}"] = p.main_grad.float().cpu().clone()
    record = {
        "loss": float(loss),
        "state_dict_keys": sorted(gpt.state_dict()),
        "sharded_state_dict_keys": sorted(gpt.sharded_state_dict()),
        "compiled_layers": [layer._compiled_call_impl is not None for layer in gpt.decoder.layers],
    }
    return record, tensors


def main(out: str) -> None:
    from torch._dynamo.utils import counters

    from megatron_resonance.megatron import distributed

    distributed.initialize(1, 1)
    bf16 = torch.cuda.is_available()
    results = {"device": str(distributed.device()), "dtype": "bf16" if bf16 else "fp32"}
    tensors = {}
    for spec in SPECS:
        counters.clear()
        results[spec], tensors[spec] = run(spec, bf16)
        results[spec]["dynamo"] = {
            "graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],
            "frames_ok": counters["frames"]["ok"],
        }
    Path(out).write_text(json.dumps(results, indent=1))
    torch.save(tensors, Path(out).with_suffix(".pt"))
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
