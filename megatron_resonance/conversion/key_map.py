"""The LLaMA key map: which Hugging Face tensors make which Megatron-Core parameter, and how.

Declarative, in the style of Megatron-Bridge: one ``KeyMapping`` per parameter kind, ``*`` standing for
the layer index, and a named transform from ``transforms.TRANSFORMS``. ``expand`` turns the map into the
concrete list of ``Param`` for one model, in Hugging Face module order (the order the exporter writes).

Megatron keys are those of a TP=1, PP=1 ``GPTModel`` built with the local layer spec; dist checkpoints are
layout-independent, so the converted checkpoint loads at any TP/PP (and with the TE spec, whose fused
layer-norm keys megatron maps onto the same checkpoint keys).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

from megatron_resonance.conversion.transforms import TRANSFORMS, Transform
from megatron_resonance.megatron.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One Megatron parameter pattern, its Hugging Face source pattern(s) and the transform between them."""

    megatron: str
    hf: Tuple[str, ...]
    transform: str = "copy"
    untied_only: bool = False
    """Only present when input embedding and output layer are separate (``lm_head``)."""


LLAMA_KEY_MAP: Tuple[KeyMapping, ...] = (
    KeyMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    KeyMapping(
        "decoder.layers.*.self_attention.linear_qkv.weight",
        (
            "model.layers.*.self_attn.q_proj.weight",
            "model.layers.*.self_attn.k_proj.weight",
            "model.layers.*.self_attn.v_proj.weight",
        ),
        "qkv",
    ),
    KeyMapping("decoder.layers.*.self_attention.linear_proj.weight", ("model.layers.*.self_attn.o_proj.weight",)),
    KeyMapping(
        "decoder.layers.*.mlp.linear_fc1.weight",
        ("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"),
        "gate_up",
    ),
    KeyMapping("decoder.layers.*.mlp.linear_fc2.weight", ("model.layers.*.mlp.down_proj.weight",)),
    KeyMapping("decoder.layers.*.input_layernorm.weight", ("model.layers.*.input_layernorm.weight",)),
    KeyMapping("decoder.layers.*.pre_mlp_layernorm.weight", ("model.layers.*.post_attention_layernorm.weight",)),
    KeyMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    KeyMapping("output_layer.weight", ("lm_head.weight",), "vocab", untied_only=True),
)

#: Hugging Face tensors that carry no weights of their own: skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Param:
    """One concrete Megatron parameter and the Hugging Face tensors it is made of."""

    megatron: str
    hf: Tuple[str, ...]
    transform: Transform


def expand(cfg: LlamaConfig, key_map: Tuple[KeyMapping, ...] = LLAMA_KEY_MAP) -> List[Param]:
    """Concrete parameters of ``cfg``: embedding, then every layer's, then final norm and output layer."""
    per_layer = [m for m in key_map if "*" in m.megatron]
    first = [m for m in key_map if "*" not in m.megatron and m.megatron.startswith("embedding.")]
    last = [m for m in key_map if "*" not in m.megatron and not m.megatron.startswith("embedding.")]
    params: List[Param] = []

    def add(m: KeyMapping, layer=None):
        if m.untied_only and cfg.tie_word_embeddings:
            return
        sub = (lambda k: k.replace("*", str(layer))) if layer is not None else (lambda k: k)
        params.append(Param(sub(m.megatron), tuple(sub(k) for k in m.hf), TRANSFORMS[m.transform]))

    for m in first:
        add(m)
    for layer in range(cfg.num_layers):
        for m in per_layer:
            add(m, layer)
    for m in last:
        add(m)
    return params


def hf_shapes(cfg: LlamaConfig) -> Dict[str, Tuple[int, ...]]:
    """Expected shape of every Hugging Face tensor of ``cfg``, in module order."""
    h, hd, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    by_suffix = {
        "embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "q_proj.weight": (cfg.num_attention_heads * hd, h),
        "k_proj.weight": (cfg.num_query_groups * hd, h),
        "v_proj.weight": (cfg.num_query_groups * hd, h),
        "o_proj.weight": (h, cfg.num_attention_heads * hd),
        "gate_proj.weight": (f, h),
        "up_proj.weight": (f, h),
        "down_proj.weight": (h, f),
        "layernorm.weight": (h,),
        "norm.weight": (h,),
    }
    shapes = {}
    for p in expand(cfg):
        for key in p.hf:
            shapes[key] = next(s for suffix, s in by_suffix.items() if key.endswith(suffix))
    return shapes
