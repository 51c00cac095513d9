"""Hugging Face ``config.json`` on both sides of the conversion.

Import: ``check_llama`` refuses anything that is not a plain LLaMA decoder before a byte of weights is
read, ``model_config`` reads it into our ``LlamaConfig`` (rope settings included; an unsupported rope type
raises), and ``extension_plan`` records a context-extension plan (``--rope-kind/--rope-factor``).
``model_sizes`` is the architecture's sizes alone, for readers that need no rope (memory estimates).

Export: ``export_config`` writes the model's config, with the rope encoded for stock transformers
(``hf.rope``) and the reference config's other fields (token ids, ...) carried over.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional

import torch

from megatron_resonance.errors import ConversionError
from megatron_resonance.hf.rope import (
    KIND_KEY,
    PLAN_KEY,
    ROPE_KEYS,
    both_styles,
    get,
    rope_config_keys,
    rope_from_hf,
    same_frequencies,
    yarn_reads_differ,
)
from megatron_resonance.megatron.llama import LlamaConfig
from megatron_resonance.rope import KINDS, RopeConfig

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: config.json field -> LlamaConfig field: read by ``from_hf``, written by ``export_config``
FIELDS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "norm_epsilon",
    "initializer_range": "init_method_std",
}
_REQUIRED_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


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
    missing = [
        k
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        )
        if not isinstance(config.get(k), int)
    ]
    if missing:
        raise ConversionError(f"{where}: missing or non-integer {', '.join(missing)}")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, ok) != ok:
            raise ConversionError(f"{where}: {key}={config[key]!r} is not supported (expected {ok!r})")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor {config['partial_rotary_factor']} is not supported")


def model_sizes(config) -> Dict[str, Any]:
    """The ``LlamaConfig`` size fields of a Hugging Face config (dict or transformers object), unchecked;
    KeyError for a missing required one."""
    sizes = {}
    for key in _REQUIRED_SIZES:
        sizes[FIELDS[key]] = get(config, key)
        if sizes[FIELDS[key]] is None:
            raise KeyError(key)
    sizes["num_query_groups"] = get(config, "num_key_value_heads") or sizes["num_attention_heads"]
    sizes["tie_word_embeddings"] = bool(get(config, "tie_word_embeddings", False))
    return sizes


def from_hf(config) -> LlamaConfig:
    """``LlamaConfig`` from a Hugging Face config (dict or transformers object; transformers 4.5x
    ``rope_scaling`` or 5.x ``rope_parameters``). ValueError for a rope type this project cannot carry."""
    sizes = model_sizes(config)
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    head_dim = get(config, "head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"head_dim {head_dim} x heads {heads} != hidden_size {hidden}: not supported")
    return LlamaConfig(
        **sizes,
        max_position_embeddings=get(config, "max_position_embeddings"),
        norm_epsilon=get(config, "rms_norm_eps", 1e-6),
        init_method_std=get(config, "initializer_range", 0.02),
        rope=rope_from_hf(config, head_dim),
    )


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
        rope = RopeConfig(
            kind=kind, head_dim=cfg.head_dim, base=cfg.rope.base, original_max_position=original, factor=float(factor)
        )
    except ValueError as e:
        raise ConversionError(f"--rope-kind {kind} --rope-factor {factor}: {e}") from None
    return dataclasses.replace(cfg, rope=rope, max_position_embeddings=rope.target_max_position)


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


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
            keep_rope = same_frequencies(rope_from_hf(reference, cfg.head_dim), cfg.rope) and (
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
        params = dict(
            out.get("rope_parameters")
            or {**(out.get("rope_scaling") or {}), "rope_theta": out.get("rope_theta", cfg.rope.base)}
        )
        params.setdefault("rope_type", params.pop("type", "default"))
        params.setdefault("rope_theta", out.get("rope_theta", cfg.rope.base))
        for key, value in both_styles(params).items():
            out.setdefault(key, value)  # add the missing style; never rewrite what the source had
        out.setdefault(KIND_KEY, cfg.rope.kind)
        out.setdefault(PLAN_KEY, cfg.rope.to_dict())
    else:
        for key in ROPE_KEYS:
            out.pop(key, None)
        out.update(rope_config_keys(cfg.rope, rope_format, cfg.max_position_embeddings))
    name = dtype_name(dtype)
    out.update({key: getattr(cfg, field) for key, field in FIELDS.items()})
    out.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        dtype=name,
        torch_dtype=name,
    )
    out.setdefault("attention_dropout", 0.0)
    out.setdefault("use_cache", True)
    return dict(sorted(out.items()))
