"""Fixtures shared by the Megatron integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch import torchrun
from tests.worker_checks import CheckResults

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="session")
def model_checks(tmp_path_factory) -> CheckResults:
    """Measurements from ``workers/model_checks.py``, run once in its own process: cpu_compat, cpu_speed
    and megatron's parallel state are process-wide and must not leak into the pytest process. The checks
    that ``test_<area>.py`` asserts are in ``workers/<area>_checks.py``."""
    out = tmp_path_factory.mktemp("model_checks")
    torchrun(WORKERS / "model_checks.py", out, nproc=1, timeout=300)
    return CheckResults.read(out / "results.json")
