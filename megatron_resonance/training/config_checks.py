"""The config's own rules at a world size (``check``): checked before any process starts, each failure one
ConfigError line naming the flag."""

from __future__ import annotations

import math

from megatron_resonance.config_fields import check_choices, choices, field_types
from megatron_resonance.errors import ConfigError
from megatron_resonance.megatron.llama import resolve_spec
from megatron_resonance.training.config import SECTIONS, Config, ParallelConfig, warmup_iters


def check(cfg: Config, world_size: int) -> None:
    """ConfigError with one clear line for a config that cannot run at ``world_size`` ranks: values out of
    range, a layout that does not divide the model, the batch or the world, a schedule that cannot work."""
    p, d, m = cfg.parallel, cfg.data, cfg.model
    _check_ranges(cfg)
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp)):
        if value < 1:
            raise ConfigError(f"--{name}-model-parallel-size must be >= 1, got {value}")
    m.check_parallel(tp)
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
    a negative lr trips an assertion in the scheduler, a negative interval fires at every step), or a value
    that is not one of its field's choices."""
    for section in SECTIONS:
        check_choices(getattr(cfg, section))
    for name, least in _AT_LEAST:
        section, field = name.split(".")
        value = getattr(getattr(cfg, section), field)
        if value is not None and value < least:
            raise ConfigError(f"--{field.replace('_', '-')} must be >= {least}, got {value}")
    for flag, value in (
        ("--distributed-timeout-minutes", cfg.parallel.distributed_timeout_minutes),
        ("--signal-save-timeout", cfg.checkpoint.signal_save_timeout),
    ):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    try:
        resolve_spec(cfg.parallel.transformer_impl)
    except RuntimeError as e:  # te without Transformer Engine
        raise ConfigError(str(e)) from None
    o = cfg.optimizer
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
    if g == "selective":
        if method is not None or n is not None:
            raise ConfigError("--recompute-granularity selective takes no --recompute-method or --recompute-num-layers")
        return
    if method is None:
        methods = " or ".join(choices(field_types(ParallelConfig)["recompute_method"]))
        raise ConfigError(f"--recompute-granularity full needs --recompute-method {methods}, got None")
    if n is None or not 1 <= n <= layers_per_stage:
        raise ConfigError(
            f"--recompute-num-layers must be between 1 and the {layers_per_stage} layers of a pipeline stage, got {n}"
        )


def _check_split(split: str) -> None:
    """Megatron-LM's ``--split``: 1 to 3 comma-separated non-negative weights (train, validation, test), the
    train weight above 0 (megatron's own parser takes any numbers it finds in the string, and divides by
    their sum)."""
    try:
        weights = [float(part) for part in split.split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(0 <= w < float("inf") for w in weights):
        raise ConfigError(
            f"--split {split!r}: expected 1 to 3 comma-separated weights (train, validation, test), e.g. 98,2,0"
        )
    if not weights[0] > 0:
        raise ConfigError(f"--split {split}: the train weight must be above 0")


def _check_documents(cfg: Config) -> None:
    """Document masking needs attention that takes per-token positions and per-document masks: the local
    spec's (Transformer Engine's packed THD path is not wired to it yet). ``--eod-mask-loss`` alone only
    changes the loss mask, and mock data is fine: megatron's MockGPTDataset ends every synthetic document
    with the EOD id (as the preprocessor ends every real one)."""
    d = cfg.data
    positional = [
        flag
        for flag, on in (
            ("--reset-position-ids", d.reset_position_ids),
            ("--reset-attention-mask", d.reset_attention_mask),
        )
        if on
    ]
    if positional and resolve_spec(cfg.parallel.transformer_impl) == "te":
        raise ConfigError(
            f"{' '.join(positional)}: document masking needs the local attention (--transformer-impl "
            "local); Transformer Engine's packed (THD) path is not wired to it yet"
        )
