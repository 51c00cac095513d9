"""LLaMA-style GPTModel on megatron-core: RMSNorm, SwiGLU, GQA, no biases, rotary from ``megatron_resonance.rope``.

``LlamaConfig`` is the small typed model description stored with every checkpoint
(``megatron_resonance.hf.config.from_hf`` reads one from a Hugging Face config). ``build_model`` makes one
GPTModel chunk per virtual-pipeline stage on this rank (megatron's own modules, the TE layer spec when
Transformer Engine and CUDA are present, the local spec with SDPA core attention otherwise) and installs
the rotary plan on every chunk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from megatron_resonance.megatron import cpu_backend, local_ops
from megatron_resonance.rope import RopeConfig

SPECS = ("auto", "te", "local")


#: the LlamaConfig sizes that must be >= 1
_POSITIVE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
    "max_position_embeddings", "make_vocab_size_divisible_by",
)  # fmt: skip


@dataclasses.dataclass
class LlamaConfig:
    """Architecture of a LLaMA-family decoder. Field names follow Megatron-LM's flags."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 128
    """Model width."""
    ffn_hidden_size: int = 352
    """SwiGLU inner width (each of gate and up)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA); equal to num_attention_heads for multi-head attention."""
    vocab_size: int = 256
    """Real vocabulary size (padding for TP is added at build time, not stored)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant for (the extended length after context extension)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share input embedding and output layer."""
    init_method_std: float = 0.02
    """Std of the normal weight initialization."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding table to a multiple of lcm(this, num_query_groups): the same size at every TP."""
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    """Rotary plan (kind, base, factor, original length, ...)."""

    def __post_init__(self):
        if isinstance(self.rope, dict):
            self.rope = RopeConfig.from_dict(self.rope)
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:  # (a value of another type is the config loader's to name)
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.rope.head_dim != self.head_dim:
            self.rope = dataclasses.replace(self.rope, head_dim=self.head_dim)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self) -> int:
        """The embedding table's rows: the vocabulary padded to a multiple of lcm(make_vocab_size_divisible_by,
        num_query_groups). Every TP the model supports divides num_query_groups, so every TP splits this
        size evenly and a checkpoint (whose embedding shape this is) reshards between any two of them.
        Megatron-LM pads to a multiple of divisible_by x TP, a shape that changes with TP."""
        multiple = math.lcm(self.make_vocab_size_divisible_by, self.num_query_groups)
        return -(-self.vocab_size // multiple) * multiple

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def check_parallel(self, tensor_parallel_size: int) -> None:
        """One clear error when TP does not divide the heads or the query groups."""
        for name in ("num_attention_heads", "num_query_groups"):
            value = getattr(self, name)
            if value % tensor_parallel_size:
                raise ValueError(
                    f"tensor-model-parallel-size {tensor_parallel_size} does not divide {name} {value}"
                )


def transformer_config(
    cfg: LlamaConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    spec: str = "auto",
    **overrides,
):
    """megatron ``TransformerConfig`` for ``cfg`` under the current ``parallel_state``."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_resonance.megatron.rotary import softmax_scale_for

    use_te = resolve_spec(spec) == "te"
    on_gpu = torch.cuda.is_available()
    interleaved = ps.get_virtual_pipeline_model_parallel_world_size() is not None
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        softmax_scale=softmax_scale_for(cfg.rope),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # CPU: no fused CUDA kernels; full weights are initialized on CPU then split, which also makes
        # the initial weights independent of the TP layout.
        use_cpu_initialization=not on_gpu,
        # on CPU the CPU backend provides the fused weight-gradient accumulation (Apex's on GPUs)
        gradient_accumulation_fusion=cpu_backend.is_enabled(),
        bias_activation_fusion=on_gpu,
        # megatron's switch for "the MLP activation is the spec's module" (named for TE's): the local spec
        # on CPU runs SwiGLU as local_ops.SwiGLU over the fused gate/up output.
        use_te_activation_func=not use_te and not on_gpu,
        bias_dropout_fusion=on_gpu,
        # Apex/TE kernels: the local spec on a GPU without TE uses torch's RMSNorm and SDPA instead.
        masked_softmax_fusion=use_te,
        persist_layer_norm=use_te,
        # TE's fused RoPE; on CPU local_ops.apply_rotary in its place
        apply_rope_fusion=use_te or (not on_gpu and local_ops.install_rotary()),
        cross_entropy_loss_fusion=False,
        # Megatron-LM's defaults. The interleaved schedule needs separate, overlapped isend/irecv: with
        # batched p2p and PP=2 the previous and next stage are the same rank, and the two directions get
        # paired in issue order, silently swapping activations and gradients (measured under gloo).
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def resolve_spec(spec: str) -> str:
    """'auto' -> 'te' when Transformer Engine and CUDA are present, else 'local'."""
    if spec not in SPECS:
        raise ValueError(f"unknown layer spec {spec!r}; expected one of {', '.join(SPECS)}")
    if spec == "auto":
        return "te" if te_available() else "local"
    if spec == "te" and not te_available():
        raise RuntimeError("--transformer-impl te needs Transformer Engine and CUDA")
    return spec


def layer_spec(spec: str = "auto"):
    """megatron's GPT layer spec: TE's, or the local one with SDPA core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if resolve_spec(spec) == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    from megatron_resonance.megatron.sdpa_attention import SDPAAttention

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = SDPAAttention
    layer.submodules.mlp.submodules.activation_func = local_ops.SwiGLU  # used when use_te_activation_func is set
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        setattr(layer.submodules, name, _local_norm(getattr(layer.submodules, name)))
    return layer


def _local_norm(norm):
    """torch's norm wrapper (megatron's choice without Apex) as ``local_ops.LocalNorm``; Apex's as is."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return local_ops.LocalNorm if norm is WrappedTorchNorm else norm


def _block_spec(layer, tf_config, vp_stage: Optional[int]):
    """megatron's block for a layer spec (its layers for this PP/VPP stage and a final norm), with the
    final norm as the layers' when they use ``local_ops.LocalNorm``."""
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if layer.submodules.input_layernorm is not local_ops.LocalNorm:
        return layer
    num_layers = get_num_layers_to_build(tf_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=_local_norm(LayerNormImpl))


def build_model(
    cfg: LlamaConfig,
    tf_config=None,
    *,
    spec: str = "auto",
    seq_length: Optional[int] = None,
    params_dtype: torch.dtype = torch.float32,
) -> List[torch.nn.Module]:
    """GPTModel chunks for this rank: one, or one per virtual-pipeline stage. Rotary installed on each."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_resonance.megatron.rotary import install_rotary

    tp = ps.get_tensor_model_parallel_world_size()
    cfg.check_parallel(tp)
    if tf_config is None:
        tf_config = transformer_config(cfg, params_dtype=params_dtype, spec=spec)
    spec_module = layer_spec(spec)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=tf_config,
            transformer_layer_spec=_block_spec(spec_module, tf_config, stage),
            vocab_size=cfg.padded_vocab_size(),
            max_sequence_length=seq_length or cfg.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.rope.base),
            vp_stage=stage,
        )
        chunks.append(model)
    install_rotary(chunks, cfg.rope)
    return chunks

