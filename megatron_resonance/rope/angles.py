"""Exact rotary angle tables.

A rotary angle p*theta_i grows without bound; in fp32 the product itself is off by ~8e-2 rad at
p = 2^20. We therefore reduce every angle into [0, 2*pi) in float64 before handing out fp32:

* resonance kinds have integer wavelengths lambda_i, so angle = (p mod lambda_i) * (2*pi/lambda_i) with
  the modulo done in exact integer arithmetic (the form the paper's reference code uses, vectorized);
* every other kind uses float64 ``remainder(p*theta_i, 2*pi)`` (relative error ~1e-16 * p).

cos and sin are 2*pi-periodic, so kernels that take angles (Megatron's unfused path, TE's fused RoPE)
give the same result, only more precisely.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from megatron_resonance.rope.frequencies import RotaryFrequencies

TWO_PI = 2 * math.pi


def rotary_angles(freqs: RotaryFrequencies, positions: torch.Tensor) -> torch.Tensor:
    """float64 angles in [0, 2*pi), shape [len(positions), d/2], for integer ``positions``."""
    positions = positions.to(torch.int64)
    device = positions.device
    wavelengths = freqs.integer_wavelengths
    if wavelengths is not None:
        wavelengths = wavelengths.to(device)
        phase = torch.remainder(positions[:, None], wavelengths[None, :])  # exact integers
        return phase.double() * (TWO_PI / wavelengths.double())[None, :]
    inv_freq = freqs.inv_freq.to(device)
    return torch.remainder(positions[:, None].double() * inv_freq[None, :], TWO_PI)


def rotary_angle_table(
    freqs: RotaryFrequencies,
    seq_len: int,
    offset: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Angles for positions offset .. offset+seq_len-1 as ``dtype`` (Megatron's ``freqs`` layout)."""
    positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.int64)
    return rotary_angles(freqs, positions).to(dtype)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shortest distance between two angles on the circle, in [0, pi]."""
    d = torch.remainder(a - b, TWO_PI)
    return torch.minimum(d, TWO_PI - d)
