"""Extend a model's context by continued pretraining with a new rotary plan (Resonance YaRN by default).

    python finetune/extend_context.py --nproc-per-node 2 --load outputs/demo/ckpt/pretrain \
        --seq-length 512 --rope-kind resonance_yarn --save outputs/demo/ckpt/resonance_yarn \
        --data-path outputs/demo/data/train_text_document --tokenizer-model outputs/demo/tokenizer.model

    # the paper's LLaMA-2 7B 4K -> 32K run, one torchrun per node:
    torchrun ... finetune/extend_context.py --config configs/llama2_7b_4k_to_32k_resonance_yarn.yaml ...

The model comes from `--load` (a pretrained checkpoint or one converted from Hugging Face). Its stored
length becomes the original length L (override: --original-max-position); the target length L' is
--seq-length; the factor s = L'/L (override: --rope-factor). Optimizer, scheduler and iteration count start
fresh (paper recipe: AdamW, lr 2e-5, weight decay 0.01, 5 % warm-up). A requeued job resumes from --save.
"""

import sys

from megatron_resonance.megatron.checkpointing import CheckpointError, read_config
from megatron_resonance.training import launch
from megatron_resonance.training.config import ConfigError, config_from_args, load_yaml

#: the paper's continued-pretraining recipe for LLaMA-2 (Wang et al., 2024, after YaRN)
PAPER_DEFAULTS = {
    "optimizer": {
        "lr": 2e-5,
        "min_lr": 2e-5,
        "weight_decay": 0.01,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "lr_warmup_fraction": 0.05,
        "lr_decay_style": "constant",
    },
    "checkpoint": {"finetune": True},
}


def make_config(args):
    load = args.load
    if load is None and args.config:
        load = (load_yaml(args.config).get("checkpoint") or {}).get("load")
    if not load:
        raise ConfigError("--load is required: the checkpoint whose context to extend")
    try:
        stored = read_config(load)["model"]
    except CheckpointError as e:
        raise ConfigError(f"--load {load}: {e}") from None
    stored_rope = dict(stored["rope"])
    base = {**PAPER_DEFAULTS, "model": {**stored, "rope": {"kind": "resonance_yarn", "base": stored_rope["base"]}}}
    cfg = config_from_args(args, base=base)
    original = args.original_max_position or stored["max_position_embeddings"]
    target = cfg.data.seq_length
    if target <= original and args.rope_factor is None:
        raise ConfigError(f"--seq-length {target} does not extend the stored length {original}")
    factor = args.rope_factor if args.rope_factor is not None else target / original
    import dataclasses

    cfg.model.rope = dataclasses.replace(cfg.model.rope, original_max_position=original, factor=factor)
    cfg.model.max_position_embeddings = max(target, int(round(original * factor)))
    cfg.checkpoint.load = load
    cfg.checkpoint.finetune = True
    return cfg


if __name__ == "__main__":
    sys.exit(
        launch.main(
            __file__,
            "extend_context.py",
            "Extend a model's context with a new rotary plan (continued pretraining).",
            make_config,
        )
    )
