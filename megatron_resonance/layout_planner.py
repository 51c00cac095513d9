"""The layout planner: the cheapest parallel layout whose training estimate (``planning``) fits the
hardware, the ``sbatch`` line and text that show it (``tools/plan_layout.py``, the pipeline's check); and the
smallest layout a forward pass fits (what the evaluation tools propose, ``evaluation.memory``).

The choice: of the candidate layouts whose estimate fits, the lowest relative step cost (``step_cost``: the
module constants, documented in docs/long_context.md), then the least model parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence

from megatron_resonance.planning import (
    HEADROOM,
    RESERVE_BYTES,
    Estimate,
    GiB,
    Layout,
    ModelShape,
    forward_estimate,
    training_estimate,
)

#: relative step-time costs the planner weighs (documented in docs/long_context.md): a full recomputation
#: is one more forward (+1/3); each doubling of TP inside a node, of CP, adds communication
COST_FULL_RECOMPUTE = 1 / 3
COST_SELECTIVE_RECOMPUTE = 0.03
COST_TP_DOUBLING = 0.08
COST_CP_DOUBLING = 0.05
COST_TP_ACROSS_NODES = 1.0


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


def candidates(
    shape: ModelShape,
    seq_length: int,
    hardware: Hardware,
    *,
    micro_batch_size: int = 1,
    global_batch_size: Optional[int] = None,
) -> List[Layout]:
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
                    layouts.append(
                        Layout(
                            tp=tp,
                            pp=pp,
                            cp=cp,
                            dp=dp,
                            recompute=recompute,
                            sequence_parallel=tp > 1,
                            micro_batch_size=micro_batch_size,
                            num_microbatches=gbs // (micro_batch_size * dp),
                        )
                    )
    return layouts


def _default_global_batch(hardware: Hardware, micro_batch_size: int, dp: int) -> int:
    """One sequence per GPU per step (as the presets), rounded up to a multiple of micro-batch x DP."""
    unit = micro_batch_size * dp
    return -(-hardware.world // unit) * unit


def plan(
    shape: ModelShape,
    seq_length: int,
    hardware: Hardware,
    *,
    micro_batch_size: int = 1,
    global_batch_size: Optional[int] = None,
    bf16: bool = True,
    spec: str = "te",
) -> Plan:
    """The cheapest layout (``step_cost``) whose estimate fits ``hardware``; ties go to more headroom."""
    tried = []
    for layout in candidates(
        shape, seq_length, hardware, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size
    ):
        est = training_estimate(shape, seq_length, layout, bf16=bf16, spec=spec)
        tried.append(Candidate(layout, est, step_cost(layout, hardware), est.total <= hardware.usable_bytes))
    fitting = [c for c in tried if c.fits]
    chosen = min(fitting, key=lambda c: (c.cost, c.layout.model_parallel, c.estimate.total), default=None)
    gbs = (
        global_batch_size
        or (chosen and chosen.layout.num_microbatches * micro_batch_size * chosen.layout.dp)
        or _default_global_batch(hardware, micro_batch_size, 1)
    )
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
        rec = [
            c for c in tried if c.fits and c.layout.recompute == "full" and c.layout.model_parallel < lay.model_parallel
        ]
        if rec:
            parts.append(
                f"{rec[0].layout.describe()} fits but recomputing costs ~{COST_FULL_RECOMPUTE:.0%} "
                f"more than TP/CP's communication"
            )
    elif lay.recompute == "full":
        parts.append(f"no layout fits without recomputation within TP <= {min(8, hardware.gpus_per_node)} per node")
    head = (
        f"{lay.describe()}: the least model parallelism that fits "
        f"{hardware.usable_bytes / GiB:.1f} GiB usable per GPU at the lowest step cost"
    )
    return head + ("; " + "; ".join(parts) if parts else "")


def sbatch_line(
    plan: Plan, *, script: str = "slurm/extend_context.sbatch", config: Optional[str] = None, load: Optional[str] = None
) -> str:
    """The ``sbatch`` command that runs the chosen layout (the script's documented variables)."""
    lay = plan.chosen.layout
    train_args = [
        f"--seq-length {plan.seq_length}",
        f"--micro-batch-size {lay.micro_batch_size}",
        f"--global-batch-size {plan.global_batch_size}",
    ]
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
    env += [
        f"TP={lay.tp}",
        f"PP={lay.pp}",
        f"CP={lay.cp}",
        f"GPUS_PER_NODE={plan.hardware.gpus_per_node}",
        f'TRAIN_ARGS="{" ".join(train_args)}"',
    ]
    return f"{' '.join(env)} sbatch --nodes={plan.hardware.nodes} {script}"


def describe(plan: Plan, sbatch: str) -> str:
    """The planner's text block."""
    c = plan.chosen
    lay, hw = c.layout, plan.hardware
    rows = [
        (
            "model",
            f"{plan.shape.parameters / 1e9:.2f} B parameters, {plan.shape.num_layers} layers, "
            f"hidden {plan.shape.hidden_size}, vocabulary {plan.shape.vocab_size}",
        ),
        (
            "target",
            f"{plan.seq_length} tokens on {hw.nodes} node(s) x {hw.gpus_per_node} GPUs x "
            f"{hw.gpu_memory_gb:g} GiB ({hw.usable_bytes / GiB:.1f} GiB usable per GPU)",
        ),
        (
            "layout",
            f"TP={lay.tp} PP={lay.pp} CP={lay.cp} DP={lay.dp}"
            + (", sequence parallel" if lay.sequence_parallel else ""),
        ),
        (
            "recomputation",
            lay.recompute if lay.recompute != "full" else f"full (uniform, {lay.recompute_num_layers} layer)",
        ),
        (
            "micro-batch",
            f"{lay.micro_batch_size} x {lay.num_microbatches} per step per replica "
            f"(global batch {plan.global_batch_size})",
        ),
        ("tokens/step", f"{plan.tokens_per_step:,}"),
        (
            "memory/GPU",
            f"{c.estimate.total / GiB:.1f} GiB: "
            + ", ".join(f"{k} {v / GiB:.1f}" for k, v in c.estimate.parts.items()),
        ),
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
    text = (
        f"no layout fits length {plan.seq_length} on {hw.nodes} x {hw.gpus_per_node} GPUs of "
        f"{hw.gpu_memory_gb:g} GiB ({hw.usable_bytes / GiB:.1f} GiB usable): tried {len(plan.tried)} layouts "
        f"(TP {','.join(map(str, tps)) or '-'}, CP {','.join(map(str, cps)) or '-'}, "
        f"PP {','.join(map(str, pps)) or '-'}, recomputation none/full)"
    )
    miss = plan.closest_miss()
    if miss:
        text += f"; closest: {miss.layout.describe()} at {miss.estimate.total / GiB:.1f} GiB per GPU"
    return text + "; use more GPUs or nodes, or a shorter --seq-length"


def propose_forward(
    shape: ModelShape,
    length: int,
    available: Callable[[int], float],
    *,
    micro_batch_size: int = 1,
    dtype_bytes: int = 4,
    max_processes: int = 64,
    padded: bool = True,
    generate: bool = False,
) -> Optional[Layout]:
    """The smallest TP x CP x PP (fewest processes; then TP before CP before PP) whose forward estimate fits
    90 % of ``available(processes)`` bytes per process: what the evaluation tools propose when a length does
    not fit. ``generate``: with the key/value cache, and no CP (generation runs without it)."""
    fixed = dict(micro_batch_size=micro_batch_size, dtype_bytes=dtype_bytes, padded=padded, generate=generate)
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
                est = forward_estimate(shape, length, tp=tp, pp=pp, cp=cp, **fixed)
                if est.total <= HEADROOM * available(tp * pp * cp):
                    options.append(Layout(tp=tp, pp=pp, cp=cp))
    return min(options, key=lambda lay: (lay.model_parallel, lay.pp, lay.cp), default=None)
