"""The PosGen report's statistics: t quantiles, paired differences over seeds, position bands, and the
report built from stored cells (no training)."""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_resonance.posgen import benchmark, stats

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


# ----------------------------------------------------------------------------------------------------------
# The report from stored cells
# ----------------------------------------------------------------------------------------------------------


def _fake_cell(preset, task, seed, kind, id_acc, ood_acc):
    curve = [None] * 4 + [id_acc] * (preset.train_length - 4) + [ood_acc] * (preset.test_length - preset.train_length)
    variants = {
        v: {"id_accuracy": id_acc, "ood_accuracy": ood_acc + 0.01 * i, "position_accuracy": curve}
        for i, v in enumerate(benchmark.EVALUATED_AS[kind])
    }
    return {
        "task": task,
        "seed": seed,
        "trained_as": kind,
        "variants": variants,
        "train": {"iterations": 1, "seconds": 1.0, "history": []},
        "test_seconds": 0.5,
        "world_size": 1,
        "preset": preset.name,
    }


def test_report_gives_paired_intervals_and_band_plot(tmp_path):
    preset = benchmark.PRESETS["smoke"]
    preset = type(preset)(**{**preset.__dict__, "seeds": 3})
    ood = {"rope": [0.20, 0.30, 0.25], "resonance": [0.26, 0.33, 0.31]}
    for seed in range(3):
        for kind in benchmark.TRAINED_KINDS:
            path = benchmark.cell_path(str(tmp_path), "recursive", seed, kind)
            benchmark._write_json_atomic(path, _fake_cell(preset, "recursive", seed, kind, 0.98, ood[kind][seed]))
    run_info = {"wall_seconds": 90.0, "cells_run": 6, "processes": 2, "threads_per_process": 1,
                "how": "2 worker processes"}
    report = benchmark.write_report(str(tmp_path), preset, run_info)
    assert report["complete"] and report["last_run"] == run_info
    ours = report["paired_difference"]["ood_accuracy"]["recursive"]["resonance - rope"]
    assert ours["runs"] == pytest.approx([0.06, 0.03, 0.06])
    expected = stats.paired_difference(dict(enumerate(ood["resonance"])), dict(enumerate(ood["rope"])))
    assert ours["ci"] == pytest.approx(expected["ci"])
    assert report["ood_accuracy"]["recursive"]["yarn"]["mean"] == pytest.approx(0.26)
    assert report["position_accuracy_std"]["recursive"]["rope"][-1] == pytest.approx(0.05)
    assert json.loads((tmp_path / "report.json").read_text())["paired_difference"] == report["paired_difference"]
    md = (tmp_path / "report.md").read_text()
    assert "resonance - rope [95 % CI]" in md
    lo, hi = (100 * x for x in ours["ci"])
    assert f"+5.0 [{lo:+.1f}, {hi:+.1f}]" in md
    assert "the last command ran 6 cell(s) in 1.5 min wall (2 worker processes x 1 thread(s))" in md
    assert (tmp_path / "position_recursive.png").read_bytes()[:4] == b"\x89PNG"
    # a rewrite by a command that ran nothing keeps the last run's record
    assert benchmark.write_report(str(tmp_path), preset)["last_run"] == run_info
