"""The model and optimizer the trainer builds, asserted in ``tests/megatron/test_llama.py``; run by
``model_checks.py``."""

from __future__ import annotations

import torch

from tests.tiny_llama import tiny_llama, train_batch, training_config


def check_fused_torch_adam():
    """The trainer's fused torch AdamW makes the same updates as the for-loop AdamW megatron falls back to.

    Asserted by ``test_fused_torch_adam_makes_the_same_updates``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = training_config(tiny_llama(), 3, lr=1e-2, clip_grad=1.0)

    params, flags = {}, {}
    for fused in (True, False):
        torch.manual_seed(0)
        chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=False)
        groups = [g for o in optimizer.chained_optimizers for g in o.optimizer.param_groups]
        flags[str(fused)] = sorted({str(g["fused"]) for g in groups})
        if not fused:
            for g in groups:
                g["fused"] = False
        batch = train_batch(cfg.model)
        for _ in range(3):
            train_step(get_forward_backward_func(), iter([batch]), chunks, optimizer, scheduler, cfg, 1)
        params[fused] = torch.cat([p.detach().flatten() for p in chunks[0].parameters()])
    moved = (params[True] - params[False]).abs().max().item()
    return {"fused_flags": flags, "max_abs_param_diff": moved, "max_abs_param": params[False].abs().max().item()}


def check_finetune_load_bf16():
    """A bf16 model loaded for finetuning keeps the loaded weights through an optimizer step (lr 1e-9):
    the optimizer's fp32 main params are refreshed from them. Measured both through the trainer's
    ``load_weights_only`` and through a bare model load, which shows what the refresh prevents.

    Asserted by ``test_finetune_load_survives_the_first_bf16_step``."""
    import tempfile

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.megatron import checkpointing
    from megatron_resonance.training.model import build_model_and_optimizer, load_weights_only
    from megatron_resonance.training.step import train_step

    cfg = training_config(tiny_llama(), 1, lr=1e-9, weight_decay=0.0)
    batch = train_batch(cfg.model)

    def flat(chunks):
        return torch.cat([p.detach().float().flatten() for p in chunks[0].parameters()])

    root = tempfile.mkdtemp(prefix="finetune_bf16_")
    torch.manual_seed(0)
    saved_chunks, _, _, _ = build_model_and_optimizer(cfg, bf16=True)
    checkpointing.save_checkpoint(root, 1, saved_chunks, cfg.model)
    saved = flat(saved_chunks)
    out = {"dtype": str(next(saved_chunks[0].parameters()).dtype)}
    for name, load in (
        ("load_weights_only", load_weights_only),
        ("model_only_load", lambda path, chunks, optimizer: checkpointing.load_checkpoint(path, chunks)),
    ):
        torch.manual_seed(1)  # a different initialization
        chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=True)
        load(root, chunks, optimizer)
        loaded = (flat(chunks) - saved).abs().max().item()
        train_step(get_forward_backward_func(), iter([batch]), chunks, optimizer, scheduler, cfg, 1)
        out[name] = {"after_load": loaded, "after_step": (flat(chunks) - saved).abs().max().item()}
    return out


def check_grad_accumulation_fusion():
    """``cpu_speed``'s gradient-accumulation fusion (weight-gradient GEMMs accumulate into DDP's
    main_grad) gives the unfused path's gradients: one step, fused vs unfused, same weights and batch.

    Asserted by ``test_grad_accumulation_fusion_matches_the_unfused_gradients``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import layers

    from megatron_resonance.megatron import llama
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = training_config(tiny_llama(), 1, lr=1e-3, clip_grad=0.0)
    calls = []
    shim = layers.fused_weight_gradient_mlp_cuda
    accumulate = shim.wgrad_gemm_accum_fp32
    shim.wgrad_gemm_accum_fp32 = lambda *a: (calls.append(1), accumulate(*a))
    original_config = llama.transformer_config  # what the model provider builds its config with
    grads, flags = {}, {}
    try:
        for fused in (True, False):
            llama.transformer_config = lambda *a, **k: original_config(*a, **k, gradient_accumulation_fusion=fused)
            torch.manual_seed(0)
            chunks, optimizer, scheduler, tf_config = build_model_and_optimizer(cfg, bf16=False)
            flags[str(fused)] = tf_config.gradient_accumulation_fusion
            del calls[:]
            batches = iter([train_batch(cfg.model)])
            train_step(get_forward_backward_func(), batches, chunks, optimizer, scheduler, cfg, 1)
            grads[fused] = torch.cat([p.main_grad.flatten() for p in chunks[0].parameters()])
            flags[f"calls_{fused}"] = len(calls)
    finally:
        llama.transformer_config = original_config
        shim.wgrad_gemm_accum_fp32 = accumulate
    rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    return {"flags": flags, "grads_rel": rel, "grad_norm": grads[False].norm().item()}


def check_validation_loss_over_real_vocabulary():
    """The trainer's validation loss leaves the padded vocabulary rows out, as the evaluation tools do: it
    equals the mean NLL of ``megatron_token_scores`` on the same tokens and does not move when the padding
    rows' output weights grow; megatron's cross entropy (the training loss) counts those rows.

    Asserted by ``test_validation_loss_is_over_the_real_vocabulary``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_resonance.evaluation.scoring import megatron_token_scores
    from megatron_resonance.megatron.llama import build_model
    from megatron_resonance.training.config import from_dict
    from megatron_resonance.training.data_loop import micro_batches
    from megatron_resonance.training.step import evaluate, forward_step, reduce_loss

    model_cfg = tiny_llama(vocab_size=200)  # padded to 256
    torch.manual_seed(3)
    (chunk,) = build_model(model_cfg)
    chunk.eval()
    seq, mbs, batches = 16, 2, 2
    model = {k: v for k, v in model_cfg.to_dict().items() if k != "rope"}
    cfg = from_dict({
        "model": model,
        "data": {"seq_length": seq, "micro_batch_size": mbs, "global_batch_size": mbs * batches, "mock_data": True},
        "training": {"eval_iters": 1},
    })  # fmt: skip
    rows = torch.randint(0, 200, (mbs * batches, seq + 1), generator=torch.Generator().manual_seed(4))
    dataset = [
        {"tokens": r[:-1], "labels": r[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)}
        for r in rows
    ]
    forward_backward = get_forward_backward_func()

    def training_loss():  # megatron's cross entropy, over the padded vocabulary
        losses = forward_backward(
            forward_step_func=forward_step, data_iterator=micro_batches(dataset, 0, mbs),
            model=[chunk], num_microbatches=batches, seq_length=seq, micro_batch_size=mbs, forward_only=True,
        )  # fmt: skip
        return reduce_loss(losses)

    before = {"validation": evaluate(forward_backward, dataset, [chunk], cfg, batches), "ce": training_loss()}
    reference = megatron_token_scores([chunk], rows, vocab_size=200).nll.double().mean().item()
    with torch.no_grad():
        chunk.output_layer.weight[200:] = 5.0
    after = {"validation": evaluate(forward_backward, dataset, [chunk], cfg, batches), "ce": training_loss()}
    return {"before": before, "after": after, "reference": reference}
