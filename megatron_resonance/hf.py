"""Named rope type for Hugging Face transformers: ``megatron_resonance`` (exports with ``--rope-format custom``).

The default export needs nothing from this module: it encodes every plan with transformers' own rope
types (resonance through ``longrope``). Those who prefer the plan spelled out by name export with
``--rope-format custom`` and call ``register()`` before loading, in every process that loads the model::

    import megatron_resonance.hf
    megatron_resonance.hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained("exported/")

A process that did not register fails with ``KeyError: 'megatron_resonance'`` (vLLM, lm-eval, ...).
The frequencies come from ``megatron_resonance.rope`` and the plan recorded in the config
(``megatron_resonance_rope``): the same float64 computation as the Megatron model, rounded to float32.
"""

from __future__ import annotations

import torch

from megatron_resonance.hf_rope import CUSTOM_ROPE_TYPE
from megatron_resonance.rope import RopeConfig, compute_frequencies

ROPE_TYPE = CUSTOM_ROPE_TYPE


def _plan(config) -> RopeConfig:
    plan = getattr(config, "megatron_resonance_rope", None)
    if plan is None:
        raise ValueError(f"rope type {ROPE_TYPE!r} needs the megatron_resonance_rope plan in config.json")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return RopeConfig.from_dict({**dict(plan), "head_dim": head_dim})


def compute_megatron_resonance_parameters(config, device=None, seq_len=None, layer_type=None, **kwargs):
    """transformers rope init function: (inv_freq float32 [head_dim/2], attention_factor)."""
    freqs = compute_frequencies(_plan(config))
    return freqs.inv_freq.to(device=device, dtype=torch.float32), freqs.attention_factor


def _validate(self, rope_parameters=None, ignore_keys=None, *args, **kwargs):
    """No-op validator (silences transformers' 'missing validation function' warning)."""


def register() -> None:
    """Register ``megatron_resonance`` in transformers' ``ROPE_INIT_FUNCTIONS`` (4.5x and 5.x). Idempotent."""
    from transformers import modeling_rope_utils as rope_utils

    rope_utils.ROPE_INIT_FUNCTIONS[ROPE_TYPE] = compute_megatron_resonance_parameters
    mixin = getattr(rope_utils, "RotaryEmbeddingConfigMixin", None)  # 5.x: validators are mixin methods
    if mixin is not None:
        setattr(mixin, f"_validate_{ROPE_TYPE}_rope_parameters", _validate)
    validators = getattr(rope_utils, "ROPE_VALIDATION_FUNCTIONS", None)  # 4.5x: a dict of functions
    if isinstance(validators, dict):
        validators[ROPE_TYPE] = lambda config, ignore_keys=None: None
