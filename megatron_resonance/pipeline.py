"""What ``slurm/submit_pipeline.sh`` submits: which stages a (re)submission into a work directory runs, and
every stage's inputs and memory fit, checked where the pipeline is submitted, before the first job is queued.

The stages and their outputs in the work directory, and when an output counts as complete::

    convert  megatron/  a checkpoint that verifies (checkpoint_layout.verify_checkpoint), converted from HF_MODEL
    extend   extended/  a checkpoint that verifies, at the run's --train-iters
    export   hf/        a Hugging Face directory whose config and every weight's header read back
    eval     eval/      report.json with every model and length asked for, on the data asked for

A rerun skips the complete stages before the first incomplete one, and runs that one and every later one
(a later output was made from the earlier one's old output). The extension resumes from its own
checkpoints; the converters replace an incomplete or outdated output (they write into a temporary directory
and swap it in when done); an extension whose input is converted again starts over, its old checkpoints
moved aside (``extended.old-<time>``), never deleted. ``overwrite`` runs every stage again.

The checks are the stages' own, made with what exists now: the source converts (``check_source``); the
extension's configuration is built from the stored model or, before the conversion, from the Hugging Face
config it will store, and validated at the job's world size (``validation.resolve_and_validate``); the
extension's training step and the evaluation's forward pass at the longest length fit the memory the jobs
get (``planning``: the estimate the trainer's layout planner and the evaluation tools use).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from typing import List, Optional, Sequence

from megatron_resonance import layout_planner, planning
from megatron_resonance.conversion.hf_to_megatron import check_source
from megatron_resonance.errors import CheckpointError, ConversionError, UserError
from megatron_resonance.evaluation import perplexity
from megatron_resonance.evaluation.memory import DoesNotFit, check_fits, forward_bytes
from megatron_resonance.hf import config as hf_config
from megatron_resonance.hf.rope import ROPE_FORMATS
from megatron_resonance.megatron import checkpoint_layout
from megatron_resonance.training import extension, launch, validation
from megatron_resonance.training.config import Config

GiB = 1024**3
STAGES = ("convert", "extend", "export", "eval")
#: each stage's output directory in the work directory
OUTPUTS = {"convert": "megatron", "extend": "extended", "export": "hf", "eval": "eval"}
#: what a stage does: nothing (its output is complete), write its output, replace the output there, or continue
#: the extension from its checkpoints
ACTIONS = ("skip", "run", "replace", "resume")


@dataclasses.dataclass
class Request:
    """A pipeline as submitted (the variables of ``submit_pipeline.sh``)."""

    hf_model: str
    work_dir: str
    extend_args: List[str]
    """The trainer flags ``extend_context.sbatch`` passes (``common.sh``'s ``mr_trainer_args``)."""
    nodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    node_memory_gb: Optional[float] = None
    """Memory of a node (CPU mode: what the extension's processes share); None: not known, not checked."""
    eval_memory_gb: Optional[float] = None
    """Memory of the evaluation job on CPU (its ``--mem``; default ``node_memory_gb``)."""
    convert_dtype: Optional[str] = None
    export_dtype: Optional[str] = None
    rope_format: str = "longrope"
    eval_lengths: Sequence[int] = (4096, 8192, 16384, 32768)
    eval_models: Sequence[str] = ("original", "extended")
    eval_data: Optional[str] = None
    eval_args: Sequence[str] = ()
    """More flags of tools/eval_perplexity.py (EVAL_ARGS)."""
    overwrite: bool = False

    @property
    def cpu(self) -> bool:
        return self.gpus_per_node == 0

    def output(self, stage: str) -> str:
        return os.path.join(self.work_dir, OUTPUTS[stage])


@dataclasses.dataclass
class Stage:
    name: str
    action: str
    detail: str

    def line(self) -> str:
        return f"{self.name} {self.action} {self.detail}"


def _problem(stage: str, e: BaseException) -> UserError:
    return UserError(f"{stage}: {e}")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str], stage: str, given_by: str) -> argparse.Namespace:
    """A job's flags parsed by its own tool's parser; a bad one is a UserError naming the stage and the
    variables that gave it, instead of the tool's exit."""

    def refuse(message: str):
        raise UserError(f"{stage}: {message} ({given_by})")

    parser.error = refuse
    return parser.parse_args(list(argv))


# ==========================================================================================================
# Is a stage's output complete?
# ==========================================================================================================


def converted(req: Request) -> Optional[str]:
    """None when ``megatron/`` is a complete conversion of HF_MODEL, else why not."""
    root = req.output("convert")
    try:
        ckpt = checkpoint_layout.resolve_checkpoint(root)
        checkpoint_layout.verify_checkpoint(ckpt)
        run = checkpoint_layout.read_config(ckpt).get("run", {})
    except CheckpointError as e:
        return str(e)
    source = run.get("converted_from")
    if source != os.path.abspath(req.hf_model):
        raise UserError(
            f"convert: {root} holds a conversion of {source}, not HF_MODEL={req.hf_model}: use another "
            "WORK_DIR, or OVERWRITE=1 to run every stage again"
        )
    if req.convert_dtype and run.get("dtype") != req.convert_dtype:
        return f"it is {run.get('dtype')}, CONVERT_DTYPE={req.convert_dtype}"
    return None


def extension_progress(req: Request) -> Optional[int]:
    """The iteration of the newest complete checkpoint in ``extended/`` (None: none)."""
    ckpt, _ = checkpoint_layout.newest_usable_checkpoint(req.output("extend"))
    return None if ckpt is None else int(os.path.basename(ckpt)[len("iter_") :])


def exported(req: Request) -> Optional[str]:
    """None when ``hf/`` reads back as a Hugging Face LLaMA (config and every tensor header), else why not."""
    try:
        hf = check_source(req.output("export"), log=lambda _: None)[0]
        hf.close()
    except ConversionError as e:
        return str(e)
    return None


def evaluated(req: Request, args) -> Optional[str]:
    """None when ``eval/report.json`` has every model and length asked for, on the data and with the settings
    asked for (``args``: the evaluation job's parsed flags)."""
    path = os.path.join(req.output("eval"), "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
        models, settings = set(report["models"]), report["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: {e.strerror if isinstance(e, OSError) else 'unreadable'}"
    missing = sorted(set(req.eval_lengths) - set(settings.get("lengths", [])))
    if set(req.eval_models) - models or missing:
        return f"{path} lacks " + ", ".join([*sorted(set(req.eval_models) - models), *map(str, missing)])
    data = os.path.abspath(req.eval_data) if req.eval_data else None
    if data and settings.get("data") != data:
        return f"{path} is of --data {settings.get('data')}"
    for key in ("stride", "max_documents", "seed", "add_bos", "micro_batch_size"):
        if key in settings and settings[key] != getattr(args, key):
            return f"{path} has {key} {settings[key]}, EVAL_ARGS asks for {getattr(args, key)}"
    return None


# ==========================================================================================================
# The plan
# ==========================================================================================================


def plan(req: Request) -> List[Stage]:
    """The stages' actions, in order; UserError with one line (``<stage>: <problem>``) for a pipeline that
    would fail: bad input to any stage, a configuration the extension refuses at its world size, a training
    step or an evaluation length that does not fit."""
    if not os.path.isfile(os.path.join(req.hf_model, "config.json")):
        raise UserError(f"HF_MODEL={req.hf_model}: no config.json there")
    stages: List[Stage] = []

    # ---------------------------------------------------------------- convert
    if req.convert_dtype and req.convert_dtype not in hf_config.DTYPES:
        raise UserError(
            f"convert: unknown CONVERT_DTYPE {req.convert_dtype!r}; expected one of {', '.join(hf_config.DTYPES)}"
        )
    try:
        hf, model, _, _ = check_source(req.hf_model, dtype=req.convert_dtype, log=lambda _: None)
        hf.close()
        hf_config_dict = hf.config
    except ConversionError as e:
        raise _problem("convert", e) from None
    why = "OVERWRITE=1" if req.overwrite else converted(req)
    stages.append(_writing("convert", req.output("convert"), why))
    rerun = why is not None  # once a stage runs, every later one does

    # ---------------------------------------------------------------- extend
    out = req.output("extend")
    moved = rerun and bool(checkpoint_layout.iterations_in(out))
    cfg = _extension_config(req, None if not rerun else model.to_dict(), validate_save=not moved)
    target = cfg.training.train_iters
    try:
        done = None if rerun else extension_progress(req)
    except CheckpointError as e:
        raise _problem("extend", e) from None
    if moved:
        stages.append(
            Stage(
                "extend",
                "replace",
                f"{out}: its checkpoints, of the earlier conversion, are moved aside; {target} iterations",
            )
        )
    elif done is not None and done >= target:
        stages.append(Stage("extend", "skip", f"{out} is complete (iteration {done} of {target})"))
    elif done is not None:
        stages.append(Stage("extend", "resume", f"{out} from iteration {done} of {target}"))
    else:
        stages.append(Stage("extend", "run", f"{out} ({target} iterations)"))
    rerun = stages[-1].action != "skip"
    _check_training_fits(req, cfg)

    # ---------------------------------------------------------------- export
    _check_export(req, cfg, hf_config_dict)
    why = "the extension runs" if rerun else exported(req)
    stages.append(_writing("export", req.output("export"), why))
    rerun = why is not None

    # ---------------------------------------------------------------- eval
    args = _check_eval(req, model)
    why = "the export runs" if rerun else evaluated(req, args)
    stages.append(_writing("eval", req.output("eval"), why))
    return stages


def _writing(stage: str, out: str, why: Optional[str]) -> Stage:
    """A stage that writes ``out`` whole: skipped when complete (``why`` None), else run, or replacing what
    is there (the converters' --overwrite swaps it only once the new output is complete)."""
    if why is None:
        return Stage(stage, "skip", f"{out} is complete")
    if os.path.isdir(out) and os.listdir(out):
        return Stage(stage, "replace", f"{out} ({why})")
    return Stage(stage, "run", out)


def _extension_config(req: Request, stored: Optional[dict], validate_save: bool) -> Config:
    """The extension's Config as its job will build it, validated at the job's world size. ``stored``: the
    model the conversion will store (None: read the converted checkpoint)."""
    args = _parse(
        launch.make_parser("extend_context.py", ""),
        req.extend_args,
        "extend",
        "EXTEND_CONFIG, TRAIN_ARGS and the layout variables give them",
    )
    try:
        cfg = extension.make_config(args, stored=stored, log=lambda _: None)
        checked = copy.deepcopy(cfg)
        if stored is not None:
            checked.checkpoint.load = None  # the convert job writes it
        if not validate_save:
            checked.checkpoint.save = None  # its old checkpoints are moved aside
        if not req.cpu and checked.parallel.transformer_impl == "te":
            # Transformer Engine is the GPU nodes' to have, not the submitting node's
            checked.parallel.transformer_impl = "local"
        validation.resolve_and_validate(checked, req.nodes * req.nproc_per_node)
    except UserError as e:
        raise _problem("extend", e) from None
    cfg.model.vocab_size = checked.model.vocab_size
    return cfg


def _check_training_fits(req: Request, cfg: Config) -> None:
    """The planner's estimate of the extension's training step, per process, against the GPU's memory (GPU
    mode) or the node's memory shared by its processes (CPU mode)."""
    if req.cpu and req.node_memory_gb is None:
        return
    p, d = cfg.parallel, cfg.data
    world = req.nodes * req.nproc_per_node
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)
    layout = planning.Layout(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size,
        dp=dp,
        vpp=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        recompute=p.recompute_granularity or "none",
        recompute_num_layers=p.recompute_num_layers or 1,
        micro_batch_size=d.micro_batch_size,
        num_microbatches=d.global_batch_size // (d.micro_batch_size * dp),
    )
    bf16 = cfg.training.bf16 if cfg.training.bf16 is not None else not req.cpu
    spec = "local" if req.cpu else ("te" if p.transformer_impl in ("te", "auto") else "local")
    shape = planning.ModelShape.from_llama(cfg.model)
    need = planning.training_estimate(
        shape,
        d.seq_length,
        layout,
        bf16=bf16,
        spec=spec,
        cpu=req.cpu,
        distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
    ).total
    if req.cpu:
        have = req.node_memory_gb * GiB / req.nproc_per_node
        where = f"a node's {req.node_memory_gb:.1f} GiB shared by {req.nproc_per_node} processes"
    else:
        have, where = req.gpu_memory_gb * GiB, f"GPU_MEMORY_GB={req.gpu_memory_gb:g}"
    if need <= planning.HEADROOM * have:
        return
    line = (
        f"extend: a training step at --seq-length {d.seq_length} needs about {need / GiB:.1f} GiB per process "
        f"at {layout.describe()} (the layout planner's estimate), {where} allow {have / GiB:.1f} GiB"
    )
    if not req.cpu:
        hardware = layout_planner.Hardware(req.nodes, req.gpus_per_node, req.gpu_memory_gb)
        proposal = layout_planner.plan(shape, d.seq_length, hardware, micro_batch_size=d.micro_batch_size, bf16=bf16)
        if proposal.chosen:
            lay = proposal.chosen.layout
            line += f"; {lay.describe()} fits: TP={lay.tp} PP={lay.pp} CP={lay.cp} (tools/plan_layout.py)"
    raise UserError(line)


def _check_export(req: Request, cfg: Config, reference: dict) -> None:
    """The export's settings, and its config.json for the extended model (the rope plan in that format)."""
    if req.rope_format not in ROPE_FORMATS:
        raise UserError(f"export: unknown ROPE_FORMAT {req.rope_format!r}; expected one of {', '.join(ROPE_FORMATS)}")
    if req.export_dtype and req.export_dtype not in hf_config.DTYPES:
        raise UserError(
            f"export: unknown EXPORT_DTYPE {req.export_dtype!r}; expected one of {', '.join(hf_config.DTYPES)}"
        )
    try:
        hf_config.export_config(cfg.model, hf_config.DTYPES[req.export_dtype or "float32"], req.rope_format, reference)
    except (ValueError, KeyError, ConversionError) as e:
        raise _problem("export", e) from None


def _check_eval(req: Request, model) -> argparse.Namespace:
    """The evaluation job's flags parse; its data exists; each evaluated model (the source and its export: the
    same shape) fits at the longest length with the evaluation's own estimate (``evaluation.memory``) in the
    job's memory."""
    models = [("original", req.hf_model), ("extended", req.output("export"))]
    argv = [a for name, path in models if name in req.eval_models for a in ("--hf", path)]
    argv += [a for name, _ in models if name in req.eval_models for a in ("--name", name)]
    argv += ["--lengths", ",".join(map(str, req.eval_lengths)), "--out", req.output("eval"), *req.eval_args]
    args = _parse(perplexity.build_parser(), argv, "eval", "EVAL_ARGS")
    if not req.eval_lengths:
        raise UserError("eval: EVAL_LENGTHS is empty")
    if req.eval_data and not (os.path.isfile(req.eval_data) or os.path.isfile(req.eval_data + ".idx")):
        raise UserError(f"eval: EVAL_DATA={req.eval_data}: no such JSONL file or indexed dataset (.bin/.idx)")
    memory = args.max_memory_gb or ((req.eval_memory_gb or req.node_memory_gb) if req.cpu else req.gpu_memory_gb)
    if memory is None:
        return args
    shape = planning.ModelShape.from_llama(model)
    # the evaluation's dtype on the job's device ("auto": bfloat16 on GPU, float32 on CPU)
    dtype_bytes = hf_config.DTYPES[args.dtype].itemsize if args.dtype != "auto" else 4 if req.cpu else 2
    longest = max(req.eval_lengths)
    try:
        check_fits(
            "the extended model",
            shape,
            longest,
            micro_batch_size=args.micro_batch_size,
            dtype_bytes=dtype_bytes,
            max_memory_gb=memory,
            hf=True,
        )
    except DoesNotFit as e:
        fits = [
            L
            for L in sorted(req.eval_lengths)
            if forward_bytes(shape, L, micro_batch_size=args.micro_batch_size, dtype_bytes=dtype_bytes, padded=False)
            <= planning.HEADROOM * memory * GiB
        ]
        hint = f"EVAL_LENGTHS up to {fits[-1]} fit" if fits else "no length of EVAL_LENGTHS fits"
        more = "the eval job more memory (EVAL_SBATCH_ARGS=--mem=...)" if req.cpu else "GPUs with more memory"
        raise UserError(f"eval: {e.message}; {hint}, or give {more}") from None
    return args
