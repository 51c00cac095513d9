"""The model a run trains: the provider's GPTModel chunks (our rotary) in megatron DDP, megatron's optimizer
and the warm-up + decay scheduler (:func:`build_model_and_optimizer`, also PosGen's), and the weights-only
load of a finetune start.

megatron.core is imported where it is used: it is heavy, and PosGen's cells import this module before they
build a model.
"""

from __future__ import annotations

import torch

from megatron_resonance.config_fields import same_named
from megatron_resonance.megatron import checkpointing
from megatron_resonance.megatron.llama import build_model, for_training
from megatron_resonance.training.config import Config, recompute_settings, warmup_iters

# megatron.core (seconds to import) is imported inside the functions that use it: the entry points' --help and config
# checks run without it.


def build_model_and_optimizer(cfg: Config, bf16: bool):
    """The model provider's chunks in the training wrapper (megatron DDP); megatron's optimizer (distributed
    unless ``--no-use-distributed-optimizer``); warm-up + decay scheduler."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dtype = torch.bfloat16 if bf16 else torch.float32
    chunks = build_model(
        cfg.model,
        dtype=dtype,
        spec=cfg.parallel.transformer_impl,
        seq_length=cfg.data.seq_length,
        sequence_parallel=cfg.parallel.sequence_parallel,
        per_token_loss=True,
        recompute=recompute_settings(cfg.parallel),
    )
    tf_config = chunks[0].config
    o = cfg.optimizer
    chunks = for_training(chunks, use_distributed_optimizer=o.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            **same_named(o, "optimizer lr min_lr weight_decay adam_beta1 adam_beta2 adam_eps clip_grad"),
            bf16=bf16,
            params_dtype=dtype,
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        chunks,
    )
    gbs, iters = cfg.data.global_batch_size, cfg.training.train_iters
    warmup = warmup_iters(cfg)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup * gbs,
        lr_decay_steps=(o.lr_decay_iters or iters) * gbs,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=iters * gbs,
        wd_incr_style="constant",
    )
    use_fused_torch_adam(optimizer)
    # megatron's schedules call these: DP gradient reduction (scaled by the global token count).
    tf_config.finalize_model_grads_func = finalize_model_grads
    tf_config.grad_scale_func = optimizer.scale_loss
    return chunks, optimizer, scheduler, tf_config


def use_fused_torch_adam(optimizer) -> None:
    """Run torch's Adam/AdamW, megatron's fallback without TE/Apex, with its fused kernel.

    megatron uses TE's or Apex's FusedAdam when one is installed (left alone here) and falls back to plain
    ``torch.optim.AdamW`` otherwise: ~10 ops per parameter on CPU, a multi-tensor ``foreach`` loop on
    CUDA. torch's fused kernel (CPU and CUDA) is the same update in one pass, and Hugging Face Trainer's
    default (``adamw_torch_fused``). Called after building and again after loading a checkpoint, whose
    param groups replace ours."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
    checkpointing.place_adam_steps(optimizer)


def load_weights_only(path: str, chunks, optimizer) -> dict:
    """Load a checkpoint's model weights into a freshly built model and optimizer (finetuning).

    With bf16/fp16 the optimizer holds fp32 main copies of the weights, taken when it was built: they
    are refreshed from the loaded weights here, or the first step would write the random initialization
    back into the model (Megatron-LM's ``reload_model_params`` after a ``--finetune`` load)."""
    info = checkpointing.load_checkpoint(path, chunks)
    optimizer.reload_model_params()
    return info
