"""Reading a Hugging Face LLaMA config's rotary settings into a ``RopeConfig``.

transformers 4.5x keeps ``rope_theta`` at the top and scaling in ``rope_scaling``; 5.x moves both into
``rope_parameters``. Both are read. A rope type this project cannot carry raises, rather than being
silently dropped (a common converter bug).
"""

from __future__ import annotations

from megatron_resonance.rope import RopeConfig

_HF_TO_KIND = {"default": "rope", "linear": "linear", "yarn": "yarn", "llama3": "llama3"}


def _get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def rope_from_hf(config, head_dim: int) -> RopeConfig:
    params = dict(_get(config, "rope_parameters") or {})
    scaling = dict(_get(config, "rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", _get(config, "rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    stored_kind = _get(config, "megatron_resonance_rope_kind")
    max_pos = _get(config, "max_position_embeddings")
    original = merged.get("original_max_position_embeddings") or max_pos
    if stored_kind in ("resonance", "resonance_yarn"):
        # our own export: the true plan is recorded beside the portable longrope encoding
        plan = dict(_get(config, "megatron_resonance_rope"))
        return RopeConfig.from_dict(plan)
    if rope_type not in _HF_TO_KIND:
        raise ValueError(f"unsupported Hugging Face rope type {rope_type!r} (supported: {', '.join(_HF_TO_KIND)})")
    kind = _HF_TO_KIND[rope_type]
    kwargs = dict(kind=kind, head_dim=head_dim, base=float(theta), original_max_position=int(original))
    if kind != "rope":
        kwargs["factor"] = float(merged["factor"])
    if kind == "yarn":
        kwargs["beta_fast"] = float(merged.get("beta_fast") or 32.0)
        kwargs["beta_slow"] = float(merged.get("beta_slow") or 1.0)
        if merged.get("attention_factor") is not None:
            kwargs["attention_factor"] = float(merged["attention_factor"])
    if kind == "llama3":
        kwargs["low_freq_factor"] = float(merged.get("low_freq_factor", 1.0))
        kwargs["high_freq_factor"] = float(merged.get("high_freq_factor", 4.0))
    return RopeConfig(**kwargs)
