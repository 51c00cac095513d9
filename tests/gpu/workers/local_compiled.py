"""Worker: the ``local`` spec against ``local_compiled`` (the same layers under ``torch.compile``), built by
the trainer from one seed, on this process's device (CUDA when there is one, in bf16; else CPU, fp32)::

    python tests/gpu/workers/local_compiled.py OUT.json

Writes, for each spec: the logits of one forward and every parameter's gradient in one training step (DDP's
``main_grad``) as float32 CPU tensors (``OUT.pt``), that step's loss, the ``state_dict`` and
``sharded_state_dict`` keys; and dynamo's counters for the compiled model (graphs, graph breaks, frames).
The model, its run configuration and the batch are ``trainer_steps.py``'s (a tiny LLaMA with Resonance YaRN).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import trainer_steps  # the sibling worker (this script's directory is on sys.path)

SPECS = ("local", "local_compiled")


def config(spec: str):
    """``trainer_steps``' tiny model and run, built with the layer spec ``spec``."""
    cfg = trainer_steps.config()
    cfg.parallel.transformer_impl = spec
    return cfg


def run(spec: str, bf16: bool) -> tuple:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_resonance.megatron import cpu_speed, distributed
    from megatron_resonance.megatron.rotary import unwrap
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = config(spec)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=bf16)
    gpt = unwrap(chunks[0])
    b = next(trainer_steps.batches())
    dev = distributed.device()
    with torch.no_grad(), cpu_speed.suspended():  # (the trainer runs its forward outside the device mode too)
        logits = chunks[0](b["tokens"].to(dev), b["position_ids"].to(dev), None)
    loss, _, update_ok = train_step(
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
