"""Typed configuration tree for training and context extension.

YAML presets in ``configs/`` mirror the sections below; every field is also a command-line flag under its
Megatron-LM name (``tensor_model_parallel_size`` -> ``--tensor-model-parallel-size``), and command-line
values override the file. Unknown keys in a file are an error. The resolved config is saved with every
checkpoint (``megatron_resonance.json``, key ``run``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Literal, Optional

import yaml

from megatron_resonance import config_fields
from megatron_resonance.config_fields import field
from megatron_resonance.errors import ConfigError
from megatron_resonance.megatron.llama import SPECS, LlamaConfig, Spec
from megatron_resonance.rope import RopeConfig


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field(1, "tensor-parallel ranks (must divide heads and query groups)")
    pipeline_model_parallel_size: int = field(1, "pipeline stages (must divide num_layers)")
    virtual_pipeline_model_parallel_size: Optional[int] = field(
        None, "model chunks per pipeline stage (interleaved 1F1B)"
    )
    context_parallel_size: int = field(
        1,
        "context-parallel ranks: each holds 2 of the sequence's 2*CP chunks (seq_length % 2*CP == 0); TE's CP "
        "with Transformer Engine, else SDPA attention over all-gathered keys and values",
    )
    sequence_parallel: bool = field(False, "shard layer-norm/dropout activations over TP ranks")
    transformer_impl: Spec = field(
        "auto", f"layer spec: {', '.join(SPECS)} (auto = TE when present, else local)", label="layer spec"
    )
    recompute_granularity: Optional[Literal["full", "selective"]] = field(
        None,
        "activation recomputation: full (whole layers) or selective (core attention); default none "
        "(tools/plan_layout.py says when it is needed)",
    )
    recompute_method: Optional[Literal["uniform", "block"]] = field(
        None,
        "full recomputation: uniform (a checkpoint every recompute_num_layers layers) or block (the first "
        "recompute_num_layers layers of each pipeline stage)",
    )
    recompute_num_layers: Optional[int] = field(None, "layers per recomputed unit (uniform) or per stage (block)")
    distributed_timeout_minutes: float = field(
        10.0,
        "minutes a collective waits for the other ranks before the run stops with one line (a hung or "
        "dead rank); raise it where rank 0 alone builds a large dataset index",
    )


@dataclasses.dataclass
class DataConfig:
    data_path: Optional[str] = field(None, "indexed-dataset prefix (…/name without .bin/.idx) for training")
    valid_data_path: Optional[str] = field(
        None, "indexed-dataset prefix for evaluation (default: the validation part of data_path, see split)"
    )
    split: str = field(
        "98,2,0",
        "train,validation,test weights dividing data_path's documents when there is no valid_data_path "
        "(Megatron-LM's --split; the test part is not used)",
    )
    mock_data: bool = field(False, "synthetic tokens instead of a dataset (megatron MockGPTDataset)")
    tokenizer_model: Optional[str] = field(
        None,
        "SentencePiece .model, Hugging Face tokenizer.json or a directory with either; sets the vocabulary "
        "size and the end-of-document id",
    )
    seq_length: int = field(128, "tokens per training sample")
    micro_batch_size: int = field(1, "samples per micro-batch per data-parallel rank")
    global_batch_size: int = field(8, "samples per optimizer step (a multiple of micro_batch_size x DP)")
    data_cache_path: Optional[str] = field(None, "where megatron's GPTDataset caches its sample index")
    reset_position_ids: bool = field(
        False, "rotary positions restart at 0 after every EOD of a packed sample (exact angles of any rope kind)"
    )
    reset_attention_mask: bool = field(
        False, "attention never crosses an EOD: each packed document attends only to itself (no dense mask)"
    )
    eod_mask_loss: bool = field(False, "leave the EOD tokens out of the loss")


@dataclasses.dataclass
class OptimizerConfig:
    optimizer: Literal["adam", "sgd"] = field("adam", "adam (AdamW: decoupled weight decay) or sgd")
    lr: float = field(3e-4, "peak learning rate")
    min_lr: float = field(3e-5, "final learning rate of the decay")
    weight_decay: float = field(0.1, "decoupled weight decay")
    adam_beta1: float = field(0.9, "Adam beta1")
    adam_beta2: float = field(0.95, "Adam beta2")
    adam_eps: float = field(1e-8, "Adam epsilon")
    clip_grad: float = field(1.0, "global gradient-norm clip (0 disables)")
    lr_warmup_fraction: Optional[float] = field(
        None, "warm-up as a fraction of train_iters (wins over lr_warmup_iters)"
    )
    lr_warmup_iters: int = field(0, "linear warm-up steps")
    lr_decay_style: Literal["constant", "linear", "cosine"] = field("cosine", "constant, linear or cosine")
    lr_decay_iters: Optional[int] = field(None, "decay length in steps (default: train_iters)")
    use_distributed_optimizer: bool = field(True, "shard optimizer state over data-parallel ranks (ZeRO-1)")


@dataclasses.dataclass
class TrainingConfig:
    train_iters: int = field(100, "optimizer steps to run (total, including resumed ones)")
    seed: int = field(1234, "random seed")
    bf16: Optional[bool] = field(None, "bf16 weights and compute (default: on GPU yes, on CPU fp32)")
    eval_interval: int = field(0, "evaluate every N steps (0: only at the end)")
    eval_iters: int = field(4, "validation batches per evaluation")
    exit_interval: Optional[int] = field(None, "stop (after saving) once the iteration is a multiple of this")


@dataclasses.dataclass
class CheckpointConfig:
    save: Optional[str] = field(None, "checkpoint directory (also where metrics.jsonl and TensorBoard logs go)")
    load: Optional[str] = field(None, "checkpoint to start from (a directory with latest_checkpointed_iteration.txt)")
    save_interval: int = field(0, "save every N steps (0: only at the end and on a signal)")
    finetune: bool = field(False, "load model weights only: fresh optimizer, scheduler and iteration count")
    exit_on_signal: bool = field(True, "SIGTERM/SIGUSR1: finish the step, save, exit 0 (Slurm preemption)")
    signal_save_timeout: float = field(
        180.0,
        "seconds from SIGTERM/SIGUSR1 in which the step and the save must finish; past it (a hung "
        "rank) the job gives up, exits 1 and the last complete checkpoint stays latest",
    )


@dataclasses.dataclass
class LoggingConfig:
    log_interval: int = field(10, "console/metrics line every N steps")
    tensorboard_dir: Optional[str] = field(None, "TensorBoard directory (default: <save>/tensorboard)")


SECTIONS = {
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclasses.dataclass
class Config:
    """The whole run: model (with rope plan) and one section per concern."""

    model: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def recompute_settings(p: ParallelConfig) -> Dict[str, Any]:
    """The TransformerConfig fields of the recomputation flags (empty: none)."""
    if p.recompute_granularity is None:
        return {}
    return dict(
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
    )


def warmup_iters(cfg: Config) -> int:
    o = cfg.optimizer
    if o.lr_warmup_fraction is not None:
        return round(o.lr_warmup_fraction * cfg.training.train_iters)
    return o.lr_warmup_iters


# ==========================================================================================================
# Reading a config: YAML file, then command-line flags
# ==========================================================================================================


def from_dict(d: Dict[str, Any], where: str = "config") -> Config:
    """Build a Config from nested dicts (a parsed YAML file). Unknown keys and values of the wrong type raise
    ConfigError."""
    d = config_fields.mapping(d, where, "config")
    config_fields.check_keys(Config, d, where)
    model = config_fields.mapping(d.get("model"), where, "model")
    rope = config_fields.mapping(model.pop("rope", None), where, "model.rope")
    config_fields.check_keys(LlamaConfig, model, f"{where}: model")
    config_fields.check_keys(RopeConfig, rope, f"{where}: model.rope")
    model = config_fields.check_types(LlamaConfig, model, where, "model")
    rope = config_fields.check_types(RopeConfig, rope, where, "model.rope")
    sections = {name: config_fields.from_dict(cls, d.get(name), where, name) for name, cls in SECTIONS.items()}
    model_cfg = LlamaConfig(**model)  # the rope plan's head dim is the model's:
    model_cfg = dataclasses.replace(model_cfg, rope=RopeConfig(**{**rope, "head_dim": model_cfg.head_dim}))
    return Config(model=model_cfg, **sections)


def load_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


# ----------------------------------------------------------------------------------------------------------
# Command line: every field as a Megatron-LM style flag
# ----------------------------------------------------------------------------------------------------------


#: the argument groups of ``--help``, each with the config dataclass whose fields (with a flag) it lists
_FLAG_GROUPS = (("model", LlamaConfig), ("rotary position embedding", RopeConfig), *SECTIONS.items())


def _add(parser, cls: type, f: dataclasses.Field) -> None:
    flag = config_fields.flag_of(f)
    help = config_fields.help_of(f).replace("%", "%%")  # argparse %-formats help strings ("seq_length % 2*CP")
    ftype, _ = config_fields.unwrap(config_fields.field_types(cls)[f.name])
    kind = dict(action=argparse.BooleanOptionalAction) if ftype is bool else dict(type=ftype)
    parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None, help=help, **kind)


def _flag_fields(cls: type):
    return [f for f in dataclasses.fields(cls) if config_fields.flag_of(f)]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one flag per config field (defaults None: only given flags override)."""
    parser.add_argument("--config", help="YAML preset (configs/*.yaml); flags override it")
    for title, cls in _FLAG_GROUPS:
        g = parser.add_argument_group(title)
        for f in _flag_fields(cls):
            _add(g, cls, f)


def _flags_given(args: argparse.Namespace, cls: type) -> Dict[str, Any]:
    """``cls``'s fields that ``args`` sets by their flags."""
    values = {f.name: getattr(args, config_fields.flag_of(f), None) for f in _flag_fields(cls)}
    return {name: value for name, value in values.items() if value is not None}


def rope_settings_given(args: argparse.Namespace) -> Dict[str, Any]:
    """The rope fields this run sets explicitly: ``--config``'s ``model.rope``, then rope flags."""
    given: Dict[str, Any] = {}
    if getattr(args, "config", None):
        model = load_yaml(args.config).get("model")
        rope = model.get("rope") if isinstance(model, dict) else None
        given.update(rope if isinstance(rope, dict) else {})  # a wrong type is reported by from_dict
    return {**given, **_flags_given(args, RopeConfig)}


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> Config:
    """Merge: built-in defaults < ``base`` < ``--config`` file < explicit flags."""
    d: Dict[str, Any] = _deep_merge({}, base or {})
    if getattr(args, "config", None):
        d = _deep_merge(d, load_yaml(args.config))
    given = {name: _flags_given(args, cls) for name, cls in (("model", LlamaConfig), *SECTIONS.items())}
    rope = _flags_given(args, RopeConfig)
    if rope:
        given["model"]["rope"] = rope
    d = _deep_merge(d, {name: values for name, values in given.items() if values})
    return from_dict(d, where=args.config or "config")


def _deep_merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
