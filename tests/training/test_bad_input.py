"""Bad input to the entry points: one line ``<prog>: error: <what is wrong>`` on stderr, exit status 2, no
worker started, and nothing written (an existing ``--save`` directory, with a checkpoint in it, is left
byte for byte as it was).

Most cases call the entry point's ``launch.main`` in this process with ``--nproc-per-node 2`` and the
torchrun start replaced by a recorder, so the launcher's validation runs as a user's would and a case that
slipped through would be seen, not trained; a few run the real command line in a subprocess without
``--nproc-per-node`` (the single-process path).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from megatron_resonance.training import launch
from megatron_resonance.training.config import config_from_args
from tests.fake_checkpoint import add_dist_files
from tests.fake_data import documents, write_dataset
from tests.training.conftest import EXTEND, PRETRAIN, REPO, TINY_RUN, command, env

ITERS = ["--train-iters", "20"]


# ---------------------------------------------------------------- fixtures ---------------------------------


def fake_checkpoint(root: Path, iteration: int, model: dict) -> Path:
    """What validation reads of a checkpoint: the tracker, the iteration's megatron_resonance.json, and the
    files ``verify_checkpoint`` checks."""
    ckpt = root / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "megatron_resonance.json").write_text(json.dumps({"model": model, "run": {}, "iteration": iteration}))
    add_dist_files(ckpt)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def tiny_model(**changes) -> dict:
    model = config_from_args(launch.make_parser("x", "").parse_args(TINY_RUN)).model.to_dict()
    return {**model, **changes}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "empty.bin").touch()
    (tmp / "empty.idx").touch()
    write_dataset(tmp / "data", documents(200, 40))
    (tmp / "only.bin").write_bytes(b"\1" * 64)
    (tmp / "empty_dir").mkdir()
    (tmp / "unknown_top.yaml").write_text("model:\n  num_layers: 2\nbogus_section:\n  x: 1\n")
    (tmp / "unknown_model.yaml").write_text("model:\n  hiden_size: 64\n")
    (tmp / "unknown_rope.yaml").write_text("model:\n  rope:\n    kindd: yarn\n")
    (tmp / "unknown_training.yaml").write_text("training:\n  train_iter: 5\n")
    (tmp / "not_a_mapping.yaml").write_text("- a\n- b\n")
    (tmp / "a_file").write_text("not a directory\n")
    for name, text in YAML_TYPE_CASES.items():
        (tmp / f"{name}.yaml").write_text(text[0])
    fake_checkpoint(tmp / "other_model", 3, tiny_model(hidden_size=128))
    # the --save every case passes: a run's checkpoint (same model) and its metrics, which must survive
    save = fake_checkpoint(tmp / "save", 7, tiny_model())
    (save / "metrics.jsonl").write_text('{"iteration": 7, "loss": 3.0}\n')
    # a tracker naming a checkpoint that is not there (a save that never completed)
    (tmp / "dangling").mkdir()
    (tmp / "dangling" / "latest_checkpointed_iteration.txt").write_text("9")
    return {p.name: p for p in tmp.iterdir()}


def snapshot(root: Path) -> Dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def load_extend():
    spec = importlib.util.spec_from_file_location("extend_context_script", EXTEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_in_process(
    monkeypatch, script: Path, argv: List[str], omp: Optional[str] = "1"
) -> subprocess.CompletedProcess:
    """``script``'s ``launch.main`` here; records (instead of starting) the torchrun launch and the
    OMP_NUM_THREADS it would start the workers with (``omp``: the user's, None for unset)."""
    launched, threads = [], []

    def record(args, prog, **_):
        launched.append(args)
        threads.append(os.environ["OMP_NUM_THREADS"])
        return 0

    monkeypatch.setattr(launch, "run_torchrun", record)
    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", omp or "")  # recorded first, so the test's end restores it
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS")
    if script == EXTEND:
        prog, make_config = "extend_context.py", load_extend().make_config
    else:
        prog, make_config = "pretrain_llama.py", config_from_args
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = launch.main(str(script), prog, "test", make_config, ["--nproc-per-node", "2", *argv])
        except SystemExit as e:
            status = e.code
    proc = subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())
    proc.launched, proc.threads = launched, threads
    return proc


def assert_one_error_line(proc, prog: str, message: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert message in lines[0], lines[0]


# ---------------------------------------------------------------- pretrain_llama.py -------------------------

# name: (arguments after the tiny model's, the message; "{name}" is files[name])
PRETRAIN_CASES = {
    "no data": (["--no-mock-data"], "no training data: give --data-path PREFIX or --mock-data"),
    "missing data": (["--no-mock-data", "--data-path", "{tmp}/nope"], "dataset {tmp}/nope: {tmp}/nope.bin not found"),
    "missing .idx": (["--no-mock-data", "--data-path", "{tmp}/only"], "{tmp}/only.idx not found"),
    "empty data": (["--no-mock-data", "--data-path", "{tmp}/empty"], "dataset {tmp}/empty: {tmp}/empty.bin is empty"),
    "empty validation data": (
        ["--no-mock-data", "--data-path", "{tmp}/data", "--valid-data-path", "{tmp}/empty"],
        "{tmp}/empty.bin is empty",
    ),
    "missing tokenizer": (["--tokenizer-model", "{tmp}/nope.model"], "tokenizer model not found: {tmp}/nope.model"),
    "seq-length vs 2 CP": (
        ["--context-parallel-size", "2", "--seq-length", "30"],
        "--seq-length 30 is not divisible by 2 x context-parallel-size = 4",
    ),
    "TP vs heads": (
        ["--tensor-model-parallel-size", "3"],
        "tensor-model-parallel-size 3 does not divide num_attention_heads 4",
    ),
    "CP vs world size": (
        ["--context-parallel-size", "4"],
        "world size 2 is not divisible by TP*PP*CP = 1*1*4 = 4: run a multiple of 4 processes, or give a layout "
        "for 2, e.g. --context-parallel-size 2",
    ),
    "CP with compiled layers": (
        ["--context-parallel-size", "2", "--transformer-impl", "local_compiled"],
        "--context-parallel-size > 1 runs with --transformer-impl local or te, not local_compiled",
    ),
    "TP vs query groups": (
        ["--tensor-model-parallel-size", "4"],
        "tensor-model-parallel-size 4 does not divide num_query_groups 2",
    ),
    "TP vs world size": (
        ["--tensor-model-parallel-size", "4", "--num-query-groups", "4"],
        "world size 2 is not divisible by TP*PP*CP = 4*1*1 = 4: run a multiple of 4 processes, or give a layout "
        "for 2, e.g. --tensor-model-parallel-size 2",
    ),
    "load: nothing there": (["--load", "{tmp}/nowhere"], "--load {tmp}/nowhere: no checkpoint there"),
    "load: empty directory": (["--load", "{tmp}/empty_dir"], "--load {tmp}/empty_dir: no checkpoint there"),
    "load: incomplete checkpoint": (["--load", "{tmp}/dangling"], "--load {tmp}/dangling: no checkpoint there"),
    "load: another model": (
        ["--load", "{tmp}/other_model", "--finetune", "--save", "{tmp}/empty_dir"],  # (a --save checkpoint wins)
        "--load {tmp}/other_model is another model: hidden_size 128 (this run: 64)",
    ),
    "save: another model": (
        ["--save", "{tmp}/other_model"],
        "--save {tmp}/other_model holds a checkpoint of another model: hidden_size 128 (this run: 64)",
    ),
    "warm-up >= decay": (
        ["--lr-warmup-iters", "20"],
        "lr warm-up (20 steps) must be shorter than the decay (20 steps)",
    ),
    "warm-up fraction >= decay": (
        ["--lr-warmup-fraction", "1.0", "--lr-decay-iters", "10"],
        "lr warm-up (20 steps) must be shorter than the decay (10 steps)",
    ),
    "global batch": (
        ["--global-batch-size", "6"],
        "--global-batch-size 6 is not a multiple of micro-batch-size x DP = 2 x 2",
    ),
    "seq-length > max positions": (
        ["--seq-length", "64"],
        "--seq-length 64 exceeds the model's max_position_embeddings 32",
    ),
    "train iters": (["--train-iters", "0"], "--train-iters must be >= 1, got 0"),
    "unknown rope kind": (["--rope-kind", "alibi"], "unknown rope kind 'alibi'"),
    "unknown flag": (["--hiden-size", "64"], "unrecognized arguments: --hiden-size 64"),
    "bad flag value": (["--hidden-size", "sixty-four"], "argument --hidden-size: invalid int value: 'sixty-four'"),
    "heads vs hidden": (
        ["--num-attention-heads", "3", "--num-query-groups", "1"],
        "hidden_size 64 is not divisible by num_attention_heads 3",
    ),
    "missing config file": (["--config", "{tmp}/nope.yaml"], "config file not found: {tmp}/nope.yaml"),
    "config not a mapping": (["--config", "{tmp}/not_a_mapping.yaml"], "must hold a mapping of sections"),
    "unknown key: section": (
        ["--config", "{tmp}/unknown_top.yaml"],
        "unknown config key(s) in {tmp}/unknown_top.yaml: bogus_section",
    ),
    "unknown key: model": (
        ["--config", "{tmp}/unknown_model.yaml"],
        "unknown config key(s) in {tmp}/unknown_model.yaml: model: hiden_size",
    ),
    "unknown key: rope": (
        ["--config", "{tmp}/unknown_rope.yaml"],
        "unknown config key(s) in {tmp}/unknown_rope.yaml: model.rope: kindd",
    ),
    "unknown key: training": (
        ["--config", "{tmp}/unknown_training.yaml"],
        "unknown config key(s) in {tmp}/unknown_training.yaml: training: train_iter",
    ),
    "save: a file": (["--save", "{tmp}/a_file"], "--save {tmp}/a_file: exists and is not a directory"),
    "save: under a file": (["--save", "{tmp}/a_file/ckpt"], "--save {tmp}/a_file/ckpt: {tmp}/a_file is a file"),
    "tensorboard-dir: a file": (
        ["--tensorboard-dir", "{tmp}/a_file"],
        "--tensorboard-dir {tmp}/a_file: exists and is not a directory",
    ),
    "micro-batch 0": (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    "global batch 0": (["--global-batch-size", "0"], "--global-batch-size must be >= 1, got 0"),
    "seq-length 0": (["--seq-length", "0"], "--seq-length must be >= 1, got 0"),
    "log-interval 0": (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
    "eval-interval -1": (["--eval-interval", "-1"], "--eval-interval must be >= 0, got -1"),
    "eval-iters -1": (["--eval-iters", "-1"], "--eval-iters must be >= 0, got -1"),
    "save-interval -1": (["--save-interval", "-1"], "--save-interval must be >= 0, got -1"),
    "exit-interval -1": (["--exit-interval", "-1"], "--exit-interval must be >= 0, got -1"),
    "negative lr": (["--lr", "-1"], "--lr must be >= 0.0, got -1.0"),
    "negative min-lr": (["--min-lr", "-1"], "--min-lr must be >= 0.0, got -1.0"),
    "min-lr above lr": (["--lr", "1e-5"], "--min-lr 0.0001 is above --lr 1e-05"),
    "negative clip-grad": (["--clip-grad", "-1"], "--clip-grad must be >= 0.0, got -1.0"),
    "warm-up fraction < 0": (["--lr-warmup-fraction", "-0.5"], "--lr-warmup-fraction must be in [0, 1], got -0.5"),
    "adam-beta2 1": (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
    "zero heads": (["--num-attention-heads", "0"], "num_attention_heads must be >= 1, got 0"),
    "zero layers": (["--num-layers", "0"], "num_layers must be >= 1, got 0"),
    "unknown optimizer": (["--optimizer", "lamb"], "unknown --optimizer 'lamb'; expected one of adam, sgd"),
    "unknown decay style": (["--lr-decay-style", "wsd"], "unknown --lr-decay-style 'wsd'; expected one of constant"),
    "unknown layer spec": (
        ["--transformer-impl", "fast"],
        "unknown layer spec 'fast'; expected one of auto, te, local, local_compiled",
    ),
}

#: name: (a --config file's text, the message; "{file}" is that file)
YAML_TYPE_CASES = {
    "train_iters_text": (
        "training:\n  train_iters: abc\n",
        "{file}: training.train_iters is 'abc', expected an integer",
    ),
    "hidden_size_list": ("model:\n  hidden_size: [1]\n", "{file}: model.hidden_size is [1], expected an integer"),
    "lr_word": ('optimizer:\n  lr: "fast"\n', "{file}: optimizer.lr is 'fast', expected a number"),
    "rope_factor_word": ("model:\n  rope:\n    factor: big\n", "{file}: model.rope.factor is 'big', expected a number"),
    "bool_as_text": (
        "checkpoint:\n  finetune: 'no'\n",
        "{file}: checkpoint.finetune is 'no', expected a boolean (true/false)",
    ),
    "section_not_a_mapping": ("training: 5\n", "{file}: training is 5, expected a mapping of keys"),
}


def _fill(items, files):
    tmp = str(files["save"].parent)
    return [s.replace("{tmp}", tmp) for s in items] if isinstance(items, list) else items.replace("{tmp}", tmp)


@pytest.mark.parametrize("case", PRETRAIN_CASES)
def test_pretrain_bad_input(monkeypatch, files, case):
    args, message = PRETRAIN_CASES[case]
    save = files["save"]
    before = snapshot(save.parent)
    argv = [*TINY_RUN, *ITERS, "--save", str(save), *_fill(args, files)]
    proc = launch_in_process(monkeypatch, PRETRAIN, argv)
    assert_one_error_line(proc, "pretrain_llama.py", _fill(message, files))
    assert proc.launched == []
    assert snapshot(save.parent) == before


@pytest.mark.parametrize("case", YAML_TYPE_CASES)
def test_config_value_of_the_wrong_type(monkeypatch, files, case):
    """A YAML value that is not the field's type: one line naming the field, the value and the type (the
    file alone sets it: the tiny-model flags would override these fields)."""
    save, config = files["save"], files[f"{case}.yaml"]
    before = snapshot(save.parent)
    proc = launch_in_process(monkeypatch, PRETRAIN, ["--mock-data", "--config", str(config), "--save", str(save)])
    assert_one_error_line(proc, "pretrain_llama.py", YAML_TYPE_CASES[case][1].replace("{file}", str(config)))
    assert proc.launched == []
    assert snapshot(save.parent) == before


def test_config_number_yaml_reads_as_text_is_a_number(tmp_path):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; a float field takes it as the number it is."""
    (tmp_path / "lr.yaml").write_text("optimizer:\n  lr: 3e-4\n  min_lr: 3\n")
    cfg = config_from_args(launch.make_parser("x", "").parse_args(["--config", str(tmp_path / "lr.yaml")]))
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (3e-4, 3.0)


def test_save_where_nothing_can_be_written(monkeypatch, files):
    """A --save whose nearest existing directory is not writable. As root (these tests) permission bits
    do not stop writes, so the case is a kernel directory that refuses them even to root (``/proc/self``);
    skipped where that directory is writable."""
    if os.access("/proc/self", os.W_OK):
        pytest.skip("no directory here refuses writes to this user")
    proc = launch_in_process(monkeypatch, PRETRAIN, [*TINY_RUN, *ITERS, "--save", "/proc/self/ckpt"])
    assert_one_error_line(proc, "pretrain_llama.py", "--save /proc/self/ckpt: /proc/self is not writable")
    assert proc.launched == []


def test_intervals_of_zero_are_off_not_errors(monkeypatch, files):
    """0 keeps its meaning in run(): evaluate/save only at the end, no exit interval, no evaluation."""
    argv = [*TINY_RUN, *ITERS, "--eval-interval", "0", "--save-interval", "0", "--exit-interval", "0",
            "--eval-iters", "0", "--save", str(files["save"].parent / "fresh" / "run")]  # fmt: skip
    proc = launch_in_process(monkeypatch, PRETRAIN, argv)
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.launched) == 1
    assert not (files["save"].parent / "fresh").exists()  # validation creates nothing


def test_context_parallel_without_transformer_engine_reaches_the_launch(monkeypatch, files):
    """CP=2 is a valid layout on the local spec (SDPA attention over all-gathered K/V)."""
    argv = [*TINY_RUN, *ITERS, "--context-parallel-size", "2", "--save", str(files["save"])]
    proc = launch_in_process(monkeypatch, PRETRAIN, argv)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.launched == [["--nproc-per-node=2", str(PRETRAIN), *argv]]


@pytest.mark.parametrize("flags", [["--reset-attention-mask"], ["--reset-position-ids", "--eod-mask-loss"]])
def test_document_flags_with_transformer_engine(monkeypatch, files, flags):
    """Document masking runs in the local spec's attention; with TE (here pretended) it is one line."""
    from megatron_resonance.training import config_checks

    monkeypatch.setattr(config_checks, "resolve_spec", lambda spec: "te")
    proc = launch_in_process(monkeypatch, PRETRAIN, [*TINY_RUN, *ITERS, *flags])
    positional = " ".join(f for f in flags if f != "--eod-mask-loss")
    assert_one_error_line(
        proc,
        "pretrain_llama.py",
        f"{positional}: document masking needs the local attention (--transformer-impl local)",
    )
    assert proc.launched == []


def test_document_flags_with_mock_data_reach_the_launch(monkeypatch, files):
    """Mock data with the document flags is a run, not an error: megatron's mock documents end with the EOD."""
    flags = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
    proc = launch_in_process(monkeypatch, PRETRAIN, [*TINY_RUN, *ITERS, *flags, "--transformer-impl", "local"])
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.launched) == 1 and all(f in proc.launched[0] for f in flags)


def test_good_input_reaches_the_launch(monkeypatch, files):
    """The counter-check: the same harness with valid input launches torchrun with the user's flags."""
    argv = [*TINY_RUN, *ITERS, "--save", str(files["save"])]
    proc = launch_in_process(monkeypatch, PRETRAIN, argv)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.launched == [["--nproc-per-node=2", str(PRETRAIN), *argv]]
    assert "[launch] CPU threads: 1 per process (from OMP_NUM_THREADS)" in proc.stdout.splitlines()
    assert proc.threads == ["1"]


def test_threads_per_process_shares_the_cores_and_the_users_value_wins():
    from megatron_resonance.environment import threads_line, threads_per_process

    assert threads_per_process(2, 8, "SLURM_CPUS_ON_NODE", environ={}) == (
        4,
        "8 cores from SLURM_CPUS_ON_NODE / 2 processes",
    )
    assert threads_per_process(1, 3, environ={}) == (3, "3 cores from the CPU affinity / 1 process")
    assert threads_per_process(8, 2, environ={})[0] == 1  # more workers than cores: at least one each
    assert threads_per_process(3, 8, environ={})[0] == 2  # rounded down: no oversubscription
    for user in ("", "0", "x"):  # unset, or not a thread count: the rule
        assert threads_per_process(2, 8, environ={"OMP_NUM_THREADS": user})[0] == 4
    assert threads_per_process(2, 8, environ={"OMP_NUM_THREADS": "5"}) == (5, "from OMP_NUM_THREADS")
    assert threads_line(5, "from OMP_NUM_THREADS") == "CPU threads: 5 per process (from OMP_NUM_THREADS)"


def test_launch_shares_the_cores_among_the_workers(monkeypatch, files):
    """Without OMP_NUM_THREADS each of the 2 workers gets half the cores this process may use (torchrun
    alone would give them 1 thread each), and the launcher says so."""
    from megatron_resonance import environment

    monkeypatch.setattr(environment, "cores", lambda: 6)
    proc = launch_in_process(monkeypatch, PRETRAIN, [*TINY_RUN, *ITERS, "--save", str(files["save"])], omp=None)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "[launch] CPU threads: 3 per process (6 cores from the CPU affinity / 2 processes)" in proc.stdout
    assert proc.threads == ["3"]


# ---------------------------------------------------------------- extend_context.py ------------------------

EXTEND_CASES = {
    "no --load": ([], "--load is required: the checkpoint whose context to extend"),
    "load: nothing there": (["--load", "{tmp}/nowhere"], "--load {tmp}/nowhere: no checkpoint at {tmp}/nowhere"),
    "load: incomplete checkpoint": (["--load", "{tmp}/dangling"], "checkpoint {tmp}/dangling/iter_0000009 named by"),
    "no longer than stored": (
        ["--load", "{tmp}/save", "--seq-length", "32"],
        "--seq-length 32 does not extend the stored length 32",
    ),
    "shrinking factor": (["--load", "{tmp}/save", "--seq-length", "64", "--rope-factor", "0.5"], "factor must be"),
    "unknown rope kind": (["--load", "{tmp}/save", "--seq-length", "64", "--rope-kind", "alibi"], "alibi"),
    "save: a file": (
        ["--load", "{tmp}/save", "--seq-length", "64", "--save", "{tmp}/a_file"],
        "--save {tmp}/a_file: exists and is not a directory",
    ),
}


@pytest.mark.parametrize("case", EXTEND_CASES)
def test_extend_context_bad_input(monkeypatch, files, case):
    args, message = EXTEND_CASES[case]
    save = files["save"]
    before = snapshot(save.parent)
    argv = ["--mock-data", "--micro-batch-size", "2", "--save", str(save.parent / "extended"), *_fill(args, files)]
    proc = launch_in_process(monkeypatch, EXTEND, argv)
    assert_one_error_line(proc, "extend_context.py", _fill(message, files))
    assert proc.launched == []
    assert snapshot(save.parent) == before


# ---------------------------------------------------------------- the real command line --------------------


@pytest.fixture(scope="module")
def subprocess_runs(files) -> Dict[str, subprocess.CompletedProcess]:
    """A few cases as a user runs them, without --nproc-per-node (validation in the one process that
    would train), started together: each pays a torch import."""
    cases = ["missing data", "missing tokenizer", "seq-length vs 2 CP", "unknown key: model"]
    procs = {}
    for case in cases:
        args = [*TINY_RUN, *ITERS, "--save", str(files["save"]), *_fill(PRETRAIN_CASES[case][0], files)]
        procs[case] = subprocess.Popen(
            command(PRETRAIN, *args, nproc=0), cwd=REPO, env=env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    # under plain torchrun (the workers validate): the line is the traceback of torchrun's failure report
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(PRETRAIN)]
    procs["plain torchrun"] = subprocess.Popen(
        [*torchrun, *TINY_RUN, "--train-iters", "0"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs["--help"] = subprocess.Popen(
        command(PRETRAIN, "--help", nproc=0), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    results = {}
    try:
        for case, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.parametrize("case", ["missing data", "missing tokenizer", "seq-length vs 2 CP", "unknown key: model"])
def test_command_line_bad_input(subprocess_runs, files, case):
    proc = subprocess_runs[case]
    assert_one_error_line(proc, "pretrain_llama.py", _fill(PRETRAIN_CASES[case][1], files))
    assert proc.stdout == ""


def test_plain_torchrun_reports_the_line_last(subprocess_runs):
    proc = subprocess_runs["plain torchrun"]
    assert proc.returncode != 0
    line = "pretrain_llama.py: error: --train-iters must be >= 1, got 0"
    report = proc.stderr[proc.stderr.index("Root Cause (first observed failure)") :]
    assert f"traceback : {line}" in report, proc.stderr[-3000:]
    assert "To enable traceback see" not in proc.stderr  # torchrun's pointer, where it has no message


def test_help_lists_every_flag(subprocess_runs):
    proc = subprocess_runs["--help"]
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--tensor-model-parallel-size",
        "--context-parallel-size",
        "--rope-kind",
        "--rotary-base",
        "--rope-factor",
        "--original-max-position",
        "--exit-interval",
        "--nproc-per-node",
    ):
        assert flag in proc.stdout
