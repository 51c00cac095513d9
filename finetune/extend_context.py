"""Extend a model's context by continued pretraining with a new rotary plan (Resonance YaRN by default).

    python finetune/extend_context.py --nproc-per-node 2 --load outputs/demo/ckpt/pretrain \
        --seq-length 512 --rope-kind resonance_yarn --save outputs/demo/ckpt/resonance_yarn \
        --data-path outputs/demo/data/train_text_document --tokenizer-model outputs/demo/tokenizer.model

    # the paper's LLaMA-2 7B 4K -> 32K run, one torchrun per node:
    torchrun ... finetune/extend_context.py --config configs/llama2_7b_4k_to_32k_resonance_yarn.yaml ...

The model comes from `--load` (a pretrained checkpoint or one converted from Hugging Face). Its stored
length becomes the original length L (override: --original-max-position); the target length L' is
--seq-length; the factor s = L'/L (override: --rope-factor). A source that already carries scaling (a
Llama-3.1 `llama3` checkpoint, a YaRN model) keeps its plan and original length, and its factor grows
with the length; switching it to another kind is refused, since that would drop the scaling.
Optimizer, scheduler and iteration count start fresh (paper recipe: AdamW, lr 2e-5, weight decay 0.01,
5 % warm-up). A requeued job resumes from --save.
"""

import dataclasses
import sys

from megatron_resonance.training import preemption

if __name__ == "__main__":  # first: a preemption signal during the seconds of imports is recorded, not fatal
    preemption.install()

from megatron_resonance.megatron.checkpointing import CheckpointError, read_config  # noqa: E402
from megatron_resonance.megatron.distributed import print_rank0  # noqa: E402
from megatron_resonance.rope import RopeConfig  # noqa: E402
from megatron_resonance.training import launch  # noqa: E402
from megatron_resonance.training.config import ConfigError, config_from_args, load_yaml, rope_settings_given  # noqa: E402

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
    source = RopeConfig.from_dict(stored["rope"])
    given = rope_settings_given(args)
    scaled = source.base_kind != "rope" and source.factor > 1
    # An unscaled source starts a new plan (Resonance YaRN by default); a scaled one keeps its own plan's
    # settings (base, correction ranges, original length) and only its factor grows.
    carried = source.to_dict() if scaled else {"base": source.base}
    for key in ("head_dim", "resonance"):  # the head dim comes from the shape; resonance goes with the kind
        carried.pop(key, None)
    carried["kind"] = "resonance_yarn"
    base = {**PAPER_DEFAULTS, "model": {**stored, "rope": carried}}
    cfg = config_from_args(args, base=base)
    rope = cfg.model.rope
    if scaled and rope.base_kind != source.base_kind:
        raise ConfigError(
            f"--load {load} already carries {source.base_kind} rope scaling (factor {source.factor:g} over "
            f"original length {source.original_max_position}); {rope.kind} would drop it: extend it with "
            f"--rope-kind {source.base_kind} (optionally --resonance), or start from an unscaled checkpoint"
        )
    if "original_max_position" in given:
        original, origin = rope.original_max_position, "given"
    elif scaled:
        original, origin = source.original_max_position, "the source's original length"
    else:
        original, origin = stored["max_position_embeddings"], "the stored length"
    target = cfg.data.seq_length
    # The length the source already reaches: its stored length (for a scaled source, e.g. Llama-3.1's
    # 131072 = 16 x 8192 at factor 8, not always original x factor).
    reach = stored["max_position_embeddings"]
    if "factor" in given:
        factor, how = rope.factor, "given"
    elif target <= reach:
        raise ConfigError(f"--seq-length {target} does not extend the stored length {reach}")
    elif scaled:  # the scaling grows with the length
        factor, how = source.factor * target / reach, f"{source.factor:g} x {target} / {reach}"
    else:
        factor, how = target / original, f"{target} / {original}"
    cfg.model.rope = dataclasses.replace(rope, original_max_position=original, factor=factor)
    cfg.model.max_position_embeddings = max(target, cfg.model.rope.target_max_position)
    cfg.checkpoint.load = load
    cfg.checkpoint.finetune = True
    new = cfg.model.rope
    plan = new.kind + (" + resonance" if new.resonance and new.base_kind == new.kind else "")
    print_rank0(
        f"[extend] rope {plan}: original length {original} ({origin}), factor {factor:g} ({how}), "
        f"max_position_embeddings {cfg.model.max_position_embeddings}"
    )
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
