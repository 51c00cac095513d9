"""gpu tier: the planner's training estimate against ``torch.cuda.max_memory_allocated`` of the trainer's
bf16 steps (workers/planner_memory.py), without and with full recomputation; the CPU side is
tests/planning/test_measured.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import python

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.gpu
def test_estimate_against_max_memory_allocated(tmp_path):
    out = tmp_path / "memory.json"
    python(WORKERS / "planner_memory.py", out, timeout=600)
    for run in json.loads(out.read_text())["runs"]:
        # the peak counts everything allocated, the model and optimizer built before it included
        measured = run["peak_bytes"]
        assert measured == pytest.approx(run["estimate_bytes"], rel=0.2), run
