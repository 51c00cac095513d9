"""Fixtures shared by the Megatron integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import torchrun

WORKERS = Path(__file__).parent / "workers"


class CheckResults:
    """Records of ``workers/model_checks.py``; indexing a check that raised fails with its traceback."""

    def __init__(self, records: dict):
        self.records = records

    def __getitem__(self, name: str) -> dict:
        record = self.records[name]
        if "error" in record:
            pytest.fail(f"{name} raised in the worker:\n{record['error']}", pytrace=False)
        return record


@pytest.fixture(scope="session")
def model_checks(tmp_path_factory) -> CheckResults:
    """Measurements from ``workers/model_checks.py``, run once in its own process: cpu_compat, cpu_speed
    and megatron's parallel state are process-wide and must not leak into the pytest process."""
    out = tmp_path_factory.mktemp("model_checks")
    torchrun(WORKERS / "model_checks.py", out, nproc=1, timeout=300)
    return CheckResults(json.loads((out / "results.json").read_text()))
