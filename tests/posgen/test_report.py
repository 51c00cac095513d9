"""The PosGen report built from stored cells (no training): paired intervals, learned marking, band plot."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_resonance import atomic
from megatron_resonance.posgen import report, stats
from megatron_resonance.posgen.presets import EVALUATED_AS, PRESETS, TRAINED_KINDS


def _fake_cell(preset, task, seed, kind, id_acc, ood_acc):
    curve = [None] * 4 + [id_acc] * (preset.train_length - 4) + [ood_acc] * (preset.test_length - preset.train_length)
    variants = {
        v: {"id_accuracy": id_acc, "ood_accuracy": ood_acc + 0.01 * i, "position_accuracy": curve}
        for i, v in enumerate(EVALUATED_AS[kind])
    }
    return {
        "task": task,
        "seed": seed,
        "trained_as": kind,
        "variants": variants,
        "train": {"iterations": 1, "seconds": 1.0, "history": []},
        "test_seconds": 0.5,
        "world_size": 1,
        "preset": preset.name,
    }


def _store(out, preset, task, id_acc, ood):
    for seed in range(preset.seeds):
        for kind in TRAINED_KINDS:
            cell = _fake_cell(preset, task, seed, kind, id_acc[kind][seed], ood[kind][seed])
            atomic.write_json(report.cell_path(str(out), task, seed, kind), cell)


def test_report_gives_paired_intervals_and_band_plot(tmp_path):
    preset = dataclasses.replace(PRESETS["smoke"], seeds=3)
    ood = {"rope": [0.20, 0.30, 0.25], "resonance": [0.26, 0.33, 0.31]}
    _store(tmp_path, preset, "recursive", {k: [0.98] * 3 for k in TRAINED_KINDS}, ood)
    run_info = {
        "wall_seconds": 90.0,
        "cells_run": 6,
        "processes": 2,
        "threads_per_process": 1,
        "how": "2 worker processes",
    }
    written = report.write_report(str(tmp_path), preset, run_info)
    assert written["complete"] and written["last_run"] == run_info
    ours = written["paired_difference"]["ood_accuracy"]["recursive"]["resonance - rope"]
    assert ours["runs"] == pytest.approx([0.06, 0.03, 0.06])
    expected = stats.paired_difference(dict(enumerate(ood["resonance"])), dict(enumerate(ood["rope"])))
    assert ours["ci"] == pytest.approx(expected["ci"])
    assert written["ood_accuracy"]["recursive"]["yarn"]["mean"] == pytest.approx(0.26)
    assert written["position_accuracy_std"]["recursive"]["rope"][-1] == pytest.approx(0.05)
    assert json.loads((tmp_path / "report.json").read_text())["paired_difference"] == written["paired_difference"]
    md = (tmp_path / "report.md").read_text()
    assert "resonance - rope [95 % CI]" in md
    lo, hi = (100 * x for x in ours["ci"])
    assert f"+5.0 [{lo:+.1f}, {hi:+.1f}]" in md
    assert "the last command ran 6 cell(s) in 1.5 min wall (2 worker processes x 1 thread(s))" in md
    assert (tmp_path / "position_recursive.png").read_bytes()[:4] == b"\x89PNG"
    # a rewrite by a command that ran nothing keeps the last run's record
    assert report.write_report(str(tmp_path), preset)["last_run"] == run_info


def test_learned_counts_the_trained_models_at_the_threshold_in_distribution(tmp_path):
    preset = dataclasses.replace(PRESETS["small"], tasks=("recursive", "semi_recursive"), seeds=3)
    ood = {k: [0.3, 0.3, 0.3] for k in TRAINED_KINDS}
    _store(tmp_path, preset, "recursive", {"rope": [0.98, 0.95, 0.949], "resonance": [0.99, 0.99, 0.99]}, ood)
    _store(tmp_path, preset, "semi_recursive", {k: [0.53, 0.52, 0.53] for k in TRAINED_KINDS}, ood)
    written = report.write_report(str(tmp_path), preset)
    assert written["learned_threshold"] == report.LEARNED == 0.95
    assert written["learned"]["recursive"] == {
        "rope": {"seeds": [0, 1], "of": 3},
        "resonance": {"seeds": [0, 1, 2], "of": 3},
    }
    assert written["learned"]["semi_recursive"]["rope"] == {"seeds": [], "of": 3}
    md = (tmp_path / "report.md").read_text()
    assert "| recursive | 2 of 3 | 3 of 3 |" in md and "| semi_recursive | 0 of 3 | 0 of 3 |" in md


def test_a_missing_cell_leaves_the_report_incomplete(tmp_path):
    preset = dataclasses.replace(PRESETS["smoke"], seeds=2)
    _store(
        tmp_path, preset, "recursive", {k: [0.98, 0.97] for k in TRAINED_KINDS}, {k: [0.3, 0.4] for k in TRAINED_KINDS}
    )
    (tmp_path / "cells" / "recursive" / "seed1" / "rope.json").unlink()
    written = report.write_report(str(tmp_path), preset)
    assert not written["complete"] and len(written["cells"]) == 3
    assert written["id_accuracy"]["recursive"]["rope"]["n"] == 1
    # seed 1 has no rope partner: the paired difference uses seed 0 alone, and has no interval
    pair = written["paired_difference"]["ood_accuracy"]["recursive"]["resonance - rope"]
    assert pair["seeds"] == [0] and pair["ci"] is None
    assert "(1 seed)" in (tmp_path / "report.md").read_text()
