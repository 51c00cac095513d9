"""Memory per GPU of a parallel layout, and the layout a target length needs: one estimate for training
and for the evaluation tools' forward passes (``tools/plan_layout.py``, ``evaluation.memory``).

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
from typing import Callable, Dict, List, Optional, Sequence

GiB = 1024**3
#: the share of a device's memory (after RESERVE_BYTES) a plan may fill
HEADROOM = 0.9
#: per GPU outside the allocator's count: CUDA context, NCCL buffers, cuBLAS workspaces
RESERVE_BYTES = 2 * GiB
RECOMPUTE = ("none", "selective", "full")
#: relative step-time costs the planner weighs (documented in docs/long_context.md): a full recomputation
#: is one more forward (+1/3); each doubling of TP inside a node, of CP, adds communication
COST_FULL_RECOMPUTE = 1 / 3
COST_SELECTIVE_RECOMPUTE = 0.03
COST_TP_DOUBLING = 0.08
COST_CP_DOUBLING = 0.05
COST_TP_ACROSS_NODES = 1.0


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
        return cls(cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
                   cfg.num_query_groups, cfg.vocab_size, cfg.tie_word_embeddings, cfg.make_vocab_size_divisible_by)


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


def training_estimate(shape: ModelShape, seq_length: int, layout: Layout, *, bf16: bool = True,
                      spec: str = "te", cpu: bool = False, distributed_optimizer: bool = True) -> Estimate:
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


def forward_estimate(shape: ModelShape, length: int, *, micro_batch_size: int = 1, tp: int = 1, pp: int = 1,
                     cp: int = 1, dtype_bytes: int = 4, padded: bool = True, generate: bool = False) -> Estimate:
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


# ==========================================================================================================
# The planner: the cheapest layout that fits
# ==========================================================================================================


@dataclasses.dataclass
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    """GiB of memory per GPU (80 for an H100 80GB)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        return HEADROOM * (self.gpu_memory_gb * GiB - RESERVE_BYTES)


@dataclasses.dataclass
class Candidate:
    layout: Layout
    estimate: Estimate
    cost: float
    fits: bool


@dataclasses.dataclass
class Plan:
    shape: ModelShape
    seq_length: int
    hardware: Hardware
    global_batch_size: int
    chosen: Optional[Candidate]
    tried: List[Candidate]
    why: str

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def closest_miss(self) -> Optional[Candidate]:
        misses = [c for c in self.tried if not c.fits]
        return min(misses, key=lambda c: c.estimate.total) if misses else None


def _powers_of_two(limit: int) -> List[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def step_cost(layout: Layout, hardware: Hardware) -> float:
    """Relative time of a step per GPU against one model replica per GPU (1.0): the weights the planner
    chooses with (module constants; coarse, but what orders the recipes' choices)."""
    cost = 1.0
    cost += {"none": 0.0, "selective": COST_SELECTIVE_RECOMPUTE, "full": COST_FULL_RECOMPUTE}[layout.recompute]
    cost += COST_TP_DOUBLING * math.log2(layout.tp) + COST_CP_DOUBLING * math.log2(layout.cp)
    if layout.tp > hardware.gpus_per_node:
        cost += COST_TP_ACROSS_NODES
    if layout.pp > 1:  # the 1F1B bubble
        cost += (layout.pp - 1) / max(1, layout.num_microbatches)
    return cost


def candidates(shape: ModelShape, seq_length: int, hardware: Hardware, *, micro_batch_size: int = 1,
               global_batch_size: Optional[int] = None) -> List[Layout]:
    """Every layout worth estimating: TP (powers of two dividing the heads and query groups, at most 8 and
    within a node), CP (powers of two, seq_length % 2CP == 0), PP (dividing the layers), recomputation none
    or full, the rest data parallel."""
    layouts = []
    world = hardware.world
    for tp in _powers_of_two(min(8, hardware.gpus_per_node, world)):
        if shape.num_attention_heads % tp or shape.num_query_groups % tp:
            continue
        for cp in _powers_of_two(world // tp):
            if cp > 1 and seq_length % (2 * cp):
                continue
            for pp in _powers_of_two(world // (tp * cp)):
                if shape.num_layers % pp or world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                gbs = global_batch_size or _default_global_batch(hardware, micro_batch_size, dp)
                if gbs % (micro_batch_size * dp):
                    continue
                for recompute in ("none", "full"):
                    layouts.append(Layout(tp=tp, pp=pp, cp=cp, dp=dp, recompute=recompute,
                                          sequence_parallel=tp > 1, micro_batch_size=micro_batch_size,
                                          num_microbatches=gbs // (micro_batch_size * dp)))
    return layouts


def _default_global_batch(hardware: Hardware, micro_batch_size: int, dp: int) -> int:
    """One sequence per GPU per step (as the presets), rounded up to a multiple of micro-batch x DP."""
    unit = micro_batch_size * dp
    return -(-hardware.world // unit) * unit


def plan(shape: ModelShape, seq_length: int, hardware: Hardware, *, micro_batch_size: int = 1,
         global_batch_size: Optional[int] = None, bf16: bool = True, spec: str = "te") -> Plan:
    """The cheapest layout (``step_cost``) whose estimate fits ``hardware``; ties go to more headroom."""
    tried = []
    for layout in candidates(shape, seq_length, hardware, micro_batch_size=micro_batch_size,
                             global_batch_size=global_batch_size):
        est = training_estimate(shape, seq_length, layout, bf16=bf16, spec=spec)
        tried.append(Candidate(layout, est, step_cost(layout, hardware), est.total <= hardware.usable_bytes))
    fitting = [c for c in tried if c.fits]
    chosen = min(fitting, key=lambda c: (c.cost, c.layout.model_parallel, c.estimate.total), default=None)
    gbs = global_batch_size or (chosen and chosen.layout.num_microbatches * micro_batch_size * chosen.layout.dp) \
        or _default_global_batch(hardware, micro_batch_size, 1)
    return Plan(shape, seq_length, hardware, gbs, chosen, tried, _why(chosen, tried, hardware) if chosen else "")


def _why(chosen: Candidate, tried: Sequence[Candidate], hardware: Hardware) -> str:
    """One line: why this layout and not a cheaper or smaller one."""
    lay = chosen.layout
    smaller = [c for c in tried if c.layout.model_parallel < lay.model_parallel and c.layout.recompute == "none"]
    parts = []
    if smaller:
        best = min(smaller, key=lambda c: c.estimate.total)
        parts.append(f"{best.layout.describe()} needs {best.estimate.total / GiB:.1f} GiB")
    if lay.recompute == "none":
        rec = [c for c in tried if c.fits and c.layout.recompute == "full"
               and c.layout.model_parallel < lay.model_parallel]
        if rec:
            parts.append(f"{rec[0].layout.describe()} fits but recomputing costs ~{COST_FULL_RECOMPUTE:.0%} "
                         f"more than TP/CP's communication")
    elif lay.recompute == "full":
        parts.append("no layout fits without recomputation within "
                     f"TP <= {min(8, hardware.gpus_per_node)} per node")
    head = (f"{lay.describe()}: the least model parallelism that fits "
            f"{hardware.usable_bytes / GiB:.1f} GiB usable per GPU at the lowest step cost")
    return head + ("; " + "; ".join(parts) if parts else "")


def sbatch_line(plan: Plan, *, script: str = "slurm/extend_context.sbatch", config: Optional[str] = None,
                load: Optional[str] = None) -> str:
    """The ``sbatch`` command that runs the chosen layout (the script's documented variables)."""
    lay = plan.chosen.layout
    train_args = [f"--seq-length {plan.seq_length}", f"--micro-batch-size {lay.micro_batch_size}",
                  f"--global-batch-size {plan.global_batch_size}"]
    if lay.tp > 1:
        train_args.append("--sequence-parallel")
    if lay.recompute != "none":
        train_args.append(f"--recompute-granularity {lay.recompute}")
        if lay.recompute == "full":
            train_args.append(f"--recompute-method uniform --recompute-num-layers {lay.recompute_num_layers}")
    env = []
    if config:
        env.append(f"CONFIG={config}")
    if load:
        env.append(f"LOAD={load}")
    env += [f"TP={lay.tp}", f"PP={lay.pp}", f"CP={lay.cp}", f"GPUS_PER_NODE={plan.hardware.gpus_per_node}",
            f"TRAIN_ARGS=\"{' '.join(train_args)}\""]
    return f"{' '.join(env)} sbatch --nodes={plan.hardware.nodes} {script}"


def describe(plan: Plan, sbatch: str) -> str:
    """The planner's text block."""
    c = plan.chosen
    lay, hw = c.layout, plan.hardware
    rows = [
        ("model", f"{plan.shape.parameters / 1e9:.2f} B parameters, {plan.shape.num_layers} layers, "
                  f"hidden {plan.shape.hidden_size}, vocabulary {plan.shape.vocab_size}"),
        ("target", f"{plan.seq_length} tokens on {hw.nodes} node(s) x {hw.gpus_per_node} GPUs x "
                   f"{hw.gpu_memory_gb:g} GiB ({hw.usable_bytes / GiB:.1f} GiB usable per GPU)"),
        ("layout", f"TP={lay.tp} PP={lay.pp} CP={lay.cp} DP={lay.dp}"
                   + (", sequence parallel" if lay.sequence_parallel else "")),
        ("recomputation", lay.recompute if lay.recompute != "full"
         else f"full (uniform, {lay.recompute_num_layers} layer)"),
        ("micro-batch", f"{lay.micro_batch_size} x {lay.num_microbatches} per step per replica "
                        f"(global batch {plan.global_batch_size})"),
        ("tokens/step", f"{plan.tokens_per_step:,}"),
        ("memory/GPU", f"{c.estimate.total / GiB:.1f} GiB: " + ", ".join(
            f"{k} {v / GiB:.1f}" for k, v in c.estimate.parts.items())),
        ("why", plan.why),
        ("sbatch", sbatch),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def no_fit_message(plan: Plan) -> str:
    """One line: what was tried and the closest miss."""
    hw = plan.hardware
    tps = sorted({c.layout.tp for c in plan.tried})
    cps = sorted({c.layout.cp for c in plan.tried})
    pps = sorted({c.layout.pp for c in plan.tried})
    text = (f"no layout fits length {plan.seq_length} on {hw.nodes} x {hw.gpus_per_node} GPUs of "
            f"{hw.gpu_memory_gb:g} GiB ({hw.usable_bytes / GiB:.1f} GiB usable): tried {len(plan.tried)} layouts "
            f"(TP {','.join(map(str, tps)) or '-'}, CP {','.join(map(str, cps)) or '-'}, "
            f"PP {','.join(map(str, pps)) or '-'}, recomputation none/full)")
    miss = plan.closest_miss()
    if miss:
        text += f"; closest: {miss.layout.describe()} at {miss.estimate.total / GiB:.1f} GiB per GPU"
    return text + "; use more GPUs or nodes, or a shorter --seq-length"


def propose_forward(shape: ModelShape, length: int, available: Callable[[int], float], *,
                    micro_batch_size: int = 1, dtype_bytes: int = 4, max_processes: int = 64,
                    padded: bool = True, generate: bool = False) -> Optional[Layout]:
    """The smallest TP x CP x PP (fewest processes; then TP before CP before PP) whose forward estimate fits
    90 % of ``available(processes)`` bytes per process: what the evaluation tools propose when a length does
    not fit. ``generate``: with the key/value cache, and no CP (generation runs without it)."""
    options = []
    for tp in _powers_of_two(8):
        if shape.num_attention_heads % tp or shape.num_query_groups % tp:
            continue
        for cp in _powers_of_two(1 if generate else max_processes // tp):
            if cp > 1 and length % (2 * cp):
                continue
            for pp in _powers_of_two(max_processes // (tp * cp)):
                if shape.num_layers % pp:
                    continue
                est = forward_estimate(shape, length, micro_batch_size=micro_batch_size, tp=tp, pp=pp, cp=cp,
                                       dtype_bytes=dtype_bytes, padded=padded, generate=generate)
                if est.total <= HEADROOM * available(tp * pp * cp):
                    options.append(Layout(tp=tp, pp=pp, cp=cp))
    return min(options, key=lambda lay: (lay.model_parallel, lay.pp, lay.cp), default=None)
