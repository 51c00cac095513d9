"""The PosGen benchmark end to end on the smoke preset: learns, writes its report, resumes.

One process trains the real Megatron model (rope and resonance) on the recursive task; the second run
of the same command must find both cells and only rewrite the report.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from megatron_resonance.posgen.benchmark import (
    BOS,
    PRESETS,
    TRAINED_KINDS,
    VARIANTS,
    model_inputs,
    sample_order,
)
from megatron_resonance.posgen.splits import make_split
from megatron_resonance.posgen.tasks import VOCAB_SIZE
from tests.launch import REPO

TOOL = REPO / "tools" / "posgen_benchmark.py"
CHANCE = 1 / VOCAB_SIZE


def run_tool(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    return proc, time.time() - start


# ----------------------------------------------------------------------------------------------------------
# Fast checks of the data layout
# ----------------------------------------------------------------------------------------------------------


def test_model_inputs_shift_and_mask():
    seqs = make_split("recursive", "train", 3, 10, seed=0)
    batch = model_inputs(seqs)
    assert (batch["tokens"][:, 0] == BOS).all()
    assert (batch["tokens"][:, 1:] == seqs[:, :-1]).all()  # position l sees x_<l
    assert (batch["labels"] == seqs).all()
    assert batch["loss_mask"][:, :4].sum() == 0 and (batch["loss_mask"][:, 4:] == 1).all()
    assert (batch["position_ids"] == batch["position_ids"][0]).all()


def test_sample_order_is_epochs_of_permutations():
    order = sample_order(10, 25, seed=3)
    assert len(order) == 25
    assert sorted(order[:10].tolist()) == list(range(10))
    assert sorted(order[10:20].tolist()) == list(range(10))
    assert (order == sample_order(10, 25, seed=3)).all()
    assert not (order == sample_order(10, 25, seed=4)).all()


def test_bad_input_is_one_line(tmp_path):
    proc, _ = run_tool("--preset", "smoke", "--out", tmp_path / "x", "--seeds", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["posgen_benchmark.py: error: --seeds must be >= 1, got 0"]


# ----------------------------------------------------------------------------------------------------------
# Smoke run
# ----------------------------------------------------------------------------------------------------------


def _check_stats(stats, seeds):
    assert set(stats) == {"mean", "std", "runs"}
    assert len(stats["runs"]) == seeds
    assert all(0.0 <= r <= 1.0 for r in stats["runs"])
    assert 0.0 <= stats["mean"] <= 1.0 and stats["std"] >= 0.0
    assert math.isclose(stats["mean"], sum(stats["runs"]) / seeds)


@pytest.mark.slow
def test_smoke_run_learns_reports_and_resumes(tmp_path):
    out = tmp_path / "posgen"
    proc, first = run_tool("--preset", "smoke", "--out", out, "--tasks", "recursive", "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[posgen 2/2] recursive seed 0 resonance" in proc.stdout  # progress output

    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["tasks"] == ["recursive"] and report["seeds"] == [0]
    for metric in ("ood_accuracy", "id_accuracy"):
        assert set(report[metric]) == {"recursive"}
        assert set(report[metric]["recursive"]) == set(VARIANTS)
        for variant in VARIANTS:
            _check_stats(report[metric]["recursive"][variant], seeds=1)
    # the model learned the rule in distribution, far above chance (1/17), with either rope kind
    for variant in TRAINED_KINDS:
        assert report["id_accuracy"]["recursive"][variant]["mean"] > 3 * CHANCE, report["id_accuracy"]
    curve = report["position_accuracy"]["recursive"]["rope"]
    assert len(curve) == PRESETS["smoke"].test_length and curve[:4] == [None] * 4

    md = (out / "report.md").read_text()
    assert "| task | rope | resonance | yarn | resonance_yarn |" in md and "| recursive |" in md
    png = out / "position_recursive.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = sorted(p.relative_to(out).as_posix() for p in (out / "cells").rglob("*.json"))
    assert cells == ["cells/recursive/seed0/resonance.json", "cells/recursive/seed0/rope.json"]

    # resume: nothing is retrained, the report is the same
    proc, second = run_tool("--preset", "smoke", "--out", out, "--tasks", "recursive", "--seeds", "1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "2 cells, 2 already done" in proc.stdout and "iter" not in proc.stdout
    assert second < first
    again = json.loads((out / "report.json").read_text())
    for key in ("ood_accuracy", "id_accuracy", "position_accuracy", "cells"):
        assert again[key] == report[key]

    # a run with other settings refuses the directory
    proc, _ = run_tool("--preset", "small", "--out", out, "--tasks", "recursive", "--seeds", "1")
    assert proc.returncode == 2 and "holds a benchmark run with other settings" in proc.stderr
