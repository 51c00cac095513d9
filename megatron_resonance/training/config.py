"""Typed configuration tree for training and context extension.

YAML presets in ``configs/`` mirror the sections below; every field is also a command-line flag under its
Megatron-LM name (``tensor_model_parallel_size`` -> ``--tensor-model-parallel-size``), and command-line
values override the file. Unknown keys in a file are an error. The resolved config is saved with every
checkpoint (``megatron_resonance.json``, key ``run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Dict, Optional

import yaml

from megatron_resonance.errors import ConfigError  # noqa: F401 - raised here, imported from here by callers
from megatron_resonance.megatron.llama import SPECS, LlamaConfig, resolve_spec
from megatron_resonance.rope import KINDS, RopeConfig


def _f(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "tensor-parallel ranks (must divide heads and query groups)")
    pipeline_model_parallel_size: int = _f(1, "pipeline stages (must divide num_layers)")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(None, "model chunks per pipeline stage (interleaved 1F1B)")
    context_parallel_size: int = _f(
        1, "context-parallel ranks: each holds 2 of the sequence's 2*CP chunks (seq_length % 2*CP == 0); TE's CP "
        "with Transformer Engine, else SDPA attention over all-gathered keys and values")
    sequence_parallel: bool = _f(False, "shard layer-norm/dropout activations over TP ranks")
    transformer_impl: str = _f("auto", f"layer spec: {', '.join(SPECS)} (auto = TE when present, else local)")
    recompute_granularity: Optional[str] = _f(
        None, "activation recomputation: full (whole layers) or selective (core attention); default none "
        "(tools/plan_layout.py says when it is needed)")
    recompute_method: Optional[str] = _f(
        None, "full recomputation: uniform (a checkpoint every recompute_num_layers layers) or block (the first "
        "recompute_num_layers layers of each pipeline stage)")
    recompute_num_layers: Optional[int] = _f(None, "layers per recomputed unit (uniform) or per stage (block)")
    distributed_timeout_minutes: float = _f(
        10.0, "minutes a collective waits for the other ranks before the run stops with one line (a hung or "
        "dead rank); raise it where rank 0 alone builds a large dataset index")


@dataclasses.dataclass
class DataConfig:
    data_path: Optional[str] = _f(None, "indexed-dataset prefix (…/name without .bin/.idx) for training")
    valid_data_path: Optional[str] = _f(
        None, "indexed-dataset prefix for evaluation (default: the validation part of data_path, see split)")
    split: str = _f(
        "98,2,0", "train,validation,test weights dividing data_path's documents when there is no valid_data_path "
        "(Megatron-LM's --split; the test part is not used)")
    mock_data: bool = _f(False, "synthetic tokens instead of a dataset (megatron MockGPTDataset)")
    tokenizer_model: Optional[str] = _f(
        None, "SentencePiece .model, Hugging Face tokenizer.json or a directory with either; sets the vocabulary "
        "size and the end-of-document id")
    seq_length: int = _f(128, "tokens per training sample")
    micro_batch_size: int = _f(1, "samples per micro-batch per data-parallel rank")
    global_batch_size: int = _f(8, "samples per optimizer step (a multiple of micro_batch_size x DP)")
    data_cache_path: Optional[str] = _f(None, "where megatron's GPTDataset caches its sample index")
    reset_position_ids: bool = _f(
        False, "rotary positions restart at 0 after every EOD of a packed sample (exact angles of any rope kind)")
    reset_attention_mask: bool = _f(
        False, "attention never crosses an EOD: each packed document attends only to itself (no dense mask)")
    eod_mask_loss: bool = _f(False, "leave the EOD tokens out of the loss")


@dataclasses.dataclass
class OptimizerConfig:
    optimizer: str = _f("adam", "adam (AdamW: decoupled weight decay) or sgd")
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(3e-5, "final learning rate of the decay")
    weight_decay: float = _f(0.1, "decoupled weight decay")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.95, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    clip_grad: float = _f(1.0, "global gradient-norm clip (0 disables)")
    lr_warmup_fraction: Optional[float] = _f(None, "warm-up as a fraction of train_iters (wins over lr_warmup_iters)")
    lr_warmup_iters: int = _f(0, "linear warm-up steps")
    lr_decay_style: str = _f("cosine", "constant, linear or cosine")
    lr_decay_iters: Optional[int] = _f(None, "decay length in steps (default: train_iters)")
    use_distributed_optimizer: bool = _f(True, "shard optimizer state over data-parallel ranks (ZeRO-1)")


@dataclasses.dataclass
class TrainingConfig:
    train_iters: int = _f(100, "optimizer steps to run (total, including resumed ones)")
    seed: int = _f(1234, "random seed")
    bf16: Optional[bool] = _f(None, "bf16 weights and compute (default: on GPU yes, on CPU fp32)")
    eval_interval: int = _f(0, "evaluate every N steps (0: only at the end)")
    eval_iters: int = _f(4, "validation batches per evaluation")
    exit_interval: Optional[int] = _f(None, "stop (after saving) once the iteration is a multiple of this")


@dataclasses.dataclass
class CheckpointConfig:
    save: Optional[str] = _f(None, "checkpoint directory (also where metrics.jsonl and TensorBoard logs go)")
    load: Optional[str] = _f(None, "checkpoint to start from (a directory with latest_checkpointed_iteration.txt)")
    save_interval: int = _f(0, "save every N steps (0: only at the end and on a signal)")
    finetune: bool = _f(False, "load model weights only: fresh optimizer, scheduler and iteration count")
    exit_on_signal: bool = _f(True, "SIGTERM/SIGUSR1: finish the step, save, exit 0 (Slurm preemption)")
    signal_save_timeout: float = _f(
        180.0, "seconds from SIGTERM/SIGUSR1 in which the step and the save must finish; past it (a hung "
        "rank) the job gives up, exits 1 and the last complete checkpoint stays latest")


@dataclasses.dataclass
class LoggingConfig:
    log_interval: int = _f(10, "console/metrics line every N steps")
    tensorboard_dir: Optional[str] = _f(None, "TensorBoard directory (default: <save>/tensorboard)")


_MODEL_HELP = {
    "num_layers": "transformer layers",
    "hidden_size": "model width",
    "ffn_hidden_size": "SwiGLU inner width",
    "num_attention_heads": "query heads",
    "num_query_groups": "key/value heads (GQA)",
    "vocab_size": "vocabulary size (taken from --tokenizer-model when given)",
    "max_position_embeddings": "longest sequence the model is meant for",
    "norm_epsilon": "RMSNorm epsilon",
    "tie_word_embeddings": "share input embedding and output layer",
    "init_method_std": "std of the weight initialization",
    "make_vocab_size_divisible_by": "pad the vocabulary to a multiple of lcm(this, num_query_groups)",
}
#: rope fields under their Megatron-LM-style flag names
_ROPE_FLAGS = {
    "kind": ("rope_kind", f"rotary kind: {', '.join(KINDS)}"),
    "base": ("rotary_base", "RoPE base b (rope_theta)"),
    "factor": ("rope_factor", "scale s = target length / original length"),
    "original_max_position": ("original_max_position", "length L the model was trained at"),
    "beta_fast": ("beta_fast", "YaRN beta_fast"),
    "beta_slow": ("beta_slow", "YaRN beta_slow"),
    "low_freq_factor": ("low_freq_factor", "llama3 low_freq_factor"),
    "high_freq_factor": ("high_freq_factor", "llama3 high_freq_factor"),
    "attention_factor": ("attention_factor", "override YaRN's 0.1 ln s + 1"),
    "resonance": ("resonance", "round wavelengths to integers on top of any kind"),
}

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


# ==========================================================================================================
# The config's own rules (world size given): checked before any process starts
# ==========================================================================================================


def check(cfg: Config, world_size: int) -> None:
    """ConfigError with one clear line for a config that cannot run at ``world_size`` ranks: values out of
    range, a layout that does not divide the model, the batch or the world, a schedule that cannot work."""
    p, d, m = cfg.parallel, cfg.data, cfg.model
    _check_ranges(cfg)
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp)):
        if value < 1:
            raise ConfigError(f"--{name}-model-parallel-size must be >= 1, got {value}")
    try:
        m.check_parallel(tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cp > 1 and d.seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {d.seq_length} is not divisible by 2 x context-parallel-size = {2 * cp}")
    if world_size % (tp * pp * cp):
        # A layout for this world: each size cut to its largest divisor that fits (still divides what it did).
        fit, rest = [], world_size
        for flag, value in (("tensor-model", tp), ("context", cp), ("pipeline-model", pp)):
            size = math.gcd(value, rest)
            rest //= size
            if size != value:
                fit.append(f"--{flag}-parallel-size {size}")
        raise ConfigError(
            f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {tp * pp * cp}: run a "
            f"multiple of {tp * pp * cp} processes, or give a layout for {world_size}, e.g. {' '.join(fit)}"
        )
    dp = world_size // (tp * pp * cp)
    if cp > 1 and resolve_spec(p.transformer_impl) == "local_compiled":
        raise ConfigError("--context-parallel-size > 1 runs with --transformer-impl local or te, not local_compiled")
    vpp = p.virtual_pipeline_model_parallel_size or 1
    _check_recompute(p, m.num_layers // pp)
    if m.num_layers % (pp * vpp):
        raise ConfigError(f"num_layers {m.num_layers} is not divisible by PP x VPP = {pp} x {vpp}")
    if p.virtual_pipeline_model_parallel_size and pp < 2:
        raise ConfigError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {d.global_batch_size} is not a multiple of micro-batch-size x DP = "
            f"{d.micro_batch_size} x {dp}"
        )
    if vpp > 1 and (d.global_batch_size // (d.micro_batch_size * dp)) % pp:
        raise ConfigError("with virtual pipelining the number of micro-batches must be a multiple of PP")
    if d.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {d.seq_length} exceeds the model's max_position_embeddings {m.max_position_embeddings}"
        )
    if not d.mock_data and not d.data_path:
        raise ConfigError("no training data: give --data-path PREFIX or --mock-data")
    _check_documents(cfg)
    if cfg.training.train_iters < 1:
        raise ConfigError(f"--train-iters must be >= 1, got {cfg.training.train_iters}")
    warmup, decay = warmup_iters(cfg), cfg.optimizer.lr_decay_iters or cfg.training.train_iters
    if warmup >= decay:
        raise ConfigError(f"lr warm-up ({warmup} steps) must be shorter than the decay ({decay} steps)")


#: (flag, smallest allowed value) of the numbers check bounds; an interval of 0 is "off", so
#: intervals may be 0 but not negative; --log-interval has no "off"
_AT_LEAST = (
    ("data.micro_batch_size", 1), ("data.global_batch_size", 1), ("data.seq_length", 1),
    ("logging.log_interval", 1), ("training.eval_interval", 0), ("training.eval_iters", 0),
    ("checkpoint.save_interval", 0), ("training.exit_interval", 0), ("optimizer.lr", 0.0),
    ("optimizer.min_lr", 0.0), ("optimizer.lr_warmup_iters", 0), ("optimizer.lr_decay_iters", 0),
    ("optimizer.clip_grad", 0.0), ("optimizer.weight_decay", 0.0), ("optimizer.adam_eps", 0.0),
)  # fmt: skip


def _check_ranges(cfg: Config) -> None:
    """ConfigError for a number outside what the run can use (a zero batch divides by zero in a worker,
    a negative lr trips an assertion in the scheduler, a negative interval fires at every step)."""
    for name, least in _AT_LEAST:
        section, field = name.split(".")
        value = getattr(getattr(cfg, section), field)
        if value is not None and value < least:
            raise ConfigError(f"--{field.replace('_', '-')} must be >= {least}, got {value}")
    for flag, value in (("--distributed-timeout-minutes", cfg.parallel.distributed_timeout_minutes),
                        ("--signal-save-timeout", cfg.checkpoint.signal_save_timeout)):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    o = cfg.optimizer
    for flag, value, allowed in (("--optimizer", o.optimizer, ("adam", "sgd")),
                                 ("--lr-decay-style", o.lr_decay_style, ("constant", "linear", "cosine"))):
        if value not in allowed:
            raise ConfigError(f"unknown {flag} {value!r}; expected one of {', '.join(allowed)}")
    try:
        resolve_spec(cfg.parallel.transformer_impl)
    except (ValueError, RuntimeError) as e:  # an unknown spec, or te without Transformer Engine
        raise ConfigError(str(e)) from None
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
    if o.lr_warmup_fraction is not None and not 0 <= o.lr_warmup_fraction <= 1:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {o.lr_warmup_fraction}")
    for flag, beta in (("--adam-beta1", o.adam_beta1), ("--adam-beta2", o.adam_beta2)):
        if not 0 <= beta < 1:
            raise ConfigError(f"{flag} must be in [0, 1), got {beta}")
    _check_split(cfg.data.split)


def _check_recompute(p: ParallelConfig, layers_per_stage: int) -> None:
    """Megatron-LM's recomputation flags, checked as its TransformerConfig does, in one line each."""
    g, method, n = p.recompute_granularity, p.recompute_method, p.recompute_num_layers
    if g is None:
        if method is not None or n is not None:
            raise ConfigError("--recompute-method/--recompute-num-layers need --recompute-granularity full")
        return
    if g not in ("full", "selective"):
        raise ConfigError(f"unknown --recompute-granularity {g!r}; expected full or selective")
    if g == "selective":
        if method is not None or n is not None:
            raise ConfigError("--recompute-granularity selective takes no --recompute-method or --recompute-num-layers")
        return
    if method not in ("uniform", "block"):
        raise ConfigError(f"--recompute-granularity full needs --recompute-method uniform or block, got {method}")
    if n is None or not 1 <= n <= layers_per_stage:
        raise ConfigError(f"--recompute-num-layers must be between 1 and the {layers_per_stage} layers of a "
                          f"pipeline stage, got {n}")


def recompute_settings(p: ParallelConfig) -> Dict[str, Any]:
    """The TransformerConfig fields of the recomputation flags (empty: none)."""
    if p.recompute_granularity is None:
        return {}
    return dict(recompute_granularity=p.recompute_granularity, recompute_method=p.recompute_method,
                recompute_num_layers=p.recompute_num_layers)


def _check_split(split: str) -> None:
    """Megatron-LM's ``--split``: 1 to 3 comma-separated non-negative weights (train, validation, test), the
    train weight above 0 (megatron's own parser takes any numbers it finds in the string, and divides by
    their sum)."""
    try:
        weights = [float(part) for part in split.split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(0 <= w < float("inf") for w in weights):
        raise ConfigError(f"--split {split!r}: expected 1 to 3 comma-separated weights (train, validation, "
                          "test), e.g. 98,2,0")
    if not weights[0] > 0:
        raise ConfigError(f"--split {split}: the train weight must be above 0")


def _check_documents(cfg: Config) -> None:
    """Document masking needs attention that takes per-token positions and per-document masks: the local
    spec's (Transformer Engine's packed THD path is not wired to it yet). ``--eod-mask-loss`` alone only
    changes the loss mask, and mock data is fine: megatron's MockGPTDataset ends every synthetic document
    with the EOD id (as the preprocessor ends every real one)."""
    d = cfg.data
    positional = [flag for flag, on in (("--reset-position-ids", d.reset_position_ids),
                                        ("--reset-attention-mask", d.reset_attention_mask)) if on]
    if positional and resolve_spec(cfg.parallel.transformer_impl) == "te":
        raise ConfigError(f"{' '.join(positional)}: document masking needs the local attention (--transformer-impl "
                          "local); Transformer Engine's packed (THD) path is not wired to it yet")


def warmup_iters(cfg: Config) -> int:
    o = cfg.optimizer
    if o.lr_warmup_fraction is not None:
        return round(o.lr_warmup_fraction * cfg.training.train_iters)
    return o.lr_warmup_iters




# ==========================================================================================================
# Reading a config: YAML file, then command-line flags
# ==========================================================================================================


def _check_keys(where: str, given: Dict[str, Any], cls) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}")


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def _check_types(where: str, section: str, given: Dict[str, Any], cls) -> Dict[str, Any]:
    """``given`` with each value checked against ``cls``'s field type (int, float, bool, str, optionally
    None); ConfigError naming the field, the value and the expected type. A float field also takes an
    integer, and a number YAML 1.1 reads as a string (``3e-4``: no dot)."""
    hints = typing.get_type_hints(cls)
    out = dict(given)
    for name, value in given.items():
        hint = hints.get(name)
        args = typing.get_args(hint)
        optional = type(None) in args
        expected = next((a for a in args if a is not type(None)), hint) if optional else hint
        if expected not in _TYPE_NAMES or (value is None and optional):
            continue
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and not ok and not isinstance(value, bool):
            if isinstance(value, int):
                ok = True
            elif isinstance(value, str):
                try:
                    out[name], ok = float(value), True
                except ValueError:
                    pass
        if not ok:
            raise ConfigError(
                f"{where}: {section}.{name} is {value!r}, expected {_TYPE_NAMES[expected]}"
                + (" or null" if optional else "")
            )
    return out


def from_dict(d: Dict[str, Any], where: str = "config") -> Config:
    """Build a Config from nested dicts (a parsed YAML file). Unknown keys raise ConfigError."""
    d = dict(d or {})
    _check_keys(where, d, Config)
    model = _mapping(where, "model", d.pop("model", {}))
    _check_keys(f"{where}: model", model, LlamaConfig)
    rope = _mapping(where, "model.rope", model.pop("rope", {}))
    _check_keys(f"{where}: model.rope", rope, RopeConfig)
    model = _check_types(where, "model", model, LlamaConfig)
    rope = _check_types(where, "model.rope", rope, RopeConfig)
    rope.setdefault("head_dim", 0)  # filled from the model shape below
    sections = {}
    for name, cls in SECTIONS.items():
        values = _mapping(where, name, d.get(name, {}))
        _check_keys(f"{where}: {name}", values, cls)
        values = _check_types(where, name, values, cls)
        sections[name] = cls(**values)
    model_cfg = _model_from(model, rope)
    return Config(model=model_cfg, **sections)


def _mapping(where: str, section: str, value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {section} is {value!r}, expected a mapping of keys")
    return dict(value)


def _model_from(model: Dict[str, Any], rope: Dict[str, Any]) -> LlamaConfig:
    base = LlamaConfig(**{k: v for k, v in model.items()}, rope=RopeConfig())
    rope = dict(rope, head_dim=base.head_dim)
    try:
        return dataclasses.replace(base, rope=RopeConfig(**rope))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.rope: {e}") from e


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add(parser, dest: str, ftype, help: str) -> None:
    help = help.replace("%", "%%")  # argparse %-formats help strings ("seq_length % 2*CP")
    t = ftype if isinstance(ftype, type) else None
    if ftype in (bool, Optional[bool], "bool", "Optional[bool]"):
        parser.add_argument(_flag(dest), dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help)
        return
    text = str(ftype)
    if t is None:
        t = int if "int" in text else float if "float" in text else str
    parser.add_argument(_flag(dest), dest=dest, type=t, default=None, help=help)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one flag per config field (defaults None: only given flags override)."""
    parser.add_argument("--config", help="YAML preset (configs/*.yaml); flags override it")
    g = parser.add_argument_group("model")
    for f in dataclasses.fields(LlamaConfig):
        if f.name != "rope":
            _add(g, f.name, f.type, _MODEL_HELP.get(f.name, f.name))
    g = parser.add_argument_group("rotary position embedding")
    for field_name, (dest, help) in _ROPE_FLAGS.items():
        ftype = {f.name: f.type for f in dataclasses.fields(RopeConfig)}[field_name]
        _add(g, dest, ftype, help)
    for section, cls in SECTIONS.items():
        g = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            _add(g, f.name, f.type, f.metadata.get("help", ""))


def rope_settings_given(args: argparse.Namespace) -> Dict[str, Any]:
    """The rope fields this run sets explicitly: ``--config``'s ``model.rope``, then rope flags."""
    given: Dict[str, Any] = {}
    if getattr(args, "config", None):
        model = load_yaml(args.config).get("model")
        rope = model.get("rope") if isinstance(model, dict) else None
        given.update(rope if isinstance(rope, dict) else {})  # a wrong type is reported by from_dict
    for field_name, (dest, _) in _ROPE_FLAGS.items():
        if getattr(args, dest, None) is not None:
            given[field_name] = getattr(args, dest)
    return given


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> Config:
    """Merge: built-in defaults < ``base`` < ``--config`` file < explicit flags."""
    d: Dict[str, Any] = _deep_merge({}, base or {})
    if getattr(args, "config", None):
        d = _deep_merge(d, load_yaml(args.config))
    overrides: Dict[str, Any] = {}
    for f in dataclasses.fields(LlamaConfig):
        if f.name != "rope" and getattr(args, f.name, None) is not None:
            overrides.setdefault("model", {})[f.name] = getattr(args, f.name)
    for field_name, (dest, _) in _ROPE_FLAGS.items():
        if getattr(args, dest, None) is not None:
            overrides.setdefault("model", {}).setdefault("rope", {})[field_name] = getattr(args, dest)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if getattr(args, f.name, None) is not None:
                overrides.setdefault(section, {})[f.name] = getattr(args, f.name)
    d = _deep_merge(d, overrides)
    return from_dict(d, where=args.config or "config")


def _deep_merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
