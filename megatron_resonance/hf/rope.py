"""The rotary embedding in a Hugging Face ``config.json``, both ways, and the named rope type ``megatron_resonance``.

Reading (:func:`rope_from_hf`): transformers 4.5x keeps ``rope_theta`` at the top and scaling in
``rope_scaling``; 5.x moves both into ``rope_parameters``. Both are read. A rope type this project cannot
carry raises, rather than being silently dropped (a common converter bug).

Writing (:func:`rope_config_keys`): a config that *stock* transformers (no custom code, no
trust_remote_code) turns into exactly the model's rotary frequencies and attention factor:

* ``rope``, ``linear``, ``yarn``, ``llama3``: their native rope types;
* ``ntk``: plain RoPE with the NTK base b * s^(d/(d-2)) (which is what static NTK scaling is);
* ``resonance``, ``resonance_yarn``: ``longrope`` with ``short_factor = long_factor = [1/(theta~_i * b^(2i/d))]``
  (transformers computes ``inv_freq_i = 1/(factor_i * b^(2i/d))`` = theta~_i at every length) and
  ``attention_factor`` = the model's m (YaRN's 0.1 ln s + 1, or 1).

Both config styles are written, consistently: transformers 4.5x reads ``rope_scaling`` + top-level
``rope_theta``; 5.x reads ``rope_parameters`` (and prefers a ``rope_scaling`` it finds, to which it adds the
top-level ``rope_theta``). The true plan is recorded beside them as ``megatron_resonance_rope_kind`` and
``megatron_resonance_rope`` (``RopeConfig.to_dict()``). For plans without a native transformers type
(resonance rounding, static NTK) the recorded plan is what is read back, after checking that the encoding
still gives its frequencies (a hand-edited config raises instead of being half-applied).

``rope_format="custom"`` instead names the rope type ``megatron_resonance``, which needs :func:`register` in
every process that loads the model (see ``megatron_resonance.hf``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from megatron_resonance.rope import RopeConfig, compute_frequencies

# transformers (the optional ``hf`` extra, seconds to import) is imported where its rope registry is used.

CUSTOM_ROPE_TYPE = "megatron_resonance"
ROPE_FORMATS = ("longrope", "custom")
KIND_KEY = "megatron_resonance_rope_kind"
PLAN_KEY = "megatron_resonance_rope"
#: every key that describes the rotary embedding; removed from a reference config before re-encoding
ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "original_max_position_embeddings", KIND_KEY, PLAN_KEY)
_HF_TO_KIND = {"default": "rope", "linear": "linear", "yarn": "yarn", "llama3": "llama3"}
_PLAN_ENCODINGS = ("longrope", CUSTOM_ROPE_TYPE)


def get(config, key, default=None):
    """``key`` of a ``config.json`` dict or a transformers config object."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _hf_exponents(head_dim: int) -> torch.Tensor:
    """2i/d as transformers computes it (int64 arange, float32 division)."""
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _stored_plan(config, head_dim: int):
    plan = get(config, PLAN_KEY)
    if plan is None:
        return None
    try:
        return RopeConfig.from_dict({**dict(plan), "head_dim": head_dim})
    except (TypeError, ValueError) as e:
        raise ValueError(f"unreadable megatron_resonance_rope plan: {e}") from None


def _check_encoding(plan: RopeConfig, rope_type: str, merged: dict, theta: float) -> None:
    """The Hugging Face encoding must give the plan's frequencies and attention factor."""
    if rope_type == CUSTOM_ROPE_TYPE:
        return  # the custom type computes the recorded plan itself
    exponents = _hf_exponents(plan.head_dim).double()
    if rope_type == "default":
        inv_freq, attention_factor = 1.0 / float(theta) ** exponents, 1.0
    elif rope_type == "longrope":
        short, long_ = merged.get("short_factor"), merged.get("long_factor")
        if short is None or list(short) != list(long_ or []) or len(short) != plan.head_dim // 2:
            raise ValueError("longrope short_factor and long_factor must be equal, with head_dim/2 entries")
        inv_freq = 1.0 / (torch.tensor(short, dtype=torch.float64) * float(theta) ** exponents)
        attention_factor = float(merged.get("attention_factor") or 1.0)
    else:
        raise ValueError(f"rope type {rope_type!r} cannot encode the recorded {plan.kind} plan")
    expected = compute_frequencies(plan)
    if not torch.allclose(inv_freq, expected.inv_freq, rtol=1e-6, atol=0) or not math.isclose(
        attention_factor, expected.attention_factor, rel_tol=1e-9
    ):
        raise ValueError(
            f"rope settings ({rope_type}) disagree with the recorded megatron_resonance_rope {plan.kind} plan"
        )


def rope_from_hf(config, head_dim: int) -> RopeConfig:
    """The ``RopeConfig`` of a Hugging Face config (dict or transformers object); ValueError for a rope type
    this project cannot carry."""
    params = dict(get(config, "rope_parameters") or {})
    scaling = dict(get(config, "rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", get(config, "rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    stored_kind = get(config, KIND_KEY)
    max_pos = get(config, "max_position_embeddings")
    original = merged.get("original_max_position_embeddings") or get(config, "original_max_position_embeddings")
    original = original or max_pos
    plan = _stored_plan(config, head_dim)
    if plan is None and (stored_kind in ("ntk", "resonance", "resonance_yarn") or rope_type == CUSTOM_ROPE_TYPE):
        raise ValueError(f"rope kind {stored_kind or rope_type} recorded without its megatron_resonance_rope plan")
    if plan is not None and (rope_type in _PLAN_ENCODINGS or plan.resonance or plan.kind == "ntk"):
        # our own export of a plan without a native transformers type: the recorded plan is the truth
        _check_encoding(plan, rope_type, merged, theta)
        return plan
    if rope_type not in _HF_TO_KIND:
        raise ValueError(f"unsupported Hugging Face rope type {rope_type!r} (supported: {', '.join(_HF_TO_KIND)})")
    kind = _HF_TO_KIND[rope_type]
    kwargs = dict(kind=kind, head_dim=head_dim, base=float(theta), original_max_position=int(original))
    if kind != "rope":
        kwargs["factor"] = float(merged["factor"])
    if kind == "yarn":
        if merged.get("truncate", True) is False:
            raise ValueError("yarn with truncate=false is not supported")
        kwargs["beta_fast"] = float(merged.get("beta_fast") or 32.0)
        kwargs["beta_slow"] = float(merged.get("beta_slow") or 1.0)
        if merged.get("attention_factor") is not None:
            kwargs["attention_factor"] = float(merged["attention_factor"])
        elif merged.get("mscale") and merged.get("mscale_all_dim"):
            # transformers: attention factor = get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)
            s = kwargs["factor"]

            def get_mscale(m: float) -> float:
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

            kwargs["attention_factor"] = get_mscale(float(merged["mscale"])) / get_mscale(
                float(merged["mscale_all_dim"])
            )
    if kind == "llama3":
        kwargs["low_freq_factor"] = float(merged.get("low_freq_factor", 1.0))
        kwargs["high_freq_factor"] = float(merged.get("high_freq_factor", 4.0))
    return RopeConfig(**kwargs)


def same_frequencies(a: RopeConfig, b: RopeConfig) -> bool:
    fa, fb = compute_frequencies(a), compute_frequencies(b)
    return torch.equal(fa.inv_freq, fb.inv_freq) and fa.attention_factor == fb.attention_factor


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def yarn_reads_differ(factor: Optional[float], original: int, max_position: Optional[int]) -> bool:
    """Whether transformers versions read a native ``yarn`` config differently: 4.5x takes the factor as
    max_position_embeddings / original_max_position_embeddings whenever the original is given, 5.x takes
    ``factor``. They agree only when max_position_embeddings = original x factor."""
    return max_position is not None and factor is not None and max_position != round(original * factor)


def rope_parameters(
    rope: RopeConfig, rope_format: str = "longrope", max_position: Optional[int] = None
) -> Dict[str, Any]:
    """transformers 5.x ``rope_parameters`` (``rope_theta`` inside) encoding ``rope`` exactly, as every
    transformers version reads it for a model of length ``max_position``. ValueError for an unknown format."""
    if rope_format not in ROPE_FORMATS:
        raise ValueError(f"unknown rope format {rope_format!r}; expected one of {', '.join(ROPE_FORMATS)}")
    base, L = rope.base, rope.original_max_position
    freqs = compute_frequencies(rope)
    # resonance rounding (on any kind) and static NTK have no native transformers type; nor has a YaRN
    # whose length is not original x factor (versions disagree on its factor) or whose correction range is
    # taken at another length (transformers has no key for it): per-feature encodings
    kind = "per_feature" if rope.resonance else rope.kind
    if kind == "yarn" and (yarn_reads_differ(rope.factor, L, max_position) or rope.correction_length not in (None, L)):
        kind = "per_feature"
    if kind == "rope":
        return {"rope_type": "default", "rope_theta": base}
    if kind == "linear":
        return {"rope_type": "linear", "factor": rope.factor, "rope_theta": base}
    if kind == "yarn":
        params = {
            "rope_type": "yarn",
            "factor": rope.factor,
            "original_max_position_embeddings": L,
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
            "rope_theta": base,
        }
        if rope.attention_factor is not None:
            params["attention_factor"] = rope.attention_factor
        return params
    if kind == "llama3":
        return {
            "rope_type": "llama3",
            "factor": rope.factor,
            "original_max_position_embeddings": L,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "rope_theta": base,
        }
    if rope_format == "custom":
        return {
            "rope_type": CUSTOM_ROPE_TYPE,
            "factor": rope.factor,
            "original_max_position_embeddings": L,
            "attention_factor": freqs.attention_factor,
            "rope_theta": base,
        }
    if kind == "ntk":
        d = rope.head_dim  # head_dim 2: the one feature has theta = 1 whatever the base
        return {"rope_type": "default", "rope_theta": base * rope.factor ** (d / (d - 2)) if d > 2 else base}
    # resonance rounding over any kind: per-feature factors through longrope
    ext = 1.0 / (freqs.inv_freq * base ** _hf_exponents(rope.head_dim).double())
    factors = [float(x) for x in ext]
    return {
        "rope_type": "longrope",
        "short_factor": factors,
        "long_factor": list(factors),
        "factor": rope.factor,
        "original_max_position_embeddings": L,
        "attention_factor": freqs.attention_factor,
        "rope_theta": base,
    }


def both_styles(params: Dict[str, Any]) -> Dict[str, Any]:
    """rope_parameters (5.x) -> also rope_scaling + rope_theta (4.5x), consistent with each other."""
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {
        "rope_theta": params["rope_theta"],
        "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling,
        "rope_parameters": dict(params),
    }


def rope_config_keys(
    rope: RopeConfig, rope_format: str = "longrope", max_position: Optional[int] = None
) -> Dict[str, Any]:
    """Every rope key of an exported config.json: both transformers styles plus the recorded plan."""
    params = rope_parameters(rope, rope_format, max_position)
    return both_styles(params) | {KIND_KEY: rope.kind, PLAN_KEY: rope.to_dict()}


# ----------------------------------------------------------------------------------------------------------
# The named rope type, for transformers
# ----------------------------------------------------------------------------------------------------------


def _plan(config) -> RopeConfig:
    plan = getattr(config, PLAN_KEY, None)
    if plan is None:
        raise ValueError(f"rope type {CUSTOM_ROPE_TYPE!r} needs the megatron_resonance_rope plan in config.json")
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

    rope_utils.ROPE_INIT_FUNCTIONS[CUSTOM_ROPE_TYPE] = compute_megatron_resonance_parameters
    mixin = getattr(rope_utils, "RotaryEmbeddingConfigMixin", None)  # 5.x: validators are mixin methods
    if mixin is not None:
        setattr(mixin, f"_validate_{CUSTOM_ROPE_TYPE}_rope_parameters", _validate)
    validators = getattr(rope_utils, "ROPE_VALIDATION_FUNCTIONS", None)  # 4.5x: a dict of functions
    if isinstance(validators, dict):
        validators[CUSTOM_ROPE_TYPE] = lambda config, ignore_keys=None: None
