"""LLaMA-style GPTModel on megatron-core: RMSNorm, SwiGLU, GQA, no biases, rotary from ``megatron_resonance.rope``.

``LlamaConfig`` is the small typed model description stored with every checkpoint
(``megatron_resonance.hf.config.from_hf`` reads one from a Hugging Face config). ``build_model`` makes one
GPTModel chunk per virtual-pipeline stage on this rank (megatron's own modules, the TE layer spec when
Transformer Engine and CUDA are present, the local spec with SDPA core attention otherwise) and installs
the rotary plan on every chunk. ``local_compiled`` is the local spec with each transformer layer under
``torch.compile``: what TE fuses (RMSNorm, SwiGLU, the rotary application, the residual adds) fused by
Inductor around SDPA attention, for GPUs without Transformer Engine.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
import warnings
from typing import List, Literal, Optional

import torch
import torch.nn.functional as F

from megatron_resonance.config_fields import field, from_dict, same_named
from megatron_resonance.errors import ConfigError
from megatron_resonance.megatron import compat, cpu_speed, local_ops
from megatron_resonance.rope import RopeConfig

# megatron.core (seconds to import) is imported inside the functions that use it (with megatron.rotary and
# sdpa_attention, which import it): the tools' --help and config checks run without it; Transformer Engine (CUDA only)
# where the te layer spec is resolved.

#: layer specs: ``auto`` (TE when present, else local), Transformer Engine, the local one, the local one compiled
Spec = Literal["auto", "te", "local", "local_compiled"]
SPECS = typing.get_args(Spec)


#: the LlamaConfig sizes that must be >= 1
_POSITIVE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
    "max_position_embeddings", "make_vocab_size_divisible_by",
)  # fmt: skip


@dataclasses.dataclass
class LlamaConfig:
    """Architecture of a LLaMA-family decoder. Field names follow Megatron-LM's flags, and each field but
    ``rope`` is a ``pretrain_llama.py`` flag. ``vocab_size`` is the real vocabulary: the padding of the
    embedding table is worked out at build time (:meth:`padded_vocab_size`), never stored;
    ``max_position_embeddings`` is the extended length after context extension."""

    num_layers: int = field(2, "transformer layers")
    hidden_size: int = field(128, "model width")
    ffn_hidden_size: int = field(352, "SwiGLU inner width")
    num_attention_heads: int = field(4, "query heads")
    num_query_groups: int = field(2, "key/value heads (GQA)")
    vocab_size: int = field(256, "vocabulary size (taken from --tokenizer-model when given)")
    max_position_embeddings: int = field(4096, "longest sequence the model is meant for")
    norm_epsilon: float = field(1e-5, "RMSNorm epsilon")
    tie_word_embeddings: bool = field(False, "share input embedding and output layer")
    init_method_std: float = field(0.02, "std of the weight initialization")
    make_vocab_size_divisible_by: int = field(128, "pad the vocabulary to a multiple of lcm(this, num_query_groups)")
    rope: RopeConfig = field(
        help="rotary plan (kind, base, factor, original length, ...)", flag=False, default_factory=RopeConfig
    )

    def __post_init__(self):
        if isinstance(self.rope, dict):
            self.rope = RopeConfig.from_dict(self.rope)
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:  # (a value of another type is the config loader's to name)
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
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
    def from_dict(cls, d: dict, where: str = "model settings") -> "LlamaConfig":
        return from_dict(cls, d, where)

    def check_parallel(self, tensor_parallel_size: int) -> None:
        """One clear error when TP does not divide the heads or the query groups."""
        for name in ("num_attention_heads", "num_query_groups"):
            value = getattr(self, name)
            if value % tensor_parallel_size:
                raise ConfigError(f"tensor-model-parallel-size {tensor_parallel_size} does not divide {name} {value}")


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
        **same_named(cfg, "num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups"),
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
        # Apex's fused weight-gradient accumulation is not used on GPUs; cpu_speed provides it on CPU
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        use_te_activation_func=False,
        bias_dropout_fusion=on_gpu,
        # Apex/TE kernels: the local spec on a GPU without TE uses torch's RMSNorm and SDPA instead.
        masked_softmax_fusion=use_te,
        persist_layer_norm=use_te,
        apply_rope_fusion=use_te,
        cross_entropy_loss_fusion=False,
        # Megatron-LM's defaults. The interleaved schedule needs separate, overlapped isend/irecv: with
        # batched p2p and PP=2 the previous and next stage are the same rank, and the two directions get
        # paired in issue order, silently swapping activations and gradients (measured under gloo).
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
    )
    if resolve_spec(spec) != "local_compiled":  # Inductor fuses megatron's own eager ops, not local_ops'
        kwargs.update(cpu_speed.transformer_settings())  # nothing unless its measures are on (CPU)
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
    """'auto' -> 'te' when Transformer Engine and CUDA are present, else 'local'; 'local_compiled' is only
    ever asked for."""
    if spec not in SPECS:
        raise ValueError(f"unknown layer spec {spec!r}; expected one of {', '.join(SPECS)}")
    if spec == "auto":
        return "te" if te_available() else "local"
    if spec == "te" and not te_available():
        raise RuntimeError("--transformer-impl te needs Transformer Engine and CUDA")
    return spec


def layer_spec(spec: str = "auto"):
    """megatron's GPT layer spec: TE's, or the local one with SDPA core attention and ``LocalNorm``; self
    attention whose inference cache holds rotated keys (``rotary.cached_key_self_attention``); with
    ``cpu_speed`` on (and not ``local_compiled``), ``local_ops``' SwiGLU as the MLP activation module and
    RMSNorm in the norms."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_resonance.megatron.rotary import cached_key_self_attention

    resolved = resolve_spec(spec)
    if resolved == "te":
        layer = get_gpt_layer_with_transformer_engine_spec()
        layer.submodules.self_attention.module = cached_key_self_attention()
        return layer
    from megatron_resonance.megatron.sdpa_attention import SDPAAttention

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.module = cached_key_self_attention()
    layer.submodules.self_attention.submodules.core_attention = SDPAAttention
    lean = cpu_speed.is_enabled() and resolved == "local"
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        setattr(layer.submodules, name, _local_norm(getattr(layer.submodules, name), lean))
    if lean:  # the module cpu_speed.transformer_settings' use_te_activation_func runs
        compat.mlp_submodules(layer).activation_func = local_ops.SwiGLU
    return compat.strided_gated_fc1(layer)


class LocalNorm:
    """megatron's ``WrappedTorchNorm`` (same arguments, same checks) that also runs sequence parallel; its
    RMSNorm is built as ``rms_norm`` (torch's, or ``local_ops.RMSNorm`` under ``cpu_speed``). LayerNorm
    and L2Norm are megatron's.

    With sequence parallelism each TP rank normalizes its part of the sequence, so the norm's weight
    gradient is a partial sum: its parameters are marked ``sequence_parallel``, which makes megatron's
    ``finalize_model_grads`` all-reduce them over TP, as Apex's and TE's norms are marked. (megatron's
    torch wrapper, which marks nothing, refuses sequence parallelism.)"""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
        rms_norm: type = torch.nn.RMSNorm,
    ):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        checked = config
        if config.sequence_parallel:
            checked = copy.copy(config)
            checked.sequence_parallel = False
        module = WrappedTorchNorm(checked, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        if type(module) is torch.nn.RMSNorm and rms_norm is not torch.nn.RMSNorm:
            module = rms_norm(normalized_shape=hidden_size, eps=eps)
        for param in module.parameters():
            param.sequence_parallel = config.sequence_parallel
        return module


def _local_norm(norm, lean: bool):
    """torch's norm wrapper (megatron's choice without Apex) as ``LocalNorm`` (with ``local_ops.RMSNorm``
    when ``lean``); Apex's as is."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if norm is not WrappedTorchNorm:
        return norm
    rms_norm = local_ops.RMSNorm if lean else torch.nn.RMSNorm
    return ModuleSpec(module=LocalNorm, params={"rms_norm": rms_norm})


def _block_spec(layer, tf_config, vp_stage: Optional[int]):
    """megatron's block for a layer spec (its layers for this PP/VPP stage and a final norm), with the
    final norm as the layers' when they use ``LocalNorm``."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    norm = layer.submodules.input_layernorm
    if getattr(norm, "module", None) is not LocalNorm:
        return layer
    num_layers = get_num_layers_to_build(tf_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def build_model(
    cfg: LlamaConfig,
    *,
    dtype: torch.dtype = torch.float32,
    spec: str = "auto",
    seq_length: Optional[int] = None,
    sequence_parallel: bool = False,
    initialize: bool = True,
    per_token_loss: bool = False,
    device: Optional[str] = None,
    recompute: Optional[dict] = None,
) -> List[torch.nn.Module]:
    """The model provider: GPTModel chunks of ``cfg`` for this rank under the current ``parallel_state``
    (one, or one per virtual-pipeline stage), our rotary installed on each, their ``TransformerConfig`` as
    ``chunk.config``.

    ``dtype``: the parameters' dtype (bf16 models train with fp32 main weights in the optimizer);
    ``initialize=False`` allocates the weights without initializing them (a checkpoint load or a conversion
    fills them); ``per_token_loss``: megatron's per-token loss normalization (training). The chunks are on
    the current CUDA device when there is one, unless ``device="cpu"`` (the converters, which only move
    weights). ``recompute``: megatron's recomputation fields (``recompute_granularity``, ``recompute_method``,
    ``recompute_num_layers``) for the ``TransformerConfig``. Wrap them with :func:`for_training` or
    :func:`for_inference`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_resonance.megatron.rotary import install_rotary

    cfg.check_parallel(ps.get_tensor_model_parallel_world_size())
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    tf_config = transformer_config(
        cfg,
        params_dtype=dtype,
        sequence_parallel=sequence_parallel,
        spec=spec,
        perform_initialization=initialize,
        calculate_per_token_loss=per_token_loss,
        **({"use_cpu_initialization": True} if on_cpu else {}),
        **(recompute or {}),
    )
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
        chunks.append(model if on_cpu else model.cuda(torch.cuda.current_device()))
    install_rotary(chunks, cfg.rope)
    if resolve_spec(spec) == "local_compiled":
        for chunk in chunks:
            compile_layers(chunk)
    return chunks


def compile_layers(model: torch.nn.Module) -> None:
    """Each transformer layer of a GPTModel chunk under ``torch.compile`` (``nn.Module.compile``: the module
    compiles its own call in place, so parameter names, ``state_dict`` and ``sharded_state_dict`` stay
    those of the uncompiled model). One graph per layer: RMSNorm, the rotary application to q and k, SwiGLU
    and the residual adds fuse into Inductor kernels around the GEMMs and SDPA (which Inductor calls as is:
    flash or cuDNN attention on a GPU, bf16 and causal without a mask). The layers share their code, so the
    first layer's compilation serves them all; the rotary angles are computed outside, by the model.
    ``dynamic=False``: one static graph per sequence length (a training run has one), not a dynamic-shape
    graph after the second length.

    megatron's row-parallel linear calls ``warnings.warn`` in every layer (a deprecation of its own
    ``tp_group=None`` call), which would break each layer's graph around both such linears: dynamo is told
    to skip ``warnings.warn`` while tracing (process-wide; a compiled graph never runs Python warnings
    again anyway)."""
    torch._dynamo.config.ignore_logging_functions.add(warnings.warn)
    for layer in model.decoder.layers:
        layer.compile(dynamic=False)


def _half_precision(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    """megatron's ``Float16Module`` around bf16/fp16 chunks (it casts the inputs and the outputs)."""
    config = chunks[0].config
    if not (config.bf16 or config.fp16):
        return chunks
    from megatron.core.transformer.module import Float16Module

    return [Float16Module(config, c) for c in chunks]


def for_training(chunks: List[torch.nn.Module], *, use_distributed_optimizer: bool = True) -> List[torch.nn.Module]:
    """The training wrapper of :func:`build_model`'s chunks: ``Float16Module`` for half precision, then
    megatron DDP (gradients reduced in fp32 into contiguous buffers, one bucket per chunk but the first, as
    Megatron-LM for virtual pipelining), the parameters broadcast from data-parallel rank 0."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
        for i, c in enumerate(_half_precision(chunks))
    ]
    for c in wrapped:
        c.broadcast_params()
    return wrapped


def for_inference(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    """The inference wrapper of :func:`build_model`'s chunks (after a checkpoint load): ``Float16Module``
    for half precision, eval mode."""
    chunks = _half_precision(chunks)
    for c in chunks:
        c.eval()
    return chunks
