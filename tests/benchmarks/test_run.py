"""``benchmarks/run.py`` stays runnable; its precision section (no timing) holds the angle-error goal.

Speed numbers are not asserted anywhere (benchmarks/results/ has them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch import REPO, child_env


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


@pytest.mark.parametrize(
    "names",
    [("rope", "hf"), ("rope", "resonance_yarn", "hf"), ("rope", "resonance_yarn", "model_only", "hf"), tuple("abcde")],
)
def test_rounds_let_each_step_follow_each_other_equally_often(names):
    """The step after another model's pays for its caches: the interleaving must not put that on one step."""
    from collections import Counter

    bench = _bench_module()
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in names}
    repeats = 12 * (len(names) - 1)  # whole cycles of round orders
    times = bench._interleaved_times(steps, warmup=0, repeats=repeats)
    assert {k: len(v) for k, v in times.items()} == {k: repeats for k in names}
    for start in range(0, len(calls), len(names)):
        assert sorted(calls[start : start + len(names)]) == sorted(names)  # a round runs every step once
    follows = Counter(zip(calls, calls[1:]))
    assert all(before != after for before, after in follows)  # never right after itself
    for after in steps:
        counts = [follows[(before, after)] for before in steps if before != after]
        assert max(counts) - min(counts) <= 1, (after, follows)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    bench = _bench_module()
    assert bench._paired_ratio([2.0, 3.0, 12.0], [1.0, 1.0, 2.0]) == 3.0


def test_model_only_step_trains_the_trainers_model():
    """``train_vs_hf_ratio_model_only`` times the trainer's own model: from the same seed and batches its
    step computes the trainer's loss, and after the same AdamW updates it stays on the trainer's path."""
    from tests.launch import torchrun

    proc = torchrun(REPO / "tests" / "benchmarks" / "workers" / "model_only_step.py", nproc=1, timeout=300)
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    trainer, model_only = losses["trainer"], losses["model_only"]
    assert model_only[0] == pytest.approx(trainer[0], rel=1e-6)
    assert model_only[1:] == pytest.approx(trainer[1:], rel=1e-5)
    assert trainer[2] < trainer[0]  # a training step, not a forward pass


def test_document_masking_benchmark_runs(tmp_path):
    """``benchmarks/document_masking.py`` stays runnable, and its options compute the same attention."""
    out = tmp_path / "documents.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "document_masking.py"), "--tokens", "128", "--documents", "4",
         "--repeat", "1", "--options", "segments,dense", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["option"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["dense"]["max_abs_diff_vs_segments"] < 1e-5, rows
