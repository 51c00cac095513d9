"""Independent references for the rotary math, written from the papers (RoFormer, YaRN, Resonance RoPE's Algorithm 1).

Nothing here imports ``megatron_resonance``: the tests compare the library against these. Frequencies are
numpy float64 (or plain Python loops where that reads closer to the source); exact angles use Python
integers and ``decimal`` at 60 digits.
"""

from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal, localcontext

import numpy as np

# pi to 60 digits, typed in rather than computed, so the exact references share nothing with the library
PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")
TWO_PI = 2 * PI
PRECISION = 60


def rope(d: int, b: float) -> np.ndarray:
    """RoPE (Su et al.): theta_i = b^(-2i/d), i = 0 .. d/2-1."""
    return np.array([b ** (-2.0 * i / d) for i in range(d // 2)], dtype=np.float64)


def linear(d: int, b: float, s: float) -> np.ndarray:
    """Position interpolation (Chen et al.): positions divided by s, i.e. theta_i / s."""
    return rope(d, b) / s


def ntk(d: int, b: float, s: float) -> np.ndarray:
    """NTK-aware scaling: the base becomes b * s^(d/(d-2))."""
    return rope(d, b * s ** (d / (d - 2)))


def yarn(d: int, b: float, L: int, s: float, beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
    """YaRN "NTK-by-parts" with the integer correction range of the YaRN code and Hugging Face."""

    def corr(r):  # feature index whose wavelength fits r turns into L positions
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(b))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    theta = rope(d, b)
    out = np.empty_like(theta)
    for i, t in enumerate(theta):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1.0 - ramp
        out[i] = (t / s) * (1.0 - extrapolation) + t * extrapolation
    return out


def yarn_attention_factor(s: float) -> float:
    """YaRN's m = 0.1 ln s + 1 (on cos and sin)."""
    return 0.1 * math.log(s) + 1.0 if s > 1 else 1.0


def llama3(d: int, b: float, L: int, s: float, low_freq_factor=1.0, high_freq_factor=4.0) -> np.ndarray:
    """Llama 3.1 ``apply_scaling`` from Meta's reference code, as its per-frequency loop."""
    low_freq_wavelen = L / low_freq_factor
    high_freq_wavelen = L / high_freq_factor
    out = []
    for freq in rope(d, b):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / s)
        else:
            smooth = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / s + smooth * freq)
    return np.array(out, dtype=np.float64)


def resonance_wavelengths(inv_freq: np.ndarray) -> np.ndarray:
    """Algorithm 1 of Resonance RoPE: lambda~_i = round(2 pi / theta_i), as Python ints."""
    return np.array([int(math.floor(2 * math.pi / t + 0.5)) for t in inv_freq], dtype=np.int64)


def resonance(inv_freq: np.ndarray) -> np.ndarray:
    """theta~_i = 2 pi / lambda~_i."""
    return 2 * math.pi / resonance_wavelengths(inv_freq).astype(np.float64)


def frequencies(kind: str, d: int, b: float, L: int, s: float, resonance_on: bool = False) -> np.ndarray:
    """Reference inv_freq for a kind name as the library spells it."""
    if kind == "resonance":
        kind, resonance_on = "rope", True
    elif kind == "resonance_yarn":
        kind, resonance_on = "yarn", True
    inv = {
        "rope": lambda: rope(d, b),
        "linear": lambda: linear(d, b, s),
        "ntk": lambda: ntk(d, b, s),
        "yarn": lambda: yarn(d, b, L, s),
        "llama3": lambda: llama3(d, b, L, s),
    }[kind]()
    return resonance(inv) if resonance_on else inv


# ----------------------------------------------------------------------------------------------------------
# Exact angles
# ----------------------------------------------------------------------------------------------------------


def _reduce(x: Decimal) -> Decimal:
    return x - TWO_PI * (x / TWO_PI).to_integral_value(rounding=ROUND_FLOOR)


def exact_rope_angle(p: int, i: int, d: int, b: float) -> Decimal:
    """p * b^(-2i/d) mod 2 pi for the real-number theta_i, at 60 digits."""
    with localcontext() as ctx:
        ctx.prec = PRECISION
        theta = (-(Decimal(2 * i) / Decimal(d)) * Decimal(b).ln()).exp()
        return _reduce(Decimal(p) * theta)


def exact_resonance_angle(p: int, wavelength: int) -> Decimal:
    """(p mod lambda) * 2 pi / lambda for an integer wavelength, at 60 digits."""
    with localcontext() as ctx:
        ctx.prec = PRECISION
        return Decimal(p % wavelength) * TWO_PI / Decimal(wavelength)


def circular_error(approx: float, exact: Decimal) -> float:
    """Distance on the circle between a float angle (any size) and an exact one, in radians."""
    with localcontext() as ctx:
        ctx.prec = PRECISION
        diff = _reduce(Decimal(float(approx)) - exact)
        return float(min(diff, TWO_PI - diff))


def angular_distance(a, b):
    """Shortest distance on the circle between float64 angle arrays."""
    diff = np.mod(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), 2 * np.pi)
    return np.minimum(diff, 2 * np.pi - diff)
