"""The gpu tier: what only a GPU shows, run by ``pytest -m gpu`` (``make gpu-check`` on a GPU machine).

Every test of the tier is marked ``gpu`` and skipped where there is no CUDA device (tests/conftest.py), so CI
collects and skips it. Whatever part of a test runs on a CPU too (the comparisons, the workers) is tested
on CPU in the normal tier, beside it. Fixtures here run the workers once per session:

* ``precision_runs``: ``workers/trainer_steps.py precision`` on the GPU (fp32 and bf16 training steps, and the
  layer spec the trainer built); ``precision(device)`` runs it anywhere;
* ``transfer(root, save_on, load_on)``: a full training checkpoint saved on one device and loaded on the other
  (the CPU side in a process that CUDA is hidden from).

``make gpu-check`` runs the tier's modules side by side when pytest-xdist is installed (one module each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import python

WORKERS = Path(__file__).parent / "workers"
#: a worker's environment for each device; the CPU side runs as on a machine without a GPU
DEVICE_ENV = {"cuda": {}, "cpu": {"CUDA_VISIBLE_DEVICES": ""}}


def trainer_steps(device: str, *args) -> None:
    python(WORKERS / "trainer_steps.py", *args, env=DEVICE_ENV[device], timeout=300)


def precision(device: str, out: Path) -> dict:
    trainer_steps(device, "precision", out)
    return json.loads(out.read_text())


def transfer(root: Path, save_on: str, load_on: str) -> tuple:
    """(state saved, state loaded): the trainer's checkpoint written on ``save_on``, read on ``load_on``."""
    ckpt, saved, loaded = root / "ckpt", root / "saved.pt", root / "loaded.pt"
    trainer_steps(save_on, "save", ckpt, saved)
    trainer_steps(load_on, "load", ckpt, loaded)
    return torch.load(saved), torch.load(loaded)


@pytest.fixture(scope="session")
def precision_runs(tmp_path_factory) -> dict:
    return precision("cuda", tmp_path_factory.mktemp("precision") / "precision.json")
