"""Worker: ``SDPAAttention`` and a whole model at CP=2 against CP=1 (gloo, 2 processes).

Run by ``tests/megatron/test_context_parallel.py``::

    torchrun --nproc-per-node 2 tests/megatron/workers/context_parallel.py OUT_DIR

1. ``attention``: random q [s, b, 4 heads, d], k/v [s, b, 2 groups, d] (the same on both ranks); the
   reference is ``SDPAAttention`` at CP=1 on the whole sequence, forward and backward (a random output
   gradient); at CP=2 each rank runs its load-balanced part (megatron's ``get_batch_on_this_cp_rank``
   slicing) and its output and q/k/v gradients are compared with the reference's rows for the same
   positions. Also a CP=2 attention whose config claims another CP size is refused.
2. ``model``: a 2-layer LLaMA per rope kind built at CP=1 and at CP=2 from the same seed (the same
   weights: checked); logits for the rank's positions against the CP=1 logits, and every parameter
   gradient of a loss on them, summed over the CP ranks, against CP=1's.

Writes ``OUT_DIR/results.json`` (rank 0): maxima over both ranks of |difference| / max |reference|.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from tests.tiny_llama import TINY, tiny_llama
from tests.worker_checks import run_check

SEQ, HEADS, GROUPS = TINY["max_position_embeddings"], TINY["num_attention_heads"], TINY["num_query_groups"]
BATCH, HEAD_DIM = 2, 16
KINDS = ("rope", "yarn", "resonance_yarn")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def on_this_rank(t: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
    """megatron's load-balanced CP slicing of ``t`` along ``seq_dim``."""
    from megatron_resonance.megatron.compat import batch_on_this_cp_rank

    moved = t.movedim(seq_dim, 1)
    return batch_on_this_cp_rank({"t": moved})["t"].movedim(1, seq_dim)


def max_over_ranks(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        t = torch.tensor([float(v)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[k] = t.item()
    return out


def check_attention() -> dict:
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_resonance.megatron import distributed, llama
    from megatron_resonance.megatron.sdpa_attention import SDPAAttention

    distributed.initialize(context_parallel_size=2, seed=0)
    config = llama.transformer_config(tiny_llama(num_layers=1, hidden_size=HEADS * HEAD_DIM))
    assert config.context_parallel_size == 2
    reference_config = copy.copy(config)
    reference_config.context_parallel_size = 1

    def build(c):
        return SDPAAttention(
            c, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=0.3
        )

    g = torch.Generator().manual_seed(1)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=g)
    v = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=g)
    grad_out = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=g)

    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = build(reference_config)
    ref_out = ref(*ref_inputs, None)
    ref_out.backward(grad_out)

    cp_inputs = [on_this_rank(t).clone().requires_grad_() for t in (q, k, v)]
    attention = build(config)
    out = attention(*cp_inputs, None)
    out.backward(on_this_rank(grad_out))

    record = {"forward": rel(out, on_this_rank(ref_out))}
    for name, mine, theirs in zip("qkv", cp_inputs, ref_inputs):
        record[f"grad_{name}"] = rel(mine.grad, on_this_rank(theirs.grad))
    record = max_over_ranks(record)
    record["local_shape"] = list(out.shape)
    record["reference_is_causal"] = bool(rel(ref_out[:8], build(reference_config)(q[:8], k[:8], v[:8], None)) < 1e-6)
    wrong = copy.copy(config)
    wrong.context_parallel_size = 4
    try:
        build(wrong)
        record["wrong_group_refused"] = None
    except ValueError as e:
        record["wrong_group_refused"] = str(e)
    return record


def run_model(kind: str, cp: int, tokens: torch.Tensor, weights=None):
    """Logits for this rank's positions and the parameter gradients (summed over CP ranks) of a fixed
    random projection of them."""
    from megatron.core import parallel_state as ps

    from megatron_resonance.megatron import distributed, llama

    distributed.initialize(context_parallel_size=cp, seed=0)
    # init std 0.1 (not 0.02): attention far from uniform, so that positions shape the logits
    cfg = tiny_llama(kind, hidden_size=HEADS * HEAD_DIM, ffn_hidden_size=96, vocab_size=128, init_method_std=0.1)
    (model,) = llama.build_model(cfg, spec="local", seq_length=SEQ)
    if weights is not None:
        same = all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        assert same, "the CP=2 model was not built with the CP=1 weights"
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    ids, pos = tokens, positions
    if cp > 1:
        ids, pos = on_this_rank(tokens, 1), on_this_rank(positions, 1)
    logits = model(ids, pos, None)  # [b, s, V]
    g = torch.Generator().manual_seed(2)
    projection = torch.randn(BATCH, SEQ, logits.shape[-1], generator=g)
    if cp > 1:
        projection = on_this_rank(projection, 1)
    (logits * projection).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if cp > 1:
            dist.all_reduce(grad, group=ps.get_context_parallel_group())
        grads[name] = grad
    named = {n: p.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), grads, named


def check_models() -> dict:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 128, (BATCH, SEQ), generator=g)
    out = {}
    for kind in KINDS:
        ref_logits, ref_grads, weights = run_model(kind, 1, tokens)
        logits, grads, _ = run_model(kind, 2, tokens, weights)
        record = {
            "logits": rel(logits, on_this_rank(ref_logits, 1)),
            "grads": max(rel(grads[n], ref_grads[n]) for n in ref_grads),
            "logits_max_abs": float(ref_logits.abs().max()),
        }
        out[kind] = max_over_ranks(record)
        out[kind]["num_params"] = len(ref_grads)
    return out


def main() -> None:
    from megatron_resonance.megatron import distributed

    out_dir = sys.argv[1]
    distributed.init_process_group()
    results = {}
    for name, check in (("attention", check_attention), ("models", check_models)):
        results[name] = run_check(check)
    from megatron_resonance.megatron import cpu_speed

    results["cpu_speed"] = cpu_speed.is_enabled()
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
