"""Suite-wide fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves ``os.environ`` as it found it.

    Code under test may set launcher variables in this process (the converters' single-process setup writes
    RANK/WORLD_SIZE/LOCAL_RANK); left behind, they would make every later ``--nproc-per-node`` launch think
    it already runs under torchrun."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
