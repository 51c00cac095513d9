"""Reading a Hugging Face LLaMA config's rotary settings into a ``RopeConfig``.

transformers 4.5x keeps ``rope_theta`` at the top and scaling in ``rope_scaling``; 5.x moves both into
``rope_parameters``. Both are read. A rope type this project cannot carry raises, rather than being
silently dropped (a common converter bug).

Our own exports record the true plan as ``megatron_resonance_rope_kind`` + ``megatron_resonance_rope``
(``RopeConfig.to_dict()``). Plans without a native transformers type (resonance rounding, static NTK) are
encoded as ``longrope`` per-feature factors, plain RoPE with the NTK base, or the custom
``megatron_resonance`` type; for those the recorded plan is read back, after checking that the encoding
still gives its frequencies (a hand-edited config raises instead of being half-applied).
"""

from __future__ import annotations

import math

import torch

from megatron_resonance.rope import RopeConfig, compute_frequencies

_HF_TO_KIND = {"default": "rope", "linear": "linear", "yarn": "yarn", "llama3": "llama3"}
CUSTOM_ROPE_TYPE = "megatron_resonance"
_PLAN_ENCODINGS = ("longrope", CUSTOM_ROPE_TYPE)


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _stored_plan(config, head_dim: int):
    plan = _get(config, "megatron_resonance_rope")
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
    exponents = (torch.arange(0, plan.head_dim, 2, dtype=torch.int64).float() / plan.head_dim).double()
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
    params = dict(_get(config, "rope_parameters") or {})
    scaling = dict(_get(config, "rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", _get(config, "rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    stored_kind = _get(config, "megatron_resonance_rope_kind")
    max_pos = _get(config, "max_position_embeddings")
    original = merged.get("original_max_position_embeddings") or _get(config, "original_max_position_embeddings")
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
