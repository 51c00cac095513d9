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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped where there is none (CI), run by ``pytest -m gpu``."""
    marked = [item for item in items if item.get_closest_marker("gpu")]  # (keywords would match tests/gpu/)
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (the gpu tier: make gpu-check OUT=dir on a GPU machine)")
    for item in marked:
        item.add_marker(skip)
