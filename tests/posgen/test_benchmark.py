"""The PosGen benchmark end to end on the smoke preset: learns, writes its report, resumes.

One process trains the real Megatron model (rope and resonance) on the recursive task; the second run
of the same command must find both cells and only rewrite the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest

from megatron_resonance.errors import TrainingError
from megatron_resonance.posgen.cell import BOS, model_inputs, sample_order
from megatron_resonance.posgen.presets import PRESETS, TRAINED_KINDS, VARIANTS
from megatron_resonance.posgen.splits import make_split
from megatron_resonance.posgen.tasks import VOCAB_SIZE
from tests.launch import REPO

TOOL = REPO / "tools" / "posgen_benchmark.py"
CHANCE = 1 / VOCAB_SIZE


def run_tool(*args, timeout=600, env=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", **(env or {}))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
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
    assert set(stats) == {"mean", "std", "n", "seeds", "runs"}
    assert len(stats["runs"]) == stats["n"] == seeds and stats["seeds"] == list(range(seeds))
    assert all(0.0 <= r <= 1.0 for r in stats["runs"])
    assert 0.0 <= stats["mean"] <= 1.0 and stats["std"] >= 0.0
    assert math.isclose(stats["mean"], sum(stats["runs"]) / seeds)


@pytest.mark.slow
def test_smoke_run_learns_reports_and_resumes(tmp_path):
    out = tmp_path / "posgen"
    proc, first = run_tool("--preset", "smoke", "--out", out, "--tasks", "recursive", "--seeds", "1", "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # the two cells ran at once, one per worker process, each with one of the two cores
    assert "2 worker process(es) x 1 thread(s)" in proc.stdout
    assert "[posgen w1/2 1/1] recursive seed 0 rope" in proc.stdout
    assert "[posgen w2/2 1/1] recursive seed 0 resonance" in proc.stdout

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

    # one cell lost: the plain run (no workers) retrains just that one, with the worker's result exactly
    lost = out / "cells" / "recursive" / "seed0" / "resonance.json"
    by_worker = json.loads(lost.read_text())
    lost.unlink()
    proc, _ = run_tool(
        "--preset", "smoke", "--out", out, "--tasks", "recursive", "--seeds", "1", env={"OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "2 cells, 1 already done" in proc.stdout and "[posgen 1/1] recursive seed 0 resonance" in proc.stdout
    assert json.loads(lost.read_text())["variants"] == by_worker["variants"]

    # a run with other settings refuses the directory
    proc, _ = run_tool("--preset", "small", "--out", out, "--tasks", "recursive", "--seeds", "1")
    assert proc.returncode == 2 and "holds a benchmark run with other settings" in proc.stderr


def test_failed_worker_keeps_the_others_cells_and_names_what_is_missing(tmp_path):
    """run_workers with stand-in worker commands: worker 1 fails, worker 2 stores its cell."""
    from megatron_resonance.posgen import benchmark
    from megatron_resonance.posgen.report import cell_path
    from tests.posgen.test_report import _fake_cell

    preset = dataclasses.replace(PRESETS["smoke"], seeds=2)
    out = str(tmp_path)
    seen = {}

    def worker_argv(worker, cells):
        seen[worker] = cells
        if worker == "1/2":
            return [sys.executable, "-c", "import sys; sys.exit(3)"]
        records = {cell_path(out, *c): _fake_cell(preset, *c, 0.9, 0.3) for c in cells}
        return [
            sys.executable,
            "-c",
            "import json, os, sys\n"
            f"for path, record in {records!r}.items():\n"
            "    os.makedirs(os.path.dirname(path), exist_ok=True)\n"
            "    json.dump(record, open(path, 'w'))\n",
        ]

    with pytest.raises(TrainingError) as e:
        benchmark.run_workers(preset, out, 2, worker_argv)
    # cells are dealt round-robin: worker 1 had rope of both seeds, worker 2 resonance
    assert seen == {
        "1/2": [("recursive", 0, "rope"), ("recursive", 1, "rope")],
        "2/2": [("recursive", 0, "resonance"), ("recursive", 1, "resonance")],
    }
    assert str(e.value) == (
        "worker 1 (exit 3) failed; 2 cell(s) not run: recursive:0:rope recursive:1:rope; "
        "rerun the same command to run them"
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["complete"] and len(report["cells"]) == 2
    assert report["id_accuracy"]["recursive"]["resonance"]["n"] == 2
    assert report["id_accuracy"]["recursive"]["rope"]["n"] == 0
    # the rerun deals out only what is missing
    seen.clear()
    with pytest.raises(TrainingError):
        benchmark.run_workers(preset, out, 2, worker_argv)
    assert seen == {"1/2": [("recursive", 0, "rope")], "2/2": [("recursive", 1, "rope")]}


@pytest.mark.slow
def test_paper_preset_runs_in_bf16_workers_through_the_entry_point(tmp_path):
    """The GPU command's plumbing on CPU: the paper's model in bf16, one step per cell, two worker processes,
    small evaluation splits (``--set``); the report records the paper's settings with the overrides."""
    out = tmp_path / "paper"
    proc, _ = run_tool(
        "--preset",
        "paper",
        "--tasks",
        "recursive",
        "--seeds",
        "1",
        "--epochs",
        "0.0128",
        "--bf16",
        "--set",
        "test_sequences=8",
        "validation_sequences=8",
        "--workers",
        "2",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| 1 steps each | 2 worker process(es)" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["preset"] == "paper"
    settings = report["settings"]
    assert (settings["hidden_size"], settings["num_attention_heads"], settings["ffn_hidden_size"]) == (512, 8, 2048)
    assert settings["bf16"] and settings["test_sequences"] == 8 and settings["train_sequences"] == 10_000
    for variant in VARIANTS:
        curve = report["position_accuracy"]["recursive"][variant]
        assert len(curve) == 256 and all(0 <= a <= 1 for a in curve[4:])
    assert "training: 0.0128 epochs = 1 steps of 128" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------


def test_paper_preset_is_the_papers_recipe():
    """The paper's PosGen setup (and its reference code's sweep command): 2 layers in T5-small shape,
    10k / 1k / 1k, 150 epochs, AdamW 2e-4, wd 0.01, batch 128, one-cycle cosine with 10 % warm-up, 5 seeds,
    YaRN s = 4, rotary base 10,000."""
    p = PRESETS["paper"]
    assert (p.num_layers, p.hidden_size, p.num_attention_heads, p.head_dim, p.ffn_hidden_size) == (2, 512, 8, 64, 2048)
    assert (p.train_sequences, p.validation_sequences, p.test_sequences) == (10_000, 1_000, 1_000)
    assert (p.epochs, p.global_batch_size, p.lr, p.weight_decay, p.warmup_fraction) == (150, 128, 2e-4, 0.01, 0.1)
    assert (p.seeds, p.scaling_factor, p.rotary_base, p.train_length, p.test_length) == (5, 4.0, 10000.0, 64, 256)
    assert p.tasks == ("recursive", "cot", "semi_recursive")
    assert p.train_iters() == 11_719  # ceil(150 * 10,000 / 128)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("kind", TRAINED_KINDS)
def test_every_preset_gives_a_config_the_trainer_accepts(name, kind):
    from megatron_resonance.posgen.cell import run_config
    from megatron_resonance.training.validation import validate

    preset = PRESETS[name]
    cfg = run_config(preset, kind, seed=3, micro_batch_size=preset.global_batch_size)
    # PosGen feeds the step its own batches, so the data section names no dataset; everything else is checked
    validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mock_data=True)), world_size=1)
    assert cfg.model.rope.kind == kind and cfg.training.seed == 3
    assert cfg.training.train_iters == preset.train_iters()
    assert cfg.data.seq_length == preset.train_length and cfg.model.max_position_embeddings == preset.test_length
    # every cell of every preset fits the split pools: distinct prefixes for train, validation and test
    from megatron_resonance.posgen.splits import POOL_SIZES

    assert preset.train_sequences <= POOL_SIZES["train"] and preset.test_sequences <= POOL_SIZES["test"]


def test_bad_cell_and_worker_arguments_are_one_line(tmp_path):
    proc, _ = run_tool("--preset", "smoke", "--out", tmp_path / "x", "--cells", "recursive:0:alibi")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "posgen_benchmark.py: error: 'recursive:0:alibi' is not a cell of this run (task:seed:kind, e.g. "
        "recursive:0:rope)"
    ]
    proc, _ = run_tool("--preset", "smoke", "--out", tmp_path / "x", "--workers", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["posgen_benchmark.py: error: --workers must be >= 1, got 0"]
    proc, _ = run_tool("--preset", "smoke", "--out", tmp_path / "x", "--epochs", "-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["posgen_benchmark.py: error: --epochs must be positive, got -1"]


def test_set_overrides_preset_fields_with_their_types():
    from megatron_resonance.posgen.presets import with_settings

    p = with_settings(PRESETS["paper"], {"test_sequences": "20", "lr": "1e-3", "micro_batch_size": "16"})
    assert (p.test_sequences, p.lr, p.micro_batch_size) == (20, 1e-3, 16)
    assert with_settings(p, {"micro_batch_size": "none"}).micro_batch_size is None
    with pytest.raises(ValueError, match="--set seeds: not a preset setting"):
        with_settings(p, {"seeds": "3"})
    with pytest.raises(ValueError, match=r"--set test_sequences=many: expected an integer"):
        with_settings(p, {"test_sequences": "many"})
    with pytest.raises(ValueError, match="test_sequences must be positive, got 0"):
        with_settings(p, {"test_sequences": "0"})


def test_bad_set_is_one_line(tmp_path):
    for args, line in (
        (["--set", "depth=3"], "posgen_benchmark.py: error: --set depth: not a preset setting"),
        (["--set", "lr"], "posgen_benchmark.py: error: --set 'lr': expected FIELD=VALUE"),
        (["--set", "lr=fast"], "posgen_benchmark.py: error: --set lr=fast: expected a number"),
    ):
        proc, _ = run_tool("--preset", "smoke", "--out", tmp_path / "x", *args)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(line), proc.stderr
    assert not (tmp_path / "x").exists()
