"""Diagnostics of a rotary plan for training length L and test length L'.

* wavelength per feature, lambda_i = 2*pi/theta_i;
* pre-critical features: lambda_i < L (they complete a full turn inside the training length);
* critical dimension: the first feature whose wavelength is >= L;
* feature gap (Eq. 8 of the Resonance RoPE paper), per feature, in its input-free angular form:
  gap_i = max over unseen n in [L, L') of min over trained m in [0, L) of |angle(n,i) - angle(m,i)|
  (on the circle). Resonance makes it exactly 0 wherever the rounded wavelength is <= L, because
  angle(n,i) is then computed as angle(n mod lambda_i, i), an angle seen in training.
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch

from megatron_resonance.rope.angles import TWO_PI, rotary_angles
from megatron_resonance.rope.frequencies import RotaryFrequencies


def pre_critical_mask(freqs: RotaryFrequencies, original_max_position: int) -> torch.Tensor:
    """Bool [d/2]: features whose wavelength is shorter than L."""
    return freqs.wavelengths < original_max_position


def critical_dim(freqs: RotaryFrequencies, original_max_position: int) -> int:
    """Index of the first feature with wavelength >= L (d/2 if every feature is pre-critical)."""
    long = (~pre_critical_mask(freqs, original_max_position)).nonzero()
    return int(long[0]) if len(long) else len(freqs.inv_freq)


def feature_gap(freqs: RotaryFrequencies, original_max_position: int, target_max_position: int) -> torch.Tensor:
    """float64 [d/2] feature gap, in radians, of unseen positions [L, L') against trained [0, L)."""
    L, L2 = original_max_position, target_max_position
    if L2 <= L:
        return torch.zeros(len(freqs.inv_freq), dtype=torch.float64)
    seen = rotary_angles(freqs, torch.arange(L)).T.contiguous()  # [d/2, L]
    seen, _ = seen.sort(dim=1)
    # close the circle: the smallest seen angle again, one turn later
    seen = torch.cat([seen, seen[:, :1] + TWO_PI], dim=1)
    gaps = []
    for start in range(L, L2, 65536):  # chunked to bound memory at long L'
        unseen = rotary_angles(freqs, torch.arange(start, min(start + 65536, L2))).T.contiguous()
        idx = torch.searchsorted(seen, unseen).clamp(1, seen.shape[1] - 1)
        above = seen.gather(1, idx) - unseen
        below = unseen - seen.gather(1, idx - 1)
        nearest = torch.minimum(above, below).clamp_min(0.0)
        gaps.append(nearest.max(dim=1).values)
    return torch.stack(gaps, dim=1).max(dim=1).values


@dataclasses.dataclass
class RopeReport:
    """Everything the CLI prints, as plain Python values."""

    kind: str
    head_dim: int
    base: float
    factor: float
    original_max_position: int
    target_max_position: int
    attention_factor: float
    inv_freq: List[float]
    wavelengths: List[float]
    pre_critical: int
    critical_dim: int
    feature_gap: List[float]
    max_feature_gap_pre_critical: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def report(freqs: RotaryFrequencies, target_max_position: int) -> RopeReport:
    cfg = freqs.config
    L = cfg.original_max_position
    gap = feature_gap(freqs, L, target_max_position)
    mask = pre_critical_mask(freqs, L)
    return RopeReport(
        kind=cfg.kind,
        head_dim=cfg.head_dim,
        base=cfg.base,
        factor=cfg.factor,
        original_max_position=L,
        target_max_position=target_max_position,
        attention_factor=freqs.attention_factor,
        inv_freq=freqs.inv_freq.float().tolist(),
        wavelengths=freqs.wavelengths.tolist(),
        pre_critical=int(mask.sum()),
        critical_dim=critical_dim(freqs, L),
        feature_gap=gap.tolist(),
        max_feature_gap_pre_critical=float(gap[mask].max()) if mask.any() else 0.0,
    )
