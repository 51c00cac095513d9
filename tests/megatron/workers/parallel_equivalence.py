"""Worker: the same LLaMA weights and global batch give the same loss and gradients at every parallel layout.

Run by ``tests/megatron/test_parallel_equivalence.py`` under ``torchrun --nproc-per-node 2`` (gloo, CPU)::

    torchrun --nproc-per-node 2 tests/megatron/workers/parallel_equivalence.py OUT_DIR

One job, several layouts (re-initializing megatron's groups in between):

1. build at TP=1, PP=1 (DP=2) and save the initial weights with ``checkpointing.save_checkpoint``;
2. for each rope kind and each layout (TP1/PP1 with DP=2, TP=2, TP=2 with sequence parallelism, PP=2,
   PP=2 with VPP=2): build, load the weights (dist_checkpointing reshards them), wrap in megatron DDP, run
   ``get_forward_backward_func()`` over the same 4-sequence global batch (1 sequence per microbatch),
   all-reduce the mean loss, copy every parameter's ``main_grad`` into its data and save that as a
   "gradient checkpoint";
3. at TP=1 load every gradient checkpoint back (dist_checkpointing merges TP shards and PP stages),
   compare each parameter with the TP1/PP1 reference and save the full gradients (``grads_KIND_LAYOUT.pt``)
   for a comparison across runs.

The test runs it with ``cpu_speed`` on and off (``MEGATRON_RESONANCE_CPU_SPEED``). Writes
``OUT_DIR/results.json`` (rank 0): losses, per-parameter relative gradient differences, rotary checks per
model chunk, the code paths the model ran, and the builder's refusal messages.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

from tests.tiny_llama import TINY, tiny_llama

SEQ_LENGTH = TINY["max_position_embeddings"]
GLOBAL_BATCH = 4
MICRO_BATCH = 1
NUM_LAYERS = 4
KINDS = ("rope", "resonance_yarn")
# name: (TP, PP, VPP, sequence parallel)
LAYOUTS = {
    "tp1_pp1_dp2": (1, 1, None, False),
    "tp2": (2, 1, None, False),
    "tp2_sp": (2, 1, None, True),
    "pp2": (1, 2, None, False),
    "pp2_vpp2": (1, 2, 2, False),
}
REFERENCE = "tp1_pp1_dp2"


def model_config(kind: str):
    """``tiny_llama(kind)`` with NUM_LAYERS layers. Kinds other than rope: original length 32 < sequence
    length 64, so YaRN's attention factor (m = 1.139) and its ramp (features 1, 2 partially interpolated for
    head_dim 32) both shape the logits. Init std 0.1, larger than LLaMA's 0.02, so that attention is far
    from uniform and positions shape loss and grads."""
    return tiny_llama(kind, original_max_position=32, num_layers=NUM_LAYERS, init_method_std=0.1)


def global_batch():
    """The same 4 sequences on every rank and layout."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LENGTH + 1), generator=g)
    return [
        {
            "tokens": tokens[i : i + 1, :-1].contiguous(),
            "labels": tokens[i : i + 1, 1:].contiguous(),
            "loss_mask": torch.ones(1, SEQ_LENGTH),
            "position_ids": torch.arange(SEQ_LENGTH)[None, :],
        }
        for i in range(GLOBAL_BATCH)
    ]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor):
        mask = batch["loss_mask"]
        loss = (output_tensor.float() * mask).sum() / mask.sum()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def rotary_report(chunks, cfg):
    """For every model chunk on this rank: is the rotary ours, with the plan, and does it reach attention."""
    from megatron_resonance.megatron.rotary import ResonanceRotaryEmbedding, softmax_scale_for, unwrap
    from megatron_resonance.rope import compute_frequencies, rotary_angle_table

    expected = rotary_angle_table(compute_frequencies(cfg.rope), SEQ_LENGTH)
    report = []
    for chunk in chunks:
        gpt = unwrap(chunk)
        rotary = gpt.rotary_pos_emb
        scales = {m.softmax_scale for m in gpt.modules() if hasattr(m, "softmax_scale") and m is not gpt}
        emb = rotary(SEQ_LENGTH)
        report.append(
            {
                "rank": dist.get_rank(),
                "qkv_rows": tuple(gpt.decoder.layers[0].self_attention.linear_qkv.weight.shape)[0],
                "type": type(rotary).__name__,
                "is_resonance_module": isinstance(rotary, ResonanceRotaryEmbedding),
                "kind": getattr(getattr(rotary, "rope", None), "kind", None),
                "angles_match": bool(torch.equal(emb[:, 0, 0, : cfg.head_dim // 2], expected)),
                "layers": [layer.layer_number for layer in gpt.decoder.layers],
                "core_attention_scales": sorted(scales),
                "expected_scale": softmax_scale_for(cfg.rope) or 1 / math.sqrt(cfg.head_dim),
            }
        )
    return report


def code_paths(chunk, tf_config) -> dict:
    """Which code the step ran: cpu_speed's replacements or megatron's and torch's own (qualified names)."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    from megatron_resonance.megatron import cpu_speed
    from megatron_resonance.megatron.rotary import unwrap

    def name(obj) -> str:
        obj = type(obj) if isinstance(obj, torch.nn.Module) else obj
        return f"{obj.__module__}.{obj.__qualname__}"

    gpt = unwrap(chunk)
    return {
        "cpu_speed": cpu_speed.is_enabled(),
        "linear_function": name(layers.LinearWithGradAccumulationAndAsyncCommunication),
        "mlp_activation": name(gpt.decoder.layers[0].mlp.activation_func),
        "norm": name(gpt.decoder.layers[0].input_layernorm),
        "final_norm": name(gpt.decoder.final_layernorm) if gpt.decoder.final_layernorm is not None else None,
        "logits_max": name(VocabParallelCrossEntropy.calculate_logits_max),
        "l2_norm": name(clip_grads.l2_norm_impl),
        "gradient_accumulation_fusion": tf_config.gradient_accumulation_fusion,
        "apply_rope_fusion": tf_config.apply_rope_fusion,
    }


def run_layout(out_dir, kind, layout, weights_dir):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.megatron import checkpointing, distributed, llama
    from megatron_resonance.megatron.rotary import unwrap

    tp, pp, vpp, sp = LAYOUTS[layout]
    distributed.initialize(tp, pp, vpp)
    cfg = model_config(kind)
    chunks = llama.build_model(cfg, sequence_parallel=sp, seq_length=SEQ_LENGTH)
    checkpointing.load_checkpoint(weights_dir, chunks)
    # every rank's chunks: with VPP, the rotary must be ours on all 2 x 2 chunks
    rotary = [None] * dist.get_world_size()
    dist.all_gather_object(rotary, rotary_report(chunks, cfg))

    tf_config = unwrap(chunks[0]).config
    paths = code_paths(chunks[-1], tf_config)  # the last chunk of the last stage holds the final norm
    model = llama.for_training(chunks, use_distributed_optimizer=False)
    no_sync = [m.no_sync for m in model]
    tf_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    tf_config.finalize_model_grads_func = finalize_model_grads
    for m in model:
        m.zero_grad_buffer()

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp
    mine = global_batch()[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    num_microbatches = per_rank // MICRO_BATCH
    data = [iter(mine) for _ in model] if len(model) > 1 else iter(mine)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=SEQ_LENGTH,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )

    # Global mean loss: every microbatch has the same number of tokens; count each once (TP rank 0 of
    # the last pipeline stage).
    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        total[0] = sum(float(x["lm loss"]) for x in losses)
        total[1] = len(losses)
    dist.all_reduce(total)
    loss = float(total[0] / total[1])

    # Gradients as a checkpoint: dist_checkpointing knows how every parameter is sharded.
    with torch.no_grad():
        for m in model:
            for name, p in unwrap(m).named_parameters():
                assert p.main_grad is not None, name
                p.data.copy_(p.main_grad)
    grads_dir = os.path.join(out_dir, f"grads_{kind}_{layout}")
    checkpointing.save_checkpoint(grads_dir, 0, chunks, cfg)
    distributed.destroy()
    return {
        "loss": loss,
        "num_microbatches": num_microbatches,
        "chunks": len(chunks),
        "rotary": [chunk for rank in rotary for chunk in rank],
        "sequence_parallel": tf_config.sequence_parallel,
        "code_paths": paths,
        "grads_dir": grads_dir,
    }


def tp1_state(path, cfg):
    """Full (TP=1, PP=1) parameters of a checkpoint, as {name: tensor}."""
    from megatron_resonance.megatron import checkpointing, llama

    chunks = llama.build_model(cfg, seq_length=SEQ_LENGTH)
    checkpointing.load_checkpoint(path, chunks)
    return {name: p.detach().clone() for name, p in chunks[0].named_parameters()}


def builder_refusals():
    """At TP=2 the builder must refuse heads / query groups it cannot split."""
    from megatron_resonance.megatron import distributed, llama

    distributed.initialize(2, 1)
    messages = {}
    for name, heads, groups in (("heads", 3, 3), ("query_groups", 6, 3)):
        cfg = llama.LlamaConfig(
            num_layers=1, hidden_size=16 * heads, num_attention_heads=heads, num_query_groups=groups
        )
        try:
            llama.build_model(cfg, seq_length=16)
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    distributed.destroy()
    return messages


def main(out_dir: str) -> None:
    from megatron_resonance.megatron import checkpointing, distributed, llama

    results = {"layouts": {}, "grads": {}}
    distributed.initialize(1, 1)
    rank = dist.get_rank()
    weights_dir = os.path.join(out_dir, "weights")
    # Weights do not depend on the rope kind: one initial checkpoint serves every kind and layout.
    checkpointing.save_checkpoint(
        weights_dir, 0, llama.build_model(model_config("rope"), seq_length=SEQ_LENGTH), model_config("rope")
    )
    distributed.destroy()

    for kind in KINDS:
        for layout in LAYOUTS:
            results["layouts"][f"{kind}/{layout}"] = run_layout(out_dir, kind, layout, weights_dir)

    distributed.initialize(1, 1)
    for kind in KINDS:
        cfg = model_config(kind)
        reference = tp1_state(results["layouts"][f"{kind}/{REFERENCE}"]["grads_dir"], cfg)
        for layout in LAYOUTS:
            grads_dir = results["layouts"][f"{kind}/{layout}"]["grads_dir"]
            grads = reference if layout == REFERENCE else tp1_state(grads_dir, cfg)
            if rank == 0:
                torch.save(grads, os.path.join(out_dir, f"grads_{kind}_{layout}.pt"))
            if layout == REFERENCE:
                continue
            assert grads.keys() == reference.keys(), (sorted(grads), sorted(reference))
            per_param = {}
            for name, ref in reference.items():
                diff = (grads[name] - ref).abs().max().item()
                scale = ref.abs().max().item()
                per_param[name] = {
                    "max_abs_diff": diff,
                    "max_abs_ref": scale,
                    "rel": diff / scale if scale > 0 else diff,
                }
            results["grads"][f"{kind}/{layout}"] = per_param
    distributed.destroy()

    results["refusals"] = builder_refusals()
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # do not hang the other rank in a collective
