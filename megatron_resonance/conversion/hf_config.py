"""Hugging Face ``config.json`` on both sides of the conversion.

Import: ``check_llama`` refuses anything that is not a plain LLaMA decoder before a byte of weights is
read, ``model_config`` reads it into our ``LlamaConfig`` (rope settings included; an unsupported rope type
raises), and ``extension_plan`` records a context-extension plan (``--rope-kind/--rope-factor``).

Export: ``export_config`` writes a config that *stock* transformers (no custom code, no
trust_remote_code) turns into exactly the model's rotary frequencies and attention factor:

* ``rope``, ``linear``, ``yarn``, ``llama3``: their native rope types;
* ``ntk``: plain RoPE with the NTK base b * s^(d/(d-2)) (which is what static NTK scaling is);
* ``resonance``, ``resonance_yarn``: ``longrope`` with ``short_factor = long_factor = [1/(theta~_i * b^(2i/d))]``
  (transformers computes ``inv_freq_i = 1/(factor_i * b^(2i/d))`` = theta~_i at every length) and
  ``attention_factor`` = the model's m (YaRN's 0.1 ln s + 1, or 1).

Both config styles are written, consistently: transformers 4.5x reads ``rope_scaling`` + top-level
``rope_theta``; 5.x reads ``rope_parameters`` (and prefers a ``rope_scaling`` it finds, to which it adds the
top-level ``rope_theta``). The true plan is recorded beside them as ``megatron_resonance_rope_kind`` and
``megatron_resonance_rope`` (``RopeConfig.to_dict()``), which ``hf_rope.rope_from_hf`` reads back.
``rope_format="custom"`` instead names the rope type ``megatron_resonance``, which needs
``megatron_resonance.hf.register()`` in every process that loads the model.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional

import torch

from megatron_resonance import hf_rope
from megatron_resonance.conversion.errors import ConversionError
from megatron_resonance.megatron.llama import LlamaConfig, from_hf
from megatron_resonance.rope import KINDS, RopeConfig, compute_frequencies

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
ROPE_FORMATS = ("longrope", "custom")
CUSTOM_ROPE_TYPE = hf_rope.CUSTOM_ROPE_TYPE
KIND_KEY = "megatron_resonance_rope_kind"
PLAN_KEY = "megatron_resonance_rope"
#: every key that describes the rotary embedding; removed from a reference config before re-encoding
ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "original_max_position_embeddings", KIND_KEY,
             PLAN_KEY)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ----------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------


def check_llama(config: Dict[str, Any], where: str) -> None:
    """Raise unless ``config`` describes a LLaMA decoder this converter carries exactly."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if archs and ARCHITECTURE not in archs:
        raise ConversionError(f"{where}: architectures {archs} is not a LLaMA model ({ARCHITECTURE})")
    if model_type is not None and model_type != MODEL_TYPE:
        raise ConversionError(f"{where}: model_type {model_type!r} is not a LLaMA model ({MODEL_TYPE!r})")
    if not archs and model_type is None:
        raise ConversionError(f"{where}: neither architectures nor model_type is set; expected a LLaMA config")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size", "max_position_embeddings") if not isinstance(config.get(k), int)]
    if missing:
        raise ConversionError(f"{where}: missing or non-integer {', '.join(missing)}")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, ok) != ok:
            raise ConversionError(f"{where}: {key}={config[key]!r} is not supported (expected {ok!r})")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor {config['partial_rotary_factor']} is not supported")


def model_config(config: Dict[str, Any], where: str) -> LlamaConfig:
    """Our ``LlamaConfig`` from a checked Hugging Face config (unsupported rope settings raise)."""
    check_llama(config, where)
    try:
        return from_hf(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def original_max_position(config: Dict[str, Any]) -> int:
    """The pre-training length: ``original_max_position_embeddings`` if present, else ``max_position_embeddings``."""
    for block in (config.get("rope_parameters"), config.get("rope_scaling"), config):
        if isinstance(block, dict) and block.get("original_max_position_embeddings"):
            return int(block["original_max_position_embeddings"])
    return int(config["max_position_embeddings"])


def extension_plan(cfg: LlamaConfig, hf_config: Dict[str, Any], kind: str, factor: float) -> LlamaConfig:
    """``cfg`` with the rope plan replaced by ``kind`` at scale ``factor`` over the original length, and
    ``max_position_embeddings`` set to the target length original x factor."""
    if kind not in KINDS:
        raise ConversionError(f"unknown --rope-kind {kind!r}; expected one of {', '.join(KINDS)}")
    original = original_max_position(hf_config)
    try:
        rope = RopeConfig(kind=kind, head_dim=cfg.head_dim, base=cfg.rope.base, original_max_position=original,
                          factor=float(factor))
    except ValueError as e:
        raise ConversionError(f"--rope-kind {kind} --rope-factor {factor}: {e}") from None
    return dataclasses.replace(cfg, rope=rope, max_position_embeddings=rope.target_max_position)


# ----------------------------------------------------------------------------------------------------------
# Export: rope encoding
# ----------------------------------------------------------------------------------------------------------


def _hf_exponents(head_dim: int) -> torch.Tensor:
    """2i/d as transformers computes it (int64 arange, float32 division)."""
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


def yarn_reads_differ(factor: Optional[float], original: int, max_position: Optional[int]) -> bool:
    """Whether transformers versions read a native ``yarn`` config differently: 4.5x takes the factor as
    max_position_embeddings / original_max_position_embeddings whenever the original is given, 5.x takes
    ``factor``. They agree only when max_position_embeddings = original x factor."""
    return max_position is not None and factor is not None and max_position != round(original * factor)


def rope_parameters(
    rope: RopeConfig, rope_format: str = "longrope", max_position: Optional[int] = None
) -> Dict[str, Any]:
    """transformers 5.x ``rope_parameters`` (``rope_theta`` inside) encoding ``rope`` exactly, as every
    transformers version reads it for a model of length ``max_position``."""
    if rope_format not in ROPE_FORMATS:
        raise ConversionError(f"unknown rope format {rope_format!r}; expected one of {', '.join(ROPE_FORMATS)}")
    base, L = rope.base, rope.original_max_position
    freqs = compute_frequencies(rope)
    # resonance rounding (on any kind) and static NTK have no native transformers type; nor has a YaRN
    # whose length is not original x factor (versions disagree on its factor): per-feature encodings
    kind = "per_feature" if rope.resonance else rope.kind
    if kind == "yarn" and yarn_reads_differ(rope.factor, L, max_position):
        kind = "per_feature"
    if kind == "rope":
        return {"rope_type": "default", "rope_theta": base}
    if kind == "linear":
        return {"rope_type": "linear", "factor": rope.factor, "rope_theta": base}
    if kind == "yarn":
        params = {"rope_type": "yarn", "factor": rope.factor, "original_max_position_embeddings": L,
                  "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow, "rope_theta": base}
        if rope.attention_factor is not None:
            params["attention_factor"] = rope.attention_factor
        return params
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": rope.factor, "original_max_position_embeddings": L,
                "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
                "rope_theta": base}
    if rope_format == "custom":
        return {"rope_type": CUSTOM_ROPE_TYPE, "factor": rope.factor, "original_max_position_embeddings": L,
                "attention_factor": freqs.attention_factor, "rope_theta": base}
    if kind == "ntk":
        d = rope.head_dim  # head_dim 2: the one feature has theta = 1 whatever the base
        return {"rope_type": "default", "rope_theta": base * rope.factor ** (d / (d - 2)) if d > 2 else base}
    # resonance rounding over any kind: per-feature factors through longrope
    ext = 1.0 / (freqs.inv_freq * base ** _hf_exponents(rope.head_dim).double())
    factors = [float(x) for x in ext]
    return {"rope_type": "longrope", "short_factor": factors, "long_factor": list(factors),
            "factor": rope.factor, "original_max_position_embeddings": L,
            "attention_factor": freqs.attention_factor, "rope_theta": base}


def rope_config_keys(
    rope: RopeConfig, rope_format: str = "longrope", max_position: Optional[int] = None
) -> Dict[str, Any]:
    """Every rope key of an exported config.json: both transformers styles plus the recorded plan."""
    params = rope_parameters(rope, rope_format, max_position)
    return _both_styles(params) | {KIND_KEY: rope.kind, PLAN_KEY: rope.to_dict()}


def _both_styles(params: Dict[str, Any]) -> Dict[str, Any]:
    """rope_parameters (5.x) -> also rope_scaling + rope_theta (4.5x), consistent with each other."""
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {
        "rope_theta": params["rope_theta"],
        "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling,
        "rope_parameters": dict(params),
    }


def _same_frequencies(a: RopeConfig, b: RopeConfig) -> bool:
    fa, fb = compute_frequencies(a), compute_frequencies(b)
    return torch.equal(fa.inv_freq, fb.inv_freq) and fa.attention_factor == fb.attention_factor


def export_config(
    cfg: LlamaConfig,
    dtype: torch.dtype,
    rope_format: str = "longrope",
    reference: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """config.json for ``cfg``. ``reference`` (the source model's config.json, kept by the importer) donates
    every non-architecture field (token ids, ...); its rope keys are kept verbatim when they encode exactly
    the model's frequencies (so an untouched model round-trips field for field), else re-encoded."""
    out: Dict[str, Any] = copy.deepcopy(reference) if reference else {}
    out.pop("transformers_version", None)
    keep_rope = False
    if reference and out.get("max_position_embeddings") == cfg.max_position_embeddings:
        try:
            keep_rope = _same_frequencies(hf_rope.rope_from_hf(reference, cfg.head_dim), cfg.rope) and (
                reference.get(KIND_KEY) in (None, cfg.rope.kind)
            )
        except (ValueError, KeyError, TypeError):
            keep_rope = False
        kept = {**(out.get("rope_scaling") or {}), **(out.get("rope_parameters") or {})}
        ambiguous = kept.get("rope_type", kept.get("type")) == "yarn" and yarn_reads_differ(
            kept.get("factor"), kept.get("original_max_position_embeddings") or 0, cfg.max_position_embeddings
        )
        keep_rope = keep_rope and rope_format == "longrope" and not ambiguous
    if keep_rope:
        params = dict(out.get("rope_parameters") or {**(out.get("rope_scaling") or {}),
                                                       "rope_theta": out.get("rope_theta", cfg.rope.base)})
        params.setdefault("rope_type", params.pop("type", "default"))
        params.setdefault("rope_theta", out.get("rope_theta", cfg.rope.base))
        for key, value in _both_styles(params).items():
            out.setdefault(key, value)  # add the missing style; never rewrite what the source had
        out.setdefault(KIND_KEY, cfg.rope.kind)
        out.setdefault(PLAN_KEY, cfg.rope.to_dict())
    else:
        for key in ROPE_KEYS:
            out.pop(key, None)
        out.update(rope_config_keys(cfg.rope, rope_format, cfg.max_position_embeddings))
    name = dtype_name(dtype)
    out.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_method_std,
        dtype=name,
        torch_dtype=name,
    )
    out.setdefault("attention_dropout", 0.0)
    out.setdefault("use_cache", True)
    return dict(sorted(out.items()))
