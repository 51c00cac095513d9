"""Runs of the real entry points, shared by the training tests (each torchrun job costs 10-15 s to start).

Every run is ``python pretrain/pretrain_llama.py --nproc-per-node 2 ...`` (or ``finetune/extend_context.py``)
exactly as a user types it, on a tiny model with mock data, 2 CPU processes (gloo). The session fixtures
below run once and are read by several tests:

* ``run_a``   DP=2, 20 iterations, uninterrupted (learning, resume reference, TP=2 reference, extension);
* ``run_b``   the same command with ``--exit-interval 10``, started twice (stops at 10, resumes to 20);
* ``run_tp2`` TP=2, same global batch, saves at 5 and stops at 10 (equivalence, resharding);
* ``model_checks`` one torchrun job of ``workers/checks.py``: the rotary the trainer installs for rope flags,
  and run_tp2's checkpoint loaded at TP=1 and PP=2;
* ``signal_runs`` a long run with the rope flags stopped by SIGUSR1, requeued, stopped by SIGTERM;
* ``run_extend`` ``extend_context.py`` from run A's checkpoint to twice the length.

Eight torchrun jobs, about 4.5 CPU-minutes in all (measured: 2 processes each, so roughly half that in
wall time on 2 idle cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from megatron_resonance.training.preemption import child_pids
from tests.launch import child_env, run_command, torchrun
from tests.worker_checks import CheckResults

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "pretrain" / "pretrain_llama.py"
EXTEND = REPO / "finetune" / "extend_context.py"
WORKERS = Path(__file__).parent / "workers"

#: a 2-layer LLaMA (head dim 16, GQA 4:2) at sequence length 32; no config file, so the tests do not
#: depend on configs/demo.yaml
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--vocab-size", "256", "--max-position-embeddings", "32",
]  # fmt: skip
TINY_RUN = [
    *TINY_MODEL,
    "--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--log-interval", "1",
    "--eval-interval", "5", "--eval-iters", "2",
]  # fmt: skip
ITERS = 20


def env(**extra: str) -> Dict[str, str]:
    return child_env(**extra)


def command(script: Path, *args, nproc: int = 2) -> List[str]:
    launch = ["--nproc-per-node", str(nproc)] if nproc else []
    return [sys.executable, str(script), *launch, *map(str, args)]


def run(script: Path, *args, nproc: int = 2, timeout: int = 300, extra_env=None) -> subprocess.CompletedProcess:
    """Run an entry point to completion; AssertionError with its output if it fails."""
    return run_command(command(script, *args, nproc=nproc), timeout, extra_env)


def records(save: Path) -> List[dict]:
    """``<save>/metrics.jsonl`` as a list of dicts (empty if not written yet)."""
    path = Path(save) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(save: Path) -> Dict[int, float]:
    return {r["iteration"]: r["loss"] for r in records(save) if "loss" in r}


def eval_losses(save: Path) -> Dict[int, float]:
    return {r["iteration"]: r["eval_loss"] for r in records(save) if "eval_loss" in r}


def stored_config(checkpoint_dir: Path) -> dict:
    return json.loads((Path(checkpoint_dir) / "megatron_resonance.json").read_text())


@pytest.fixture(scope="session")
def run_a(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("run_a") / "ckpt"
    run(PRETRAIN, *TINY_RUN, "--train-iters", ITERS, "--save", save)
    return save


@pytest.fixture(scope="session")
def run_b(tmp_path_factory) -> dict:
    """The run A command with ``--exit-interval 10``, started twice like a requeued job."""
    save = tmp_path_factory.mktemp("run_b") / "ckpt"
    args = (*TINY_RUN, "--train-iters", ITERS, "--save", save, "--exit-interval", 10)
    first = run(PRETRAIN, *args)
    after_first = {
        "latest": (save / "latest_checkpointed_iteration.txt").read_text(),
        "checkpoints": sorted(p.name for p in save.glob("iter_*")),
        "losses": train_losses(save),
    }
    second = run(PRETRAIN, *args)
    return {"save": save, "first": first, "second": second, "after_first": after_first}


@pytest.fixture(scope="session")
def run_tp2(tmp_path_factory) -> Path:
    """Run A's command at TP=2 (DP=1, 4 micro-batches instead of 2 x 2): saves at 5, stops at 10."""
    save = tmp_path_factory.mktemp("run_tp2") / "ckpt"
    run(
        PRETRAIN, *TINY_RUN, "--train-iters", ITERS, "--save", save,
        "--tensor-model-parallel-size", 2, "--save-interval", 5, "--exit-interval", 10,
    )  # fmt: skip
    return save


#: the rope flags under test, and what they must produce (head dim 16)
ROPE_FLAGS = ["--rope-kind", "resonance_yarn", "--rope-factor", "4", "--original-max-position", "32",
              "--rotary-base", "5000", "--max-position-embeddings", "128"]  # fmt: skip
ROPE_CASES = {
    "default": [],
    "rotary_base": ["--rotary-base", "5000"],
    "yarn": ["--rope-kind", "yarn", "--rope-factor", "4", "--original-max-position", "32"],
    "resonance_yarn": ROPE_FLAGS,
}
RESHARD_LAYOUTS = {"tp1_dp2": [1, 1], "pp2": [1, 2]}


@pytest.fixture(scope="session")
def model_checks(run_tp2, tmp_path_factory) -> Dict[str, CheckResults]:
    """One torchrun job (``workers/checks.py``): the model the trainer builds for each of ``ROPE_CASES``,
    and run_tp2's iteration-5 checkpoint loaded at each of ``RESHARD_LAYOUTS``. Its ``rope`` records are
    asserted in ``test_rope_flags.py``, its ``reshard`` records in ``test_checkpoint_layouts.py``."""
    out = tmp_path_factory.mktemp("model_checks")
    base = [*TINY_RUN, "--train-iters", str(ITERS)]
    spec = {
        "rope": {name: base + flags for name, flags in ROPE_CASES.items()},
        "reshard": {"checkpoint": str(run_tp2 / "iter_0000005"), "argv": base, "layouts": RESHARD_LAYOUTS},
    }
    (out / "spec.json").write_text(json.dumps(spec))
    torchrun(WORKERS / "checks.py", out / "spec.json", out, nproc=2, timeout=300)
    results = json.loads((out / "results.json").read_text())
    return {section: CheckResults(r) for section, r in results.items()}


# ---------------------------------------------------------------- signals ----------------------------------


def interrupt(args, save: Path, sig: int, target: str, min_iteration: int, log: Path, timeout: int = 300) -> dict:
    """Start ``pretrain_llama.py --nproc-per-node 2 ARGS`` in its own session, wait until metrics.jsonl shows
    ``min_iteration``, send ``sig`` to the launcher (``target="launcher"``) or to its workers, and wait."""
    cmd = command(PRETRAIN, *args)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while max(train_losses(save), default=0) < min_iteration:
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode} before iteration {min_iteration}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no iteration {min_iteration} after {timeout} s:\n{log.read_text()}")
            time.sleep(0.2)
        workers = child_pids(proc.pid)
        reached = max(train_losses(save))
        for pid in [proc.pid] if target == "launcher" else workers:
            os.kill(pid, sig)
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # a failed test must not leave training processes behind
            for pid in child_pids(proc.pid) + [proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    return {
        "returncode": returncode,
        "output": log.read_text(),
        "reached": reached,
        "workers": workers,
        "latest": (save / "latest_checkpointed_iteration.txt").read_text(),
        "checkpoints": sorted(p.name for p in save.glob("iter_*")),
        "iterations": [r["iteration"] for r in records(save) if "loss" in r],
    }


@pytest.fixture(scope="session")
def signal_runs(tmp_path_factory) -> dict:
    """A long run (with ``ROPE_FLAGS``) stopped by SIGUSR1 to the launcher, then the same command again
    (a requeued job), which resumes and is stopped by SIGTERM sent to its workers directly."""
    tmp = tmp_path_factory.mktemp("signal")
    save = tmp / "ckpt"
    args = (*TINY_RUN, *ROPE_FLAGS, "--train-iters", 1000, "--eval-interval", 0, "--save", save)
    first = interrupt(args, save, signal.SIGUSR1, "launcher", 3, tmp / "first.log")
    second = interrupt(args, save, signal.SIGTERM, "workers", int(first["latest"]) + 3, tmp / "second.log")
    return {"save": save, "first": first, "second": second}


# ---------------------------------------------------------------- context extension -----------------------


@pytest.fixture(scope="session")
def run_extend(run_a, tmp_path_factory) -> dict:
    """``finetune/extend_context.py`` from run A's final checkpoint (length 32) to length 64, defaults
    otherwise (resonance_yarn, the paper's optimizer recipe)."""
    save = tmp_path_factory.mktemp("extend") / "ckpt"
    proc = run(
        EXTEND, "--load", run_a, "--save", save, "--seq-length", 64, "--mock-data", "--micro-batch-size", 2,
        "--global-batch-size", 8, "--train-iters", ITERS, "--log-interval", 1, "--eval-iters", 2,
    )  # fmt: skip
    return {"save": save, "proc": proc}
