"""Worker: what the trainer builds from command-line flags, and a TP=2 checkpoint at other layouts.

Run by the ``model_checks`` fixture of ``tests/training/conftest.py`` under ``torchrun --nproc-per-node 2``
(gloo, CPU)::

    torchrun --nproc-per-node 2 tests/training/workers/checks.py SPEC.json OUT_DIR

``SPEC.json`` holds

* ``rope``: ``{name: argv}``; each argv goes through the entry point's own parser, ``config_from_args`` and
  ``training.model.build_model_and_optimizer`` (TP=1, DP=2), and the installed rotary is reported
  (:func:`rope_check`, asserted in ``tests/training/test_rope_flags.py``);
* ``reshard``: ``{"checkpoint": DIR, "argv": [...], "layouts": {name: [TP, PP]}}``; at each layout the
  model is built the trainer's way, the checkpoint's weights loaded (dist_checkpointing reshards them),
  and the trainer's ``evaluate`` and a forward pass over the next training batch measured
  (:func:`reshard_check`, asserted in ``tests/training/test_checkpoint_layouts.py``).

Each check is recorded as a dict, or ``{"error": traceback}`` (``tests.worker_checks``); rank 0 writes
``OUT_DIR/results.json``.
"""

from __future__ import annotations

import json
import os
import sys

from tests.worker_checks import run_check


def parse(argv):
    from megatron_resonance.training import launch
    from megatron_resonance.training.config import config_from_args

    return config_from_args(launch.make_parser("pretrain_llama.py", "").parse_args(argv))


def rope_check(argv):
    import torch

    from megatron_resonance.megatron import distributed
    from megatron_resonance.megatron.rotary import unwrap
    from megatron_resonance.training.model import build_model_and_optimizer

    cfg = parse(argv)
    p = cfg.parallel
    distributed.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=cfg.training.seed)
    chunks, _, _, tf_config = build_model_and_optimizer(cfg, bf16=False)
    gpt = unwrap(chunks[0])
    rotary = gpt.rotary_pos_emb
    seq = cfg.data.seq_length
    angles = rotary(seq)[:, 0, 0, : cfg.model.head_dim // 2].double()  # [seq, d/2], reduced to [0, 2 pi)
    scales = sorted({m.softmax_scale for m in gpt.modules() if hasattr(m, "softmax_scale") and m is not gpt})
    distributed.destroy()
    return {
        "type": type(rotary).__name__,
        "rope": rotary.rope.to_dict(),
        "inv_freq": rotary.frequencies.inv_freq.tolist(),
        "inv_freq_fp32": rotary.inv_freq.tolist(),
        "attention_factor": rotary.attention_factor,
        "angles": angles.tolist(),
        "model_softmax_scale": gpt.config.softmax_scale,
        "tf_config_softmax_scale": tf_config.softmax_scale,
        "core_attention_scales": scales,
        "head_dim": cfg.model.head_dim,
        "max_position_embeddings": cfg.model.max_position_embeddings,
        "float64": rotary.frequencies.inv_freq.dtype == torch.float64,
    }


def reshard_check(checkpoint, argv, tp, pp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.megatron import checkpointing, distributed
    from megatron_resonance.megatron.rotary import unwrap
    from megatron_resonance.training.data_loop import build_data, micro_batches
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import evaluate, forward_step, reduce_loss

    cfg = parse([*argv, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)])
    distributed.initialize(tp, pp, seed=cfg.training.seed)
    chunks, _, _, _ = build_model_and_optimizer(cfg, bf16=False)
    info = checkpointing.load_checkpoint(checkpoint, chunks)  # weights only
    d, t = cfg.data, cfg.training
    dp = ps.get_data_parallel_world_size()
    num_microbatches = d.global_batch_size // (d.micro_batch_size * dp)
    # the dataset sizes trainer.run asks for (the mock samples depend on them)
    valid_samples = d.global_batch_size * t.eval_iters * (t.train_iters // max(t.eval_interval, 1) + 1)
    train_ds, valid_ds = build_data(cfg, t.train_iters * d.global_batch_size, valid_samples)
    forward_backward = get_forward_backward_func()
    eval_loss = evaluate(forward_backward, valid_ds, chunks, cfg, num_microbatches)
    # the batch the saving run trained on right after this checkpoint (iteration info + 1)
    start = info["iteration"] * d.global_batch_size
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=micro_batches(train_ds, start, d.micro_batch_size),
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=d.seq_length,
        micro_batch_size=d.micro_batch_size,
        forward_only=True,
    )
    next_loss = reduce_loss(losses)
    layers = [None] * dist.get_world_size()
    dist.all_gather_object(layers, [layer.layer_number for c in chunks for layer in unwrap(c).decoder.layers])
    distributed.destroy()
    return {
        "iteration": info["iteration"],
        "eval_loss": eval_loss,
        "next_train_loss": next_loss,
        "dp": dp,
        "num_microbatches": num_microbatches,
        "layers_per_rank": layers,
    }


def guarded(fn, *args):
    """``run_check(fn, *args)``; after a check that raised, megatron's parallel state is torn down so that the
    next check can set up its own."""
    from megatron_resonance.megatron import distributed

    result = run_check(fn, *args)
    if "error" in result:
        distributed.destroy()
    return result


def main(spec_path, out_dir):
    import torch.distributed as dist

    with open(spec_path) as f:
        spec = json.load(f)
    results = {"rope": {}, "reshard": {}}
    for name, argv in spec["rope"].items():
        results["rope"][name] = guarded(rope_check, argv)
    r = spec["reshard"]
    for name, (tp, pp) in r["layouts"].items():
        results["reshard"][name] = guarded(reshard_check, r["checkpoint"], r["argv"], tp, pp)
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
