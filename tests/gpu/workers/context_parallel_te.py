"""Worker: Transformer Engine's context parallelism against ours (``SDPAAttention``'s all-gather), CP=2 on
two GPUs (NCCL, bf16)::

    torchrun --nproc-per-node 2 tests/gpu/workers/context_parallel_te.py OUT.json

A small LLaMA (``tiny_llama`` widened to 8 heads of 32, 1024 positions) with Resonance YaRN is built with the
``local`` spec at CP=2; the same weights are copied into the ``te`` spec at CP=2 (TE's layer norms live inside
its fused linears: ``linear_qkv.layer_norm_weight`` is the local ``input_layernorm.weight``,
``linear_fc1.layer_norm_weight`` ``pre_mlp_layernorm.weight``). Each rank feeds its load-balanced part of one
batch (``get_batch_on_this_cp_rank``) to both and reports the largest |difference| of the logits relative to
their largest magnitude (over both ranks), and the same for a CP=1 local forward on the whole batch (its rows
for this rank's positions): the two CPs against each other and each against no CP. Rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from tests.tiny_llama import tiny_llama

SEQ, BATCH = 1024, 2
TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def model_config():
    return tiny_llama(
        "resonance_yarn",
        hidden_size=256,
        ffn_hidden_size=704,
        num_attention_heads=8,
        vocab_size=512,
        max_position_embeddings=SEQ,
        init_method_std=0.05,
    )


def local_name(te_name: str) -> str:
    for te, local in TE_NAMES.items():
        te_name = te_name.replace(te, local)
    return te_name


def logits(spec: str, cp: int, tokens, weights=None):
    from megatron_resonance.megatron import compat, distributed, llama

    distributed.initialize(context_parallel_size=cp, seed=0)
    (model,) = llama.build_model(model_config(), dtype=torch.bfloat16, spec=spec, seq_length=SEQ)
    if weights is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[local_name(name)])
    model.eval()
    batch = {"tokens": tokens, "position_ids": torch.arange(SEQ, device=tokens.device).expand(BATCH, SEQ)}
    if cp > 1:
        batch = compat.batch_on_this_cp_rank(batch)
    with torch.no_grad():
        out = model(batch["tokens"], batch["position_ids"], None).float()
    return out, {n: p.detach().clone() for n, p in model.named_parameters()}


def main() -> None:
    from megatron_resonance.megatron import compat, distributed

    distributed.init_process_group()
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 512, (BATCH, SEQ), generator=g, device="cuda")
    ours, weights = logits("local", 2, tokens)
    te, _ = logits("te", 2, tokens, weights)
    whole, _ = logits("local", 1, tokens, weights)
    whole = compat.batch_on_this_cp_rank({"t": whole})["t"]

    def rel(a, b):
        t = ((a - b).abs().max() / b.abs().max()).reshape(1).double()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    result = {
        "te_vs_ours": rel(te, ours),
        "ours_vs_cp1": rel(ours, whole),
        "te_vs_cp1": rel(te, whole),
        "logits_max_abs": float(whole.abs().max()),
        "shape": list(ours.shape),
    }
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
