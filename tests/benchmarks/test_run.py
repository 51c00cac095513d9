"""``benchmarks/run.py`` stays runnable; its precision section (no timing) holds the angle-error goal.

Speed numbers are not asserted anywhere (benchmarks/README.md has them)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.launch import REPO


def test_precision_section_meets_the_angle_goal(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--skip", "cpu,convert", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["angle_error_rad_at_1m"] <= 1e-6
    assert results["megatron_core_angle_error_rad_at_1m"] > 1e-3  # the fp32 outer product it replaces
    assert set(results["angle_error_rad_at_1m_by_kind"]) == {"rope", "resonance_yarn"}
    assert results["machine"]["commit"]


def test_unknown_section_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--skip", "gpus", "--out", str(tmp_path / "x.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "benchmarks/run.py: error: --skip: unknown section 'gpus' (precision, cpu, gpu, convert)"
    ]
    assert not (tmp_path / "x.json").exists()


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_let_each_step_follow_each_other_equally_often():
    """The step after another model's pays for its caches: the interleaving must not put that on one step."""
    from collections import Counter

    bench = _bench_module()
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("rope", "resonance_yarn", "hf")}
    times = bench._interleaved_times(steps, warmup=0, repeats=30)
    assert {k: len(v) for k, v in times.items()} == {"rope": 30, "resonance_yarn": 30, "hf": 30}
    follows = Counter(zip(calls, calls[1:]))
    assert all(before != after for before, after in follows)  # never right after itself
    for after in steps:
        counts = [follows[(before, after)] for before in steps if before != after]
        assert max(counts) - min(counts) <= 1, (after, follows)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    bench = _bench_module()
    assert bench._paired_ratio([2.0, 3.0, 12.0], [1.0, 1.0, 2.0]) == 3.0
