"""Memory per GPU of a parallel layout: one estimate for training and for the evaluation tools' forward
passes. The layout a target length needs is ``layout_planner``'s (``tools/plan_layout.py``,
``evaluation.memory``).

**Training, per rank** (the pipeline stage that needs most: the first holds the most activations, the
last the logits; parameters P on the stage, over TP)::

    weights        P x 2 (bf16) or 4 (fp32)
    gradients      P x 4                      megatron DDP reduces into an fp32 buffer (grad_reduce_in_fp32)
    optimizer      P x (4 master (bf16 only) + 8 Adam m, v) / (DP x CP)   distributed optimizer (ZeRO-1)
    activations    t x a x per-layer-elements x layers held                t = micro-batch x L / CP tokens
    logits/backward  the larger of: t x vocab / TP x (4, + a from bf16)   the loss's fp32 softmax (and the
                   output it is made from), and half a layer's activations: a layer's backward frees its
                   saved tensors as it makes their gradients (measured: 0.45 - 0.55 of a layer on CPU)

with a the compute dtype's bytes. Elements saved for the backward per token and layer (no dropout, no
biases, h hidden, kv = query groups x head dim, f the SwiGLU width):

    norm inputs 2h, GEMM inputs of QKV and FC1 2h            = 4h   over TP only with sequence parallelism
    te     q, k, v (h + 2kv), attention output h, FC1 output 2f, SwiGLU output f
                                                             = 2h + 2kv + 3f   over TP
    local  as te, plus: the QKV output stays alive through v's view (h + 2kv in place of v's kv), the rotated
           q and k are copies (h + kv), and the attention output is copied once more for the projection
           (h): 4h + 3kv + 3f over TP, and f more on CPU (the lean SwiGLU keeps its output): counted
           with ``torch.autograd.graph.saved_tensors_hooks`` on the model the trainer builds.

Neither spec materializes the L x L score matrix (flash attention in TE, SDPA's flash kernel on GPU and on
CPU for a causal mask without an explicit one). Recomputation: ``full`` keeps each layer's input (h, over
TP with sequence parallelism) for the recomputed layers and one layer's activations while it is
recomputed; ``selective`` recomputes core attention only, which saves nothing with flash attention (no score
matrix; its q, k, v stay saved), so the planner never proposes it.
Pipeline 1F1B: the first stage holds min(PP, micro-batches) micro-batches of its layers' activations
(interleaved: x (1 + (PP - 1) / (PP x VPP))).

**Forward only** (evaluation: no autograd, one layer's tensors at a time)::

    weights        P x a
    layer          t x a x (3h + max(4h + 3kv, 3f) / TP)   the residual stream, a layer's live tensors
    logits         t x vocab / TP x (a + 8, + 4 if a < 4, + 4 with vocabulary padding)
                                                          the output, its fp32 copy, the padding mask, the
                                                          two temporaries of log-sum-exp (scoring.py)

**What fits.** On a GPU, the estimate must stay within 90 % of the memory less 2 GiB (CUDA context, NCCL
buffers, allocator slack, none of which ``torch.cuda.max_memory_allocated`` counts); on CPU, within 90 % of
the available RAM per process. Checked against measurement: ``tests/planning``, and
``benchmarks/planner_memory.py`` (results in ``benchmarks/results/2026-12-06_planner_memory.md``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

GiB = 1024**3
#: the share of a device's memory (after RESERVE_BYTES) a plan may fill
HEADROOM = 0.9
#: per GPU outside the allocator's count: CUDA context, NCCL buffers, cuBLAS workspaces
RESERVE_BYTES = 2 * GiB
RECOMPUTE = ("none", "selective", "full")


@dataclasses.dataclass
class ModelShape:
    """The sizes the estimate needs, from a ``LlamaConfig`` or (``hf.config.model_sizes``) a Hugging Face
    ``config.json``."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_query_groups

    @property
    def padded_vocab_size(self) -> int:
        """As ``LlamaConfig.padded_vocab_size`` (a Hugging Face model has no padding: see ``hf_padding``)."""
        multiple = math.lcm(self.make_vocab_size_divisible_by, self.num_query_groups)
        return -(-self.vocab_size // multiple) * multiple

    @property
    def layer_parameters(self) -> int:
        h, kv = self.hidden_size, self.kv_size
        return h * (h + 2 * kv) + h * h + 3 * h * self.ffn_hidden_size + 2 * h

    @property
    def parameters(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_parameters + embeddings + self.hidden_size

    @classmethod
    def from_llama(cls, cfg) -> "ModelShape":
        return cls(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.ffn_hidden_size,
            cfg.num_attention_heads,
            cfg.num_query_groups,
            cfg.vocab_size,
            cfg.tie_word_embeddings,
            cfg.make_vocab_size_divisible_by,
        )


@dataclasses.dataclass
class Layout:
    """A parallel layout of one training run (or, ``forward_only``, of an evaluation)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = True
    recompute: str = "none"
    recompute_num_layers: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def world(self) -> int:
        return self.model_parallel * self.dp

    def describe(self) -> str:
        text = f"TP={self.tp} x PP={self.pp} x CP={self.cp} x DP={self.dp}"
        if self.vpp:
            text += f" (VPP={self.vpp})"
        return text + ("" if self.recompute == "none" else f", {self.recompute} recomputation")


@dataclasses.dataclass
class Estimate:
    """Bytes per rank, by part; ``total`` is their sum."""

    parts: Dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def gib(self) -> Dict[str, float]:
        return {k: round(v / GiB, 2) for k, v in self.parts.items()}


def _layer_elements(shape: ModelShape, layout: Layout, spec: str, cpu: bool) -> tuple:
    """(replicated, split over TP) elements saved per token and layer for the backward."""
    h, kv, f = shape.hidden_size, shape.kv_size, shape.ffn_hidden_size
    replicated = 4 * h
    if spec == "te":
        split = 2 * h + 2 * kv + 3 * f
    else:
        split = 4 * h + 3 * kv + 3 * f + (f if cpu else 0)
    # selective recomputation (megatron's core_attn) saves nothing here: flash attention keeps no score
    # matrix, and its inputs stay saved (megatron warns the same for fused attention)
    return replicated, split


def _stage_parameters(shape: ModelShape, layout: Layout) -> tuple:
    """Parameters on (the first, the last) pipeline stage of one TP rank."""
    layers = shape.num_layers / layout.pp * shape.layer_parameters / layout.tp
    table = shape.padded_vocab_size * shape.hidden_size / layout.tp
    if layout.pp == 1:
        both = layers + table * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size
        return both, both
    return layers + table, layers + table + shape.hidden_size  # a tied output layer keeps its own copy


def training_estimate(
    shape: ModelShape,
    seq_length: int,
    layout: Layout,
    *,
    bf16: bool = True,
    spec: str = "te",
    cpu: bool = False,
    distributed_optimizer: bool = True,
) -> Estimate:
    """Peak bytes of the rank that needs most in a training step (see the module docstring)."""
    a = 2 if bf16 else 4
    first, last = _stage_parameters(shape, layout)
    shard = layout.dp * layout.cp if distributed_optimizer else 1
    optimizer_bytes = (4 if bf16 else 0) + 8
    tokens = layout.micro_batch_size * seq_length / layout.cp
    replicated, split = _layer_elements(shape, layout, spec, cpu)
    sp = layout.sequence_parallel and layout.tp > 1
    layer = tokens * a * (replicated / (layout.tp if sp else 1) + split / layout.tp)
    layer += tokens * shape.num_attention_heads / layout.tp * 4  # the attention's fp32 log-sum-exp
    if layout.cp > 1 and spec != "te":  # SDPAAttention saves the keys and values it all-gathers over CP
        # (the other ranks' part too); TE's CP gathers them again in its backward
        layer += layout.micro_batch_size * seq_length * (1 - 1 / layout.cp) * 2 * shape.kv_size / layout.tp * a
    stage_layers = shape.num_layers / layout.pp
    held = min(layout.pp, layout.num_microbatches)
    if layout.vpp:
        held *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    if layout.recompute == "full":
        kept = tokens * a * shape.hidden_size / (layout.tp if sp else 1)
        n = min(layout.recompute_num_layers, stage_layers)
        # uniform: a layer input every n layers, n layers' activations while a group is recomputed
        per_stage = stage_layers / n * kept + n * layer
    else:
        per_stage = stage_layers * layer
    # the loss's fp32 softmax (and, converting from bf16, the output it is made from); later in the backward
    # a layer's gradients take its place: whichever is larger
    logits = tokens * shape.padded_vocab_size / layout.tp * (4 + (a if a < 4 else 0))

    def stage(params: float, activations: float, logits_bytes: float) -> Dict[str, float]:
        return {
            "weights": params * a,
            "gradients": params * 4,
            "optimizer": params * optimizer_bytes / shard,
            "activations": activations,
            "logits/backward": max(logits_bytes, layer / 2),
        }

    first_stage = stage(first, per_stage * held, logits if layout.pp == 1 else 0.0)
    last_stage = stage(last, per_stage, logits)
    return Estimate(max(first_stage, last_stage, key=lambda p: sum(p.values())))


def forward_estimate(
    shape: ModelShape,
    length: int,
    *,
    micro_batch_size: int = 1,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    dtype_bytes: int = 4,
    padded: bool = True,
    generate: bool = False,
) -> Estimate:
    """Peak bytes of one rank running a forward pass at ``length`` (evaluation; see the module docstring).
    ``padded``: the logits have padding columns (a Megatron checkpoint whose vocabulary is not a multiple
    of the padding). ``generate``: decoding up to ``length`` tokens also holds every layer's key/value
    cache (2 x layers / PP x length x kv / TP per sequence)."""
    a = dtype_bytes
    h, kv, f = shape.hidden_size, shape.kv_size, shape.ffn_hidden_size
    tokens = micro_batch_size * length / cp
    layout = Layout(tp=tp, pp=pp, cp=cp)
    params = max(_stage_parameters(shape, layout))
    vocab = shape.padded_vocab_size if padded else shape.vocab_size
    pad = padded and shape.padded_vocab_size != shape.vocab_size
    logit_bytes = a + 8 + (4 if a < 4 else 0) + (4 if pad else 0)
    parts = {
        "weights": params * a,
        "layer": tokens * a * (3 * h + max(4 * h + 3 * kv, 3 * f) / tp),
        "logits": tokens * vocab / tp * logit_bytes,
    }
    if generate:
        parts["kv_cache"] = 2 * shape.num_layers / pp * tokens * kv / tp * a
    return Estimate(parts)
