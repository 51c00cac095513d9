"""Damaged checkpoints through the entry points: a requeued run whose latest checkpoint is truncated resumes
from the previous complete one (one ``[resume]`` warning) and trains every iteration; with none complete, or
with a damaged ``--load``, training, export and evaluation print one error line and exit 2.

One run saves at 3 and 6 (module fixture); each case works on a copy of its save directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import PRETRAIN, REPO, TINY_RUN, command, env, records, run

ARGS = [*TINY_RUN, "--eval-interval", "0", "--save-interval", "3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("corrupt") / "ckpt"
    run(PRETRAIN, *ARGS, "--train-iters", 6, "--save", save)
    return save


@pytest.fixture
def save(saved, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy)
    return copy


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def shard(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def failed(cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_resume_falls_back_to_the_previous_complete_checkpoint(save):
    before = {r["iteration"]: r["loss"] for r in records(save) if "loss" in r}
    damaged = shard(save / "iter_0000006")
    truncate(damaged)
    proc = run(PRETRAIN, *ARGS, "--train-iters", 9, "--save", save)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("[resume]")]
    assert len(warnings) == 1, proc.stderr  # rank 0, once (not again from the launcher's validation)
    assert warnings[0].startswith(f"[resume] {save}/iter_0000006 is unusable ({damaged.name}: truncated (")
    assert warnings[0].endswith("); resuming from iter_0000003, the newest complete checkpoint")
    assert f"[build] resumed from {save}/iter_0000003 at iteration 3" in proc.stdout
    after = [r for r in records(save) if "loss" in r]
    assert [r["iteration"] for r in after] == list(range(1, 10))  # 4-6 again, once each, then 7-9
    assert {i: r["loss"] for i, r in enumerate(after, 1) if i <= 3} == {i: before[i] for i in (1, 2, 3)}
    assert [r["consumed_samples"] for r in after] == [8 * i for i in range(1, 10)]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "9"
    for iteration in (6, 9):  # iteration 6 saved again, complete
        assert shard(save / f"iter_{iteration:07d}").stat().st_size == shard(save / "iter_0000003").stat().st_size


def test_bit_flipped_latest_is_one_error_line(save):
    """Damage only the loaded values can show (the sizes are right): every rank stops after the load, rank 0
    says which parameter, and the launcher exits 2 without torchrun's ChildFailedError traceback."""
    from tests.megatron.test_checkpoint_integrity import flip_exponent

    flip_exponent(save / "iter_0000006", "embedding.word_embeddings.weight")
    proc = failed(command(PRETRAIN, *ARGS, "--train-iters", 9, "--save", save))
    errors = [line for line in proc.stderr.splitlines() if not line.startswith(("W", "E"))]  # torchrun's log
    assert errors == [
        f"pretrain_llama.py: error: {save}/iter_0000006: parameter embedding.word_embeddings.weight holds "
        "non-finite values (a corrupted shard)"
    ], proc.stderr
    assert "Traceback" not in proc.stderr and "[train]" not in proc.stdout


def test_no_complete_checkpoint_is_one_error_line(save):
    truncate(save / "iter_0000006" / ".metadata")
    (save / "iter_0000003" / "common.pt").unlink()
    proc = failed(command(PRETRAIN, *ARGS, "--train-iters", 9, "--save", save))
    assert proc.stderr.splitlines() == [
        f"pretrain_llama.py: error: {save}/iter_0000006 is unusable (.metadata: unreadable (UnpicklingError: pickle "
        f"data was truncated)) and no earlier checkpoint in {save} is complete"
    ]
    assert proc.stdout == ""  # the launcher's validation: no worker started


def test_damaged_load_is_an_error_not_a_fallback(save, tmp_path):
    """An explicit ``--load``: its own damaged checkpoint is the error, though an earlier one is complete."""
    damaged = shard(save / "iter_0000006")
    truncate(damaged)
    proc = failed(command(PRETRAIN, *ARGS, "--train-iters", 9, "--load", save, "--save", tmp_path / "new"))
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pretrain_llama.py: error: --load {save}: {damaged}: truncated (")


TOOLS = {
    "convert_megatron_to_hf.py": ["--save", "{tmp}/hf"],
    "eval_perplexity.py": ["--lengths", "32", "--data", "{tmp}/tokens.jsonl", "--out", "{tmp}/eval"],
    "eval_passkey.py": ["--lengths", "32", "--trials", "1", "--out", "{tmp}/eval"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_export_and_evaluation_print_one_line(save, tmp_path, tool):
    """A truncated shard: before, torch DCP's CheckpointException (a BaseException) escaped every handler (60
    lines of traceback). Token-id data, so perplexity needs no tokenizer and reaches the load."""
    damaged = shard(save / "iter_0000006")
    truncate(damaged)
    ids = [(7 * i) % 256 for i in range(80)]
    (tmp_path / "tokens.jsonl").write_text("".join(json.dumps({"tokens": ids[k:] + ids[:k]}) + "\n" for k in range(4)))
    args = [a.replace("{tmp}", str(tmp_path)) for a in TOOLS[tool]]
    proc = failed([sys.executable, REPO / "tools" / tool, "--load", save, *args])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), proc.stderr
    assert f"{damaged}: truncated ({damaged.stat().st_size} bytes; .metadata refers to byte " in lines[0]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "eval").exists()
