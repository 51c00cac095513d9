"""Statistics over seeds for the PosGen report.

A benchmark cell is one seed: per task and variant the report gives mean ± sample standard deviation over
seeds, and for the comparisons the paper makes (``resonance − rope``, ``resonance_yarn − yarn``) the
per-seed paired differences with a two-sided 95 % Student-t interval. Pairing is by seed: both models of
a seed share initial weights and data order, so the difference removes most of the seed-to-seed spread.

Pure Python (no scipy): the t quantile comes from bisection on the CDF, itself Simpson's rule on the
density, accurate to well below the printed precision for every degree of freedom.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, Optional, Sequence

CONFIDENCE = 0.95
"""Coverage of the paired-difference interval."""


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    # Substituting x = tan(u) maps [0, inf) to [0, pi/2) and flattens the heavy tail of small df.
    top = math.atan(x)
    steps = 2000
    h = top / steps
    total = 0.0
    for i in range(steps + 1):
        u = i * h
        w = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += w * _t_density(math.tan(u), df) / math.cos(u) ** 2
    return 0.5 + total * h / 3


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """x with P(T <= x) = p, for 0.5 <= p < 1 (bisection on :func:`t_cdf`)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"p must be in [0.5, 1), got {p}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _mean_std(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summary(by_seed: Dict[int, float]) -> dict:
    """``{"mean", "std", "n", "seeds", "runs"}`` over seeds (sample std; 0 for one seed; None when empty).
    ``runs`` are in seed order."""
    seeds = sorted(by_seed)
    runs = [float(by_seed[s]) for s in seeds]
    if not runs:
        return {"mean": None, "std": None, "n": 0, "seeds": [], "runs": []}
    mean, std = _mean_std(runs)
    return {"mean": mean, "std": std, "n": len(runs), "seeds": seeds, "runs": runs}


def paired_difference(a: Dict[int, float], b: Dict[int, float], confidence: float = CONFIDENCE) -> dict:
    """``a − b`` per seed present in both: ``{"mean", "std", "n", "seeds", "runs", "ci"}``.

    ``ci`` is the two-sided Student-t interval ``mean ± t(n−1) · std / √n`` at ``confidence``; None with
    fewer than two paired seeds, where no interval exists.
    """
    seeds = sorted(set(a) & set(b))
    d = summary({s: a[s] - b[s] for s in seeds})
    ci: Optional[list] = None
    if d["n"] >= 2:
        half = t_quantile(0.5 + confidence / 2, d["n"] - 1) * d["std"] / math.sqrt(d["n"])
        ci = [d["mean"] - half, d["mean"] + half]
    return {**d, "ci": ci, "confidence": confidence}


def band(curves: Sequence[Sequence[Optional[float]]]):
    """Per-position (mean, std) over curves of equal length; None where a curve has None (seed prefix)."""
    means, stds = [], []
    for column in zip(*curves):
        if any(v is None for v in column):
            means.append(None)
            stds.append(None)
        else:
            mean, std = _mean_std([float(v) for v in column])
            means.append(mean)
            stds.append(std)
    return means, stds
