"""The error model (``megatron_resonance/errors.py``) and its one guard (``cli.guard``).

Every tool and entry point (``tools/``, ``pretrain/``, ``finetune/``) given bad input prints exactly one line
``<prog>: error: <message>`` and exits 2: one worker process runs each script with the bad input of
:data:`BAD_INPUT` (a script without an entry there fails the test). The guard's own rules: user errors exit
2, training errors 1, Ctrl-C 130 where a tool says what it leaves behind, rank 0 alone prints, torchrun's
error file gets the line, and any other exception is a bug that keeps its traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_resonance import cli
from megatron_resonance.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    DataError,
    TrainingError,
    UserError,
)

REPO = Path(__file__).resolve().parents[1]
ENTRY_DIRS = ("tools", "pretrain", "finetune")

#: script -> (arguments that are bad input reaching the guard, not argparse, text the error line holds);
#: ``{tmp}`` is a fresh directory holding ``file`` (a regular file)
BAD_INPUT = {
    "tools/build_corpus.py": (["--output-dir", "{tmp}/out", "--valid-fraction", "2"], "valid_fraction"),
    "tools/check_pipeline.py": (
        ["--hf-model", "{tmp}/nothing", "--work-dir", "{tmp}/work", "--eval-lengths", "64"],
        "{tmp}/nothing",
    ),
    "tools/convert_hf_to_megatron.py": (["--load", "{tmp}/nothing", "--save", "{tmp}/out"], "{tmp}/nothing"),
    "tools/convert_megatron_to_hf.py": (["--load", "{tmp}/nothing", "--save", "{tmp}/out"], "{tmp}/nothing"),
    "tools/eval_passkey.py": (
        ["--load", "{tmp}/nothing", "--lengths", "64", "--trials", "1", "--out", "{tmp}/eval"],
        "{tmp}/nothing",
    ),
    "tools/eval_perplexity.py": (
        ["--load", "{tmp}/nothing", "--lengths", "64", "--data", "{tmp}/file", "--out", "{tmp}/eval"],
        "{tmp}/nothing",
    ),
    "tools/eval_ruler.py": (
        ["--load", "{tmp}/nothing", "--lengths", "64", "--samples", "1", "--out", "{tmp}/eval"],
        "{tmp}/nothing",
    ),
    "tools/gpu_check.py": (["--out", "{tmp}/out", "--budget", "0"], "--budget must be positive"),
    "tools/gpu_wheels.py": (["fetch", "--manifest", "{tmp}/nothing.json"], "{tmp}/nothing.json"),
    "tools/plan_layout.py": (["--load", "{tmp}/nothing", "--seq-length", "64"], "{tmp}/nothing"),
    "tools/posgen_benchmark.py": (["--preset", "smoke", "--out", "{tmp}/out", "--workers", "0"], "--workers"),
    "tools/posgen_generate.py": (
        ["--task", "recursive", "--split", "train", "--num-sequences", "0", "--length", "8", "--out", "{tmp}/x.jsonl"],
        "--num-sequences",
    ),
    "tools/prepare_data.py": (["--output-dir", "{tmp}/out", "--vocab-size", "10"], "--vocab-size"),
    "tools/preprocess_data.py": (
        ["--input", "{tmp}/nothing.jsonl", "--output-prefix", "{tmp}/out", "--tokenizer-model", "{tmp}/nothing.model"],
        "{tmp}/nothing",
    ),
    "tools/rope_report.py": (["--head-dim", "3"], "--head-dim"),
    "tools/run_demo.py": (["--out", "{tmp}/file/demo"], "{tmp}/file"),
    "tools/train_tokenizer.py": (
        ["--input", "{tmp}/nothing.jsonl", "--model-prefix", "{tmp}/spm"],
        "{tmp}/nothing.jsonl",
    ),
    "pretrain/pretrain_llama.py": (["--config", "{tmp}/nothing.yaml"], "{tmp}/nothing.yaml"),
    "finetune/extend_context.py": (["--load", "{tmp}/nothing", "--mock-data"], "{tmp}/nothing"),
}


def run_scripts(cases: dict) -> dict:
    """In this process, each ``script: argv`` of ``cases`` as ``python script argv`` would run it:
    ``script -> [exit status, stderr]``. The environment is restored after each."""
    results = {}
    for script, argv in cases.items():
        environ, sys_argv = dict(os.environ), sys.argv
        err = io.StringIO()
        sys.argv = [str(REPO / script), *argv]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                try:
                    runpy.run_path(str(REPO / script), run_name="__main__")
                    status = 0
                except SystemExit as e:
                    status = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = sys_argv
            os.environ.clear()
            os.environ.update(environ)
        results[script] = [status, err.getvalue()]
    return results


def entry_points() -> list:
    return sorted(str(p.relative_to(REPO)) for d in ENTRY_DIRS for p in (REPO / d).glob("*.py"))


def test_every_entry_point_has_a_bad_input():
    assert entry_points() == sorted(BAD_INPUT), "add the new script to BAD_INPUT"


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "file").write_text("a regular file\n")
    cases = {script: [a.replace("{tmp}", str(tmp)) for a in args] for script, (args, _) in BAD_INPUT.items()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE", cli.LAUNCHER_ENV):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(cases)], capture_output=True, text=True, cwd=REPO, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", sorted(BAD_INPUT))
def test_bad_input_is_one_error_line_and_exit_2(bad_input_runs, script):
    tmp, results = bad_input_runs
    status, err = results[script]
    prog = Path(script).name
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert BAD_INPUT[script][1].replace("{tmp}", str(tmp)) in lines[0], err


# ---------------------------------------------------------------------------------------------- the guard


def guarded(exc: BaseException, **kwargs):
    """(exit status or None, stderr) of ``raise exc`` inside the guard."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            with cli.guard("tool.py", **kwargs):
                raise exc
        except SystemExit as e:
            return e.code, err.getvalue()
    return None, err.getvalue()


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "TORCHELASTIC_ERROR_FILE", cli.LAUNCHER_ENV):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("cls", [UserError, ConfigError, DataError, CheckpointError, ConversionError])
def test_user_errors_are_one_line_and_exit_2(cls):
    assert guarded(cls("bad\n  input")) == (2, "tool.py: error: bad input\n")


def test_every_user_error_of_the_package_is_a_user_error():
    from megatron_resonance.evaluation.memory import DoesNotFit

    sys.path.insert(0, str(REPO / "tools"))
    import gpu_wheels

    assert issubclass(DoesNotFit, UserError) and issubclass(gpu_wheels.BundleError, UserError)
    assert guarded(DoesNotFit("length 9 does not fit", None, False)) == (2, "tool.py: error: length 9 does not fit\n")


def test_training_errors_are_one_line_and_exit_1():
    assert guarded(TrainingError("loss is nan at iteration 3")) == (1, "tool.py: error: loss is nan at iteration 3\n")


def test_a_bug_is_not_a_user_error():
    with pytest.raises(KeyError):
        guarded(KeyError("bug"))
    script = "from megatron_resonance import cli\nwith cli.guard('tool.py'):\n    {}['missing']\n"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'missing'" in proc.stderr
    assert "tool.py: error" not in proc.stderr


def test_ctrl_c():
    assert guarded(KeyboardInterrupt(), interrupted="interrupted; --save unchanged") == (
        130,
        "tool.py: interrupted; --save unchanged\n",
    )
    with pytest.raises(KeyboardInterrupt):
        guarded(KeyboardInterrupt())


def test_only_rank_0_prints_and_every_rank_exits(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert guarded(UserError("bad")) == (2, "")
    monkeypatch.setenv("RANK", "0")
    assert guarded(UserError("bad")) == (2, "tool.py: error: bad\n")


def test_torchruns_error_file_gets_the_line(monkeypatch, tmp_path):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert guarded(TrainingError("save failed")) == (1, "tool.py: error: save failed\n")
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == "tool.py: error: save failed" and message["extraInfo"]["exit_status"] == 1
    # the training launcher prints its failed worker's line itself
    monkeypatch.setenv(cli.LAUNCHER_ENV, "1")
    assert guarded(ConfigError("bad")) == (2, "")
    assert json.loads(error_file.read_text())["message"]["message"] == "tool.py: error: bad"


def test_one_line_of_a_foreign_exception():
    assert cli.one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert cli.one_line(OSError()) == "OSError"
    long = "A sentence. " * 20
    assert cli.one_line(RuntimeError(long)) == "RuntimeError: A sentence"

    class Failed(Exception):
        failures = {0: (EOFError("truncated"), "traceback ...")}

    assert cli.one_line(Failed("rank 0 failed\nTraceback ...")) == "EOFError: truncated"


if __name__ == "__main__":  # the worker of bad_input_runs
    sys.path.insert(0, str(REPO))
    print(json.dumps(run_scripts(json.loads(sys.argv[1]))))
