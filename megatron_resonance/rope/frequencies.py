"""Rotary frequencies for every kind the project supports, in float64.

One function per kind computes the per-feature inverse frequencies ``inv_freq[i]`` (rad / position,
i = 0 .. head_dim/2 - 1) and the attention factor (the multiplier on cos and sin, as in Hugging Face
transformers). Resonance (Algorithm 1 of Wang et al., 2024) is one orthogonal switch over any kind: it
rounds every wavelength 2*pi/inv_freq to the nearest integer after the kind's own scaling.

Everything here is pure torch and float64: a wavelength near x.5 can round differently in fp32.
Callers that feed a kernel take ``inv_freq.float()``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Callable, Dict, Literal, Optional, Tuple

import torch

from megatron_resonance.config_fields import check_choices, field, from_dict
from megatron_resonance.errors import ConfigError

#: Kinds a user can name. ``resonance`` and ``resonance_yarn`` are ``rope`` and ``yarn`` with rounding on.
BaseKind = Literal["rope", "linear", "ntk", "yarn", "llama3"]
Kind = Literal[BaseKind, "resonance", "resonance_yarn"]
KINDS = typing.get_args(Kind)
_RESONANCE_ALIASES = {"resonance": "rope", "resonance_yarn": "yarn"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """A rotary position embedding plan: everything needed to reproduce the model's angles.

    ``resonance``/``resonance_yarn`` imply ``resonance=True``; ``factor`` is ignored by ``rope``/``resonance``.
    YaRN interpolates (divides by s) the features that turn fewer than ``beta_slow`` times over the original
    length, keeps those that turn more than ``beta_fast`` times, and ramps between; llama3 interpolates the
    wavelengths above L/low_freq_factor and keeps those below L/high_freq_factor. Each field with a flag is
    a ``pretrain_llama.py`` flag under its Megatron-LM-style name."""

    kind: Kind = field("rope", f"rotary kind: {', '.join(KINDS)}", flag="rope_kind", label="rope kind")
    head_dim: int = field(128, "rotary dimension d (the number of rotated features is d/2)", flag=False)
    base: float = field(10000.0, "RoPE base b (rope_theta)", flag="rotary_base")
    original_max_position: int = field(4096, "length L the model was trained at")
    factor: float = field(1.0, "scale s = target length / original length", flag="rope_factor")
    beta_fast: float = field(32.0, "YaRN beta_fast")
    beta_slow: float = field(1.0, "YaRN beta_slow")
    low_freq_factor: float = field(1.0, "llama3 low_freq_factor")
    high_freq_factor: float = field(4.0, "llama3 high_freq_factor")
    attention_factor: Optional[float] = field(None, "override YaRN's 0.1 ln s + 1")
    correction_length: Optional[int] = field(
        None,
        "YaRN: the length whose beta_fast / beta_slow turns bound the ramp; None: original_max_position, "
        "as YaRN and Hugging Face define it (PosGen's reference protocol uses the test length + 1)",
        flag=False,
    )
    resonance: bool = field(False, "round wavelengths to integers on top of any kind")

    def __post_init__(self):
        check_choices(self)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even number, got {self.head_dim}")
        if not (self.base > 1 and math.isfinite(self.base)):
            raise ConfigError(f"base must be a finite number > 1, got {self.base}")
        if not (self.factor >= 1 and math.isfinite(self.factor)):
            raise ConfigError(f"factor must be a finite number >= 1, got {self.factor}")
        if self.original_max_position <= 0:
            raise ConfigError(f"original_max_position must be positive, got {self.original_max_position}")
        if self.correction_length is not None and self.correction_length <= 0:
            raise ConfigError(f"correction_length must be positive, got {self.correction_length}")
        if self.kind in _RESONANCE_ALIASES and not self.resonance:
            object.__setattr__(self, "resonance", True)

    @property
    def base_kind(self) -> str:
        """The kind without the resonance rounding (``resonance_yarn`` -> ``yarn``)."""
        return _RESONANCE_ALIASES.get(self.kind, self.kind)

    @property
    def target_max_position(self) -> int:
        """The extended length L' = s * L."""
        return int(round(self.original_max_position * self.factor))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "rope settings") -> "RopeConfig":
        return from_dict(cls, d, where)


# ----------------------------------------------------------------------------------------------------------
# One function per kind: (config) -> (inv_freq float64 [d/2], attention_factor)
# ----------------------------------------------------------------------------------------------------------


def _rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """theta_i = b^(-2i/d), i = 0 .. d/2-1."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope(cfg: RopeConfig) -> Tuple[torch.Tensor, float]:
    return _rope_inv_freq(cfg.head_dim, cfg.base), 1.0


def linear(cfg: RopeConfig) -> Tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al., 2023): every frequency divided by s."""
    return _rope_inv_freq(cfg.head_dim, cfg.base) / cfg.factor, 1.0


def ntk(cfg: RopeConfig) -> Tuple[torch.Tensor, float]:
    """NTK-aware scaling: base b * s^(d/(d-2))."""
    d = cfg.head_dim
    if d == 2:  # the only feature has theta = b^0 = 1 whatever the base (and d/(d-2) is undefined)
        return _rope_inv_freq(d, cfg.base), 1.0
    return _rope_inv_freq(d, cfg.base * cfg.factor ** (d / (d - 2))), 1.0


def yarn_attention_factor(factor: float) -> float:
    """YaRN's m = 0.1 ln s + 1 (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_correction_dim(num_rotations: float, head_dim: int, base: float, original_max_position: int) -> float:
    """The (fractional) feature index whose wavelength makes ``num_rotations`` turns over L positions."""
    return head_dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn(cfg: RopeConfig) -> Tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023) "NTK-by-parts" frequencies, as in the paper and Hugging Face."""
    d = cfg.head_dim
    theta = _rope_inv_freq(d, cfg.base)
    length = cfg.original_max_position if cfg.correction_length is None else cfg.correction_length
    low = math.floor(yarn_correction_dim(cfg.beta_fast, d, cfg.base, length))
    high = math.ceil(yarn_correction_dim(cfg.beta_slow, d, cfg.base, length))
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (theta / cfg.factor) * (1 - extrapolation) + theta * extrapolation
    m = cfg.attention_factor if cfg.attention_factor is not None else yarn_attention_factor(cfg.factor)
    return inv_freq, m


def llama3(cfg: RopeConfig) -> Tuple[torch.Tensor, float]:
    """Llama-3.1 scaling: keep short wavelengths, divide long ones by s, interpolate smoothly between."""
    theta = _rope_inv_freq(cfg.head_dim, cfg.base)
    L = cfg.original_max_position
    wavelength = 2 * math.pi / theta
    low_freq_wavelength = L / cfg.low_freq_factor
    high_freq_wavelength = L / cfg.high_freq_factor
    scaled = torch.where(wavelength > low_freq_wavelength, theta / cfg.factor, theta)
    smooth = (L / wavelength - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(medium, smoothed, scaled), 1.0


_KIND_FUNCTIONS: Dict[str, Callable[[RopeConfig], Tuple[torch.Tensor, float]]] = {
    "rope": rope,
    "linear": linear,
    "ntk": ntk,
    "yarn": yarn,
    "llama3": llama3,
}


def resonance_round(inv_freq: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the Resonance RoPE paper: round each wavelength to the nearest integer (>= 1)."""
    wavelength = torch.round(2 * math.pi / inv_freq.double()).clamp_min(1.0)
    return 2 * math.pi / wavelength


# ----------------------------------------------------------------------------------------------------------
# The resolved plan
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RotaryFrequencies:
    """The resolved frequencies of a ``RopeConfig``."""

    config: RopeConfig
    inv_freq: torch.Tensor
    """float64 [d/2], rad per position."""
    attention_factor: float
    """Multiplier on cos and sin (attention logits scale by its square)."""

    @property
    def wavelengths(self) -> torch.Tensor:
        """float64 [d/2]: positions per full turn, 2*pi/inv_freq (integers under resonance)."""
        if self.config.resonance:
            return torch.round(2 * math.pi / self.inv_freq)
        return 2 * math.pi / self.inv_freq

    @property
    def integer_wavelengths(self) -> Optional[torch.Tensor]:
        """int64 [d/2] wavelengths when resonance is on, else None."""
        return self.wavelengths.long() if self.config.resonance else None


def compute_frequencies(cfg: RopeConfig) -> RotaryFrequencies:
    """Resolve a config into float64 inverse frequencies and its attention factor."""
    inv_freq, attention_factor = _KIND_FUNCTIONS[cfg.base_kind](cfg)
    if cfg.resonance:
        inv_freq = resonance_round(inv_freq)
    return RotaryFrequencies(cfg, inv_freq, float(attention_factor))
