"""PosGen benchmark presets: everything that fixes a run (model shape, data sizes, optimization, evaluation).

A run is every (task, seed, trained kind) cell of its preset. Each seed trains two models, with ``rope``
and with ``resonance``; each is tested as two variants (the paper's reference code trains with plain or
rounded RoPE and switches to the YaRN variant only for evaluation):

    variant          trained with   evaluated with
    rope             rope           rope
    resonance        resonance      resonance
    yarn             rope           yarn            (s = scaling_factor, original length = train_length)
    resonance_yarn   resonance      resonance_yarn  (idem)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Dict, Literal, Optional

from megatron_resonance.config_fields import check_choices, field, field_types, unwrap
from megatron_resonance.errors import ConfigError
from megatron_resonance.posgen.tasks import PREFIX_LENGTH, TASKS

Protocol = Literal["clean", "reference"]
#: each protocol's description, in the order of ``Protocol``
PROTOCOLS = dict(zip(typing.get_args(Protocol), (
    "train / validation / test from disjoint seed prefixes (posgen.splits); test-time YaRN as Hugging "
    "Face defines it (s = scaling_factor, original length = train length, beta 32 / 1)",
    "as the paper's reference code: the 2,380 sorted 4-token combinations cycled into the training "
    "rows, validation and test rows taken from those rows; its test-time YaRN (s = (test length + 1) "
    "/ (train length + 1), beta 2 / 1, correction range at test length + 1); accuracy is the argmax "
    "over the whole model vocabulary",
)))  # fmt: skip
"""How a run builds its data, its test-time YaRN and its metric, by name (``--protocol``); docs/posgen.md
lists every difference between the reference code and the clean protocol."""

VARIANTS = ("rope", "resonance", "yarn", "resonance_yarn")
"""Test variants, in report order."""
TRAINED_KINDS = ("rope", "resonance")
"""Rotary kinds models are trained with."""
EVALUATED_AS = {"rope": ("rope", "yarn"), "resonance": ("resonance", "resonance_yarn")}
"""Each trained kind and the variants its model is tested as."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that fixes a benchmark run: model shape, data sizes, optimization and evaluation."""

    name: str = field(help="preset name (paper, small, demo, smoke)")
    tasks: tuple = field(TASKS, "PosGen subtasks to run (--tasks overrides)")
    seeds: int = field(5, "seeds 0..seeds-1 per task x variant (--seeds overrides); a seed fixes data order and init")
    num_layers: int = field(2, "transformer layers")
    hidden_size: int = field(512, "model width d_model")
    num_attention_heads: int = field(8, "attention heads, as many key/value heads; head dim = hidden_size / heads")
    ffn_hidden_size: int = field(2048, "SwiGLU inner width")
    rotary_base: float = field(10000.0, "RoPE base b")
    train_length: int = field(64, "training sequence length (rotary positions 0..63)")
    test_length: int = field(256, "test sequence length; positions train_length..test_length-1 are out of distribution")
    scaling_factor: float = field(4.0, "YaRN scale s of the yarn variants (original length = train_length)")
    train_sequences: int = field(10_000, "training sequences (distinct seed prefixes)")
    validation_sequences: int = field(1_000, "validation sequences at train_length, scored in training (progress only)")
    test_sequences: int = field(1_000, "test sequences at test_length (the same set for every seed and variant)")
    epochs: float = field(150, "passes over the training sequences")
    global_batch_size: int = field(128, "sequences per optimizer step (over all data-parallel ranks)")
    micro_batch_size: Optional[int] = field(None, "sequences per forward/backward per rank; None: one micro-batch")
    lr: float = field(2e-4, "peak learning rate (AdamW)")
    min_lr: float = field(0.0, "learning rate at the end of the cosine decay")
    weight_decay: float = field(0.01, "decoupled weight decay (megatron exempts biases and norm weights)")
    warmup_fraction: float = field(0.1, "linear warm-up as a fraction of all steps, then cosine decay to min_lr")
    adam_beta1: float = field(0.9, "Adam beta1")
    adam_beta2: float = field(0.999, "Adam beta2")
    clip_grad: float = field(0.0, "global gradient-norm clip (0: none, as the reference's Lightning default)")
    eval_batch_size: int = field(100, "sequences per evaluation forward pass")
    validation_interval: int = field(10, "score the validation split every this many epochs (and after the last)")
    bf16: bool = field(False, "train in bf16 with fp32 main weights (megatron's Float16Module + distributed optimizer)")
    test_seed: int = field(0, "seed of the test split (fixed: every seed and variant is scored on the same sequences)")
    protocol: Protocol = field("clean", "one of PROTOCOLS (--protocol)")

    def __post_init__(self):
        check_choices(self)
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ConfigError(f"tasks must be a non-empty subset of {', '.join(TASKS)}, got {self.tasks}")
        if not PREFIX_LENGTH < self.train_length < self.test_length:
            raise ConfigError(
                f"need {PREFIX_LENGTH} < train_length < test_length, got {self.train_length}, {self.test_length}"
            )
        if self.protocol == "reference" and self.validation_sequences + self.test_sequences > self.train_sequences:
            raise ConfigError(
                f"the reference protocol takes validation and test rows from the training rows: need "
                f"validation_sequences + test_sequences <= train_sequences, got {self.validation_sequences} + "
                f"{self.test_sequences} > {self.train_sequences}"
            )
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ConfigError("hidden_size / num_attention_heads must be an even integer")
        for name in (
            "seeds",
            "epochs",
            "global_batch_size",
            "train_sequences",
            "validation_sequences",
            "test_sequences",
            "eval_batch_size",
            "validation_interval",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def fingerprint(self) -> dict:
        """The fields a stored cell's results depend on (tasks and seeds only choose which cells run)."""
        d = dataclasses.asdict(self)
        for key in ("name", "tasks", "seeds", "eval_batch_size", "validation_interval", "micro_batch_size"):
            d.pop(key)
        if not d["bf16"]:
            d.pop("bf16")  # fp32 runs match the records stored before bf16 was a setting
        if d["protocol"] == "clean":
            d.pop("protocol")  # clean runs match the records stored before the protocol was a setting
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def train_iters(self) -> int:
        return max(1, math.ceil(self.epochs * self.train_sequences / self.global_batch_size))

    def cells(self) -> list:
        """Every (task, seed, trained kind) of the run, in run order."""
        return [(t, s, k) for t in self.tasks for s in range(self.seeds) for k in TRAINED_KINDS]


_OWN_FLAGS = ("name", "tasks", "seeds", "epochs", "bf16", "protocol")
"""Preset fields ``--set`` does not take (the name, or a field with its own command-line flag)."""


def with_settings(preset: Preset, settings: Dict[str, str]) -> Preset:
    """``preset`` with fields set from ``name -> text`` (the command line's ``--set name=value``), each text
    read as its field's type; ConfigError with one line naming the field for an unknown name or bad value."""
    types = field_types(Preset)
    values = {}
    for name, text in settings.items():
        if name not in types or name in _OWN_FLAGS:
            settable = sorted(set(types) - set(_OWN_FLAGS))
            raise ConfigError(
                f"--set {name}: not a preset setting (settable: {', '.join(settable)}; "
                "--tasks, --seeds, --epochs, --bf16 and --protocol have their own flags)"
            )
        kind, optional = unwrap(types[name])
        try:
            values[name] = None if text.lower() == "none" and optional else kind(text)
        except ValueError:
            raise ConfigError(f"--set {name}={text}: expected a{'n integer' if kind is int else ' number'}") from None
    return dataclasses.replace(preset, **values)


_SMALL = Preset(
    name="small",
    seeds=5,
    hidden_size=64,
    num_attention_heads=2,
    ffn_hidden_size=256,
    train_sequences=4_000,
    validation_sequences=200,
    test_sequences=1_000,
    epochs=12,
    global_batch_size=64,
    lr=3e-3,
    validation_interval=4,
)

#: the small model on the recursive task alone, which it learns in a few hundred steps
_RECURSIVE = dataclasses.replace(_SMALL, tasks=("recursive",), seeds=1, validation_sequences=100)

PRESETS: Dict[str, Preset] = {
    # The paper's setup (2 layers in T5-small shape, 10k/1k/1k, 150 epochs, AdamW 2e-4, wd 0.01, batch 128,
    # one-cycle cosine with 10 % warm-up, 5 seeds). For a GPU.
    "paper": Preset(name="paper"),
    # All 30 cells on 2 CPU cores with 2 workers: the paper's shape scaled to d_model 64 (2 heads x 32),
    # 4,000 sequences x 12 epochs = 750 steps of 64 at a higher learning rate.
    "small": _SMALL,
    # `make demo`'s PosGen stage: the plot shows what happens past the training length.
    "demo": dataclasses.replace(
        _RECURSIVE, name="demo", train_sequences=2_000, test_sequences=200, epochs=15, validation_interval=5
    ),
    # The test suite's end-to-end run: 375 steps of 32 (far above chance in distribution, not converged).
    "smoke": dataclasses.replace(
        _RECURSIVE, name="smoke", train_sequences=1_000, test_sequences=100, global_batch_size=32, lr=5e-3
    ),
}
