"""The PosGen report's statistics: t quantiles, paired differences over seeds, position bands."""

from __future__ import annotations

import math
import random

import pytest

from megatron_resonance.posgen import stats

# Two-sided 95 % critical values of Student's t (published tables, 6 significant figures).
T_975 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 9: 2.26216, 29: 2.04523, 120: 1.97993}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_tables(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(T_975[df], rel=2e-5)


def test_t_cdf_is_symmetric_and_monotone():
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert stats.t_cdf(-1.3, 5) == pytest.approx(1 - stats.t_cdf(1.3, 5))
    # df = 1 is the Cauchy distribution: P(T <= x) = 1/2 + atan(x)/pi
    for x in (0.3, 1.0, 7.0):
        assert stats.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)
    values = [stats.t_cdf(x / 4, 4) for x in range(-20, 21)]
    assert values == sorted(values)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="p must be"):
        stats.t_quantile(0.2, 3)


def test_summary_is_mean_and_sample_std_in_seed_order():
    s = stats.summary({2: 0.7, 0: 0.5, 1: 0.6})
    assert s["seeds"] == [0, 1, 2] and s["runs"] == [0.5, 0.6, 0.7] and s["n"] == 3
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert stats.summary({4: 0.3}) == {"mean": 0.3, "std": 0.0, "n": 1, "seeds": [4], "runs": [0.3]}
    assert stats.summary({})["mean"] is None


def test_paired_difference_pairs_by_seed_with_t_interval():
    a = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.90}
    b = {0: 0.40, 1: 0.45, 2: 0.65}  # seed 3 has no partner: left out
    d = stats.paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2] and d["runs"] == pytest.approx([0.10, 0.15, 0.05])
    assert d["mean"] == pytest.approx(0.10) and d["std"] == pytest.approx(0.05)
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert d["ci"] == pytest.approx([0.10 - half, 0.10 + half], abs=1e-6)
    # the interval is about the pairs, not the groups: a shift shared by every seed leaves it unchanged
    shifted = stats.paired_difference({s: v + 0.2 for s, v in a.items()}, {s: v + 0.2 for s, v in b.items()})
    assert shifted["ci"] == pytest.approx(d["ci"])
    one = stats.paired_difference({0: 0.5}, {0: 0.25})
    assert one["mean"] == 0.25 and one["ci"] is None


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = random.Random(0)
    covered, trials = 0, 2000
    for _ in range(trials):
        base = {s: rng.gauss(0.5, 0.2) for s in range(5)}
        other = {s: base[s] + 0.03 + rng.gauss(0, 0.02) for s in range(5)}
        lo, hi = stats.paired_difference(other, base)["ci"]
        covered += lo <= 0.03 <= hi
    assert 0.93 < covered / trials < 0.97


def test_band_is_per_position_mean_and_std():
    means, stds = stats.band([[None, 0.2, 0.4], [None, 0.4, 0.4]])
    assert means[0] is None and stds[0] is None
    assert means[1:] == pytest.approx([0.3, 0.4]) and stds[1:] == pytest.approx([math.sqrt(0.02), 0.0])
