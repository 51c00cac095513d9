"""The parallel layout a target length needs: TP, PP, CP, DP, recomputation, micro-batch, memory per GPU,
tokens per step and the sbatch line that runs it.

    python tools/plan_layout.py --load ckpt/llama2-7b --seq-length 32768 --nodes 1 --gpus-per-node 8 --gpu-memory-gb 80
    python tools/plan_layout.py --hf hf/Meta-Llama-3-8B --seq-length 131072 --nodes 8 --gpu-memory-gb 80
    python tools/plan_layout.py --model llama2-13b --config configs/llama2_13b_4k_to_16k_resonance_yarn.yaml --json

The model: ``--load`` (a Megatron checkpoint's megatron_resonance.json), ``--hf`` (config.json), ``--model``
(a built-in shape) or ``--config`` (a preset whose ``model`` section gives the shape). ``--config`` also
supplies the length and batch sizes not given as flags. The planner: megatron_resonance/layout_planner.py; its
estimate: megatron_resonance/planning.py.
A layout the planner cannot fit is one line naming what was tried and the closest miss, exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

from megatron_resonance import layout_planner, planning
from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.errors import ConfigError, UserError

# the config and evaluation modules (torch) are imported where a config file or
# checkpoint is read: the planner itself runs without torch.

PROG = "plan_layout.py"
#: built-in shapes (Hugging Face config.json values)
MODELS = {
    "llama2-7b": planning.ModelShape(32, 4096, 11008, 32, 32, 32000),
    "llama2-13b": planning.ModelShape(40, 5120, 13824, 40, 40, 32000),
    "llama2-70b": planning.ModelShape(80, 8192, 28672, 64, 8, 32000),
    "llama3-8b": planning.ModelShape(32, 4096, 14336, 32, 8, 128256),
    "llama3-70b": planning.ModelShape(80, 8192, 28672, 64, 8, 128256),
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="The parallel layout a target sequence length needs.")
    g = p.add_argument_group("model (one of)")
    g.add_argument("--load", metavar="MEGATRON_DIR", help="Megatron checkpoint (root or iter_* directory)")
    g.add_argument("--hf", metavar="HF_DIR", help="Hugging Face model directory (its config.json)")
    g.add_argument("--model", choices=sorted(MODELS), help="a built-in shape")
    g.add_argument(
        "--config",
        help="YAML preset: the model shape when no other is given; length and batch "
        "sizes not given as flags; CONFIG= of the sbatch line",
    )
    t = p.add_argument_group("target")
    t.add_argument("--seq-length", type=int, help="target sequence length (default: --config's)")
    t.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    t.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    t.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    t.add_argument("--global-batch-size", type=int, help="sequences per step (default: --config's, else one per GPU)")
    t.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch (default: --config's, else 1)")
    t.add_argument(
        "--transformer-impl",
        choices=("te", "local"),
        default="te",
        help="layer spec whose activations to count (default te: Transformer Engine)",
    )
    t.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _config_data(path: Optional[str]) -> dict:
    if not path:
        return {}
    from megatron_resonance.training.config import load_yaml

    try:
        return load_yaml(path)
    except ConfigError as e:
        raise UserError(f"--config {path}: {e}") from None


def model_shape(args) -> tuple:
    """(ModelShape, what it came from)."""
    given = [flag for flag in ("load", "hf", "model") if getattr(args, flag)]
    if len(given) > 1:
        raise UserError(f"give one model: --{given[0]} and --{given[1]} were both given")
    if args.model:
        return MODELS[args.model], args.model
    if args.load or args.hf:
        from megatron_resonance.evaluation.resolve import ModelSpec, resolve

        spec = ModelSpec("megatron", args.load) if args.load else ModelSpec("hf", args.hf)
        return resolve(spec).shape, args.load or args.hf
    model = (_config_data(args.config).get("model") or {}) if args.config else {}
    if not model.get("num_layers") or not model.get("hidden_size"):
        where = (
            f"--config {args.config} sets no model shape (model.num_layers, model.hidden_size); " if args.config else ""
        )
        raise UserError(
            f"{where}no model: give --load MEGATRON_DIR, --hf HF_DIR or --model ({', '.join(sorted(MODELS))})"
        )
    from megatron_resonance.training.config import from_dict

    cfg = from_dict(_config_data(args.config), where=args.config)
    return planning.ModelShape.from_llama(cfg.model), args.config


def make_plan(args) -> tuple:
    shape, source = model_shape(args)
    data = _config_data(args.config).get("data") or {}

    def pick(flag, key, default=None):
        return flag if flag is not None else data.get(key, default)

    seq = pick(args.seq_length, "seq_length")
    mbs = pick(args.micro_batch_size, "micro_batch_size", 1)
    gbs = pick(args.global_batch_size, "global_batch_size")
    if seq is None:
        raise UserError("no target length: give --seq-length")
    for flag, value in (
        ("--seq-length", seq),
        ("--nodes", args.nodes),
        ("--gpus-per-node", args.gpus_per_node),
        ("--micro-batch-size", mbs),
        ("--global-batch-size", gbs),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{flag} must be an integer >= 1, got {value}")
    if not args.gpu_memory_gb > 0:
        raise UserError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}")
    if gbs is not None and gbs % mbs:
        raise UserError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {mbs}")
    hardware = layout_planner.Hardware(args.nodes, args.gpus_per_node, args.gpu_memory_gb)
    result = layout_planner.plan(
        shape, seq, hardware, micro_batch_size=mbs, global_batch_size=gbs, spec=args.transformer_impl
    )
    if result.chosen is None:
        raise UserError(layout_planner.no_fit_message(result))
    script = (
        "slurm/pretrain.sbatch"
        if args.config and not (args.load or args.hf or args.model)
        else "slurm/extend_context.sbatch"
    )
    load = args.load or ("CKPT" if args.hf or args.model else None)  # --hf: convert first (docs/conversion.md)
    return result, layout_planner.sbatch_line(result, script=script, config=args.config, load=load), source


def as_json(result: layout_planner.Plan, sbatch: str, source: str) -> dict:
    lay, est = result.chosen.layout, result.chosen.estimate
    return {
        "model": source,
        "parameters": result.shape.parameters,
        "seq_length": result.seq_length,
        "nodes": result.hardware.nodes,
        "gpus_per_node": result.hardware.gpus_per_node,
        "gpu_memory_gb": result.hardware.gpu_memory_gb,
        "usable_gib_per_gpu": round(result.hardware.usable_bytes / planning.GiB, 2),
        "tensor_model_parallel_size": lay.tp,
        "pipeline_model_parallel_size": lay.pp,
        "context_parallel_size": lay.cp,
        "data_parallel_size": lay.dp,
        "sequence_parallel": lay.sequence_parallel,
        "recompute": lay.recompute,
        "recompute_num_layers": lay.recompute_num_layers if lay.recompute == "full" else None,
        "micro_batch_size": lay.micro_batch_size,
        "num_microbatches": lay.num_microbatches,
        "global_batch_size": result.global_batch_size,
        "tokens_per_step": result.tokens_per_step,
        "memory_gib_per_gpu": round(est.total / planning.GiB, 2),
        "memory_gib_by_part": est.gib(),
        "layouts_tried": len(result.tried),
        "why": result.why,
        "sbatch": sbatch,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with guard(PROG):
        if args.load and not os.path.exists(args.load) or args.hf and not os.path.exists(args.hf):
            flag = "--load" if args.load else "--hf"
            raise UserError(f"{flag} {args.load or args.hf}: no such file or directory")
        result, sbatch, source = make_plan(args)
    if args.json:
        print(json.dumps(as_json(result, sbatch, source), indent=2))
    else:
        print(layout_planner.describe(result, sbatch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
