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
