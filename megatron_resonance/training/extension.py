"""The context extension's configuration: the ``--load`` checkpoint's model with a new rotary plan and the
paper's continued-pretraining recipe (``finetune/extend_context.py`` describes the rules). ``pipeline``
checks it against a Hugging Face model's conversion before the checkpoint exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from megatron_resonance.errors import CheckpointError, ConfigError
from megatron_resonance.megatron.checkpoint_layout import read_config
from megatron_resonance.megatron.distributed import print_rank0
from megatron_resonance.rope import RopeConfig
from megatron_resonance.training.config import Config, config_from_args, load_yaml, rope_settings_given

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


def make_config(args, stored: Optional[Dict[str, Any]] = None, log=print_rank0) -> Config:
    """The run's Config from the parsed flags ``args``; ``stored``: the ``--load`` checkpoint's model section
    (default: read from it), for a check made before the checkpoint is written."""
    load = args.load
    if load is None and args.config:
        load = (load_yaml(args.config).get("checkpoint") or {}).get("load")
    if not load:
        raise ConfigError("--load is required: the checkpoint whose context to extend")
    if stored is None:
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
    log(
        f"[extend] rope {plan}: original length {original} ({origin}), factor {factor:g} ({how}), "
        f"max_position_embeddings {cfg.model.max_position_embeddings}"
    )
    return cfg
