"""Worker: logits of converted Megatron checkpoints at TP=2 and at PP=2 (gloo, 2 processes), or at TP=1.

    torchrun --nproc-per-node 2 tests/conversion/workers/megatron_logits.py PLAN.json OUT_DIR
    python tests/conversion/workers/megatron_logits.py PLAN.json OUT_DIR tp1     # one process (the gpu tier)

PLAN.json: ``{"jobs": [{"name": ..., "checkpoint": DIR, "tokens": FILE.pt}, ...]}``. For each layout, every
checkpoint is built with ``llama.build_model`` and loaded with ``checkpointing.load_checkpoint`` (which
reshards the TP=1 conversion). TP=2: a direct forward, vocab-parallel logits gathered over the TP group.
PP=2: megatron's ``get_forward_backward_func()`` with ``forward_only`` and ``collect_non_loss_data`` (one
micro-batch holding the whole batch); the last stage holds the logits. Writes ``OUT_DIR/{name}.{layout}.pt``
(float32 logits cut to the real vocabulary). On a GPU the model and tokens are on it (fp32).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def run(job, layout, out_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_resonance.megatron import checkpoint_layout, checkpointing, llama

    cfg = checkpoint_layout.read_model_config(job["checkpoint"])
    tokens = torch.load(job["tokens"]).to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    batch, seq = tokens.shape
    chunks = llama.build_model(cfg, seq_length=seq)
    for c in chunks:
        c.to(tokens.device)  # megatron builds its layers on the GPU, torch's norms on the CPU
    checkpointing.load_checkpoint(job["checkpoint"], chunks)
    for c in chunks:
        c.eval()
    positions = torch.arange(seq, device=tokens.device)[None, :].expand(batch, seq)
    logits = None
    with torch.no_grad():
        if LAYOUTS[layout][1] == 1:
            logits = gather_from_tensor_model_parallel_region(chunks[0](tokens, positions, None))
        else:

            def forward_step(data_iterator, model):
                b = next(data_iterator)
                return model(b["tokens"], b["positions"], None), lambda out, non_loss_data=False: out

            collected = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([{"tokens": tokens, "positions": positions}]),
                model=chunks,
                num_microbatches=1,
                seq_length=seq,
                micro_batch_size=batch,
                forward_only=True,
                collect_non_loss_data=True,
            )
            if ps.is_pipeline_last_stage():
                (logits,) = collected
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(logits[..., : cfg.vocab_size].float().cpu().contiguous(), out_dir / f"{job['name']}.{layout}.pt")
    dist.barrier()


def main(plan_path: str, out_dir: str, layouts=("tp2", "pp2")) -> None:
    from megatron_resonance.megatron import distributed

    jobs = json.loads(Path(plan_path).read_text())["jobs"]
    for layout in layouts:
        tp, pp = LAYOUTS[layout]
        distributed.initialize(tp, pp)
        for job in jobs:
            run(job, layout, Path(out_dir))
        distributed.destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or ("tp2", "pp2"))
