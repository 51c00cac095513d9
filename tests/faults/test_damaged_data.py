"""Data as clusters really hold it: damaged, mismatched or too small for its split. Each is one line
``pretrain_llama.py: error: <the file, the problem, the fix>``, exit status 2, from the launcher's validation
before any worker starts, and nothing under ``--save``.

Without these checks megatron-core hangs or crashes: a split part with no documents (20 documents split
98/2, or one long document) makes ``GPTDataset``'s epoch count loop forever at 100 % CPU after ``[build]``;
a truncated or empty ``.idx`` or a halved ``.bin`` is a traceback per rank; a ``.bin`` 100 bytes short is
read past its end mid-run, at the same iteration on every rerun; ids beyond the vocabulary are a long
``IndexError`` in the embedding. Cases run ``launch.main`` in this process with the torchrun start recorded
(see ``tests/training/test_bad_input.py``); the hang and a good dataset run the real command.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from megatron_resonance.data import checks
from tests.fake_data import documents, write_dataset
from tests.training.conftest import PRETRAIN, TINY_RUN, command, records, run
from tests.training.test_bad_input import assert_one_error_line, launch_in_process

ARGS = [*TINY_RUN, "--train-iters", "4", "--no-mock-data"]  # vocabulary 256, --seq-length 32, eval 2 batches


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


#: name: what is done to a copy of the good dataset's files
DAMAGES = {
    "idx_truncated": lambda p: _cut(p.with_suffix(".idx"), p.with_suffix(".idx").stat().st_size // 2),
    "idx_empty": lambda p: _cut(p.with_suffix(".idx"), 0),
    "idx_foreign": lambda p: p.with_suffix(".idx").write_bytes(b"not an index, but long enough for a header\n"),
    "bin_half": lambda p: _cut(p.with_suffix(".bin"), p.with_suffix(".bin").stat().st_size // 2),
    "bin_short": lambda p: _cut(p.with_suffix(".bin"), p.with_suffix(".bin").stat().st_size - 100),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("damaged_data")
    good = write_dataset(tmp / "good", documents(200, 40))
    write_dataset(tmp / "twenty", documents(20, 40))
    write_dataset(tmp / "one_long", documents(1, 20_000))
    write_dataset(tmp / "other_tokenizer", [[5, 1000, 7], *documents(50, 40)])  # an id of a larger vocabulary
    for name, damage in DAMAGES.items():
        for ext in (".bin", ".idx"):
            shutil.copyfile(good.with_suffix(ext), tmp / f"{name}{ext}")
        damage(tmp / name)
    return tmp


FIX_VALID = "give more documents, --valid-data-path PREFIX, or another --split"
FIX_DATA = "preprocess the data again (tools/preprocess_data.py) or copy it again"

# name: (arguments after ARGS, the message; "{d}" is the data directory)
CASES = {
    "20 documents, no --valid-data-path": (
        ["--data-path", "{d}/twenty"],
        f"dataset {{d}}/twenty: the validation part of --split 98,2,0 gets 0 of its 20 documents (0 tokens); "
        f"{FIX_VALID}",
    ),
    "one long document": (
        ["--data-path", "{d}/one_long"],
        f"dataset {{d}}/one_long: the validation part of --split 98,2,0 gets 0 of its 1 documents (0 tokens); "
        f"{FIX_VALID}",
    ),
    "no train documents": (
        ["--data-path", "{d}/twenty", "--split", "1,99"],
        "dataset {d}/twenty: the train part of --split 1,99 gets 0 of its 20 documents (0 tokens); give more "
        "documents, or another --split",
    ),
    "a split without validation": (
        ["--data-path", "{d}/good", "--split", "100,0,0"],
        "--split 100,0,0 leaves no validation part of --data-path; give it a validation weight (e.g. 98,2,0), "
        "--valid-data-path PREFIX, or --eval-iters 0",
    ),
    "a split that is not one": (
        ["--data-path", "{d}/good", "--split", "98/2"],
        "--split '98/2': expected 1 to 3 comma-separated weights (train, validation, test), e.g. 98,2,0",
    ),
    "a split without train weight": (["--data-path", "{d}/good", "--split", "0,1"], "the train weight must be above 0"),
    ".idx truncated": (
        ["--data-path", "{d}/idx_truncated"],
        "dataset {d}/idx_truncated: {d}/idx_truncated.idx is cut short: 2021 bytes, its header's 200 sequences "
        f"and 201 document indices need 4042; {FIX_DATA}",
    ),
    ".idx empty": (
        ["--data-path", "{d}/idx_empty"],
        f"dataset {{d}}/idx_empty: {{d}}/idx_empty.idx is empty; {FIX_DATA}",
    ),
    ".idx of something else": (
        ["--data-path", "{d}/idx_foreign"],
        "dataset {d}/idx_foreign: {d}/idx_foreign.idx is not a Megatron indexed-dataset index (header b'not an in')",
    ),
    ".bin cut in half": (
        ["--data-path", "{d}/bin_half"],
        f"dataset {{d}}/bin_half: {{d}}/bin_half.bin is cut short: 8000 bytes, its index {{d}}/bin_half.idx "
        f"describes 16000; {FIX_DATA}",
    ),
    ".bin 100 bytes short": (
        ["--data-path", "{d}/bin_short"],
        f"dataset {{d}}/bin_short: {{d}}/bin_short.bin is cut short: 15900 bytes, its index {{d}}/bin_short.idx "
        f"describes 16000; {FIX_DATA}",
    ),
    "ids beyond the vocabulary": (
        ["--data-path", "{d}/other_tokenizer"],
        "dataset {d}/other_tokenizer: {d}/other_tokenizer.bin holds token id 1000 outside the model's vocabulary "
        "(size 256): data preprocessed with another tokenizer? Preprocess it with this run's --tokenizer-model",
    ),
    "a damaged --valid-data-path": (
        ["--data-path", "{d}/good", "--valid-data-path", "{d}/bin_short"],
        "{d}/bin_short.bin is cut short",
    ),
    "a blend with a damaged prefix": (
        ["--data-path", "0.7 {d}/good 0.3 {d}/bin_half"],
        "{d}/bin_half.bin is cut short",
    ),
    "a blend with an id beyond the vocabulary": (
        ["--data-path", "{d}/good {d}/other_tokenizer"],
        "{d}/other_tokenizer.bin holds token id 1000",
    ),
}

#: data that trains: what each fix in the messages above does
GOOD = {
    "default split": ["--data-path", "{d}/good"],
    "20 documents with --valid-data-path": ["--data-path", "{d}/twenty", "--valid-data-path", "{d}/good"],
    "20 documents, another --split": ["--data-path", "{d}/twenty", "--split", "80,20"],
    "20 documents, no evaluation": ["--data-path", "{d}/twenty", "--eval-iters", "0"],
    "a blend": ["--data-path", "{d}/good {d}/twenty"],
}


def _fill(items, data: Path):
    return [s.replace("{d}", str(data)) for s in items] if isinstance(items, list) else items.replace("{d}", str(data))


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_line(monkeypatch, data, case):
    args, message = CASES[case]
    save = data / "save"
    proc = launch_in_process(monkeypatch, PRETRAIN, [*ARGS, "--save", str(save), *_fill(args, data)])
    assert_one_error_line(proc, "pretrain_llama.py", _fill(message, data))
    assert proc.launched == []
    assert not save.exists()


@pytest.mark.parametrize("case", GOOD)
def test_good_data_reaches_the_launch(monkeypatch, data, case):
    proc = launch_in_process(monkeypatch, PRETRAIN, [*ARGS, *_fill(GOOD[case], data)])
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.launched) == 1


def test_twenty_documents_stop_at_once_not_hang(data):
    """The issue's command as a user types it: the launcher refuses it within seconds (before the checks,
    torchrun's workers spun at 100 % CPU after ``[build]`` until killed)."""
    import subprocess

    from tests.launch import REPO, child_env

    save = data / "save_cmd"
    cmd = command(PRETRAIN, *ARGS, "--data-path", data / "twenty", "--save", save)
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=90)
    assert_one_error_line(proc, "pretrain_llama.py", "the validation part of --split 98,2,0 gets 0 of its 20")
    assert not save.exists()


def test_a_good_dataset_trains_and_evaluates(data, tmp_path):
    """Real data split 98/2 (one process, no torchrun): trains, evaluates on the validation part."""
    save = tmp_path / "ckpt"
    run(PRETRAIN, *ARGS, "--data-path", data / "good", "--save", save, "--eval-interval", "0", nproc=0)
    assert [r["iteration"] for r in records(save) if "loss" in r] == [1, 2, 3, 4]
    assert [r["iteration"] for r in records(save) if "eval_loss" in r] == [4]


def test_token_range_scan_is_cached_and_says_so_when_large(monkeypatch, data):
    """The scan's result is kept by path, size and mtime beside the index cache; a large scan says so first
    (here every scan is "large")."""
    monkeypatch.setattr(checks, "SCAN_NOTICE_BYTES", 0)
    prefix = str(data / "twenty")
    lines = []
    assert checks.token_range(checks.read_index(prefix), str(data / "cache"), lines.append) == (0, 255)
    assert lines[0] == f"[data] checking the token ids of {prefix}.bin (0.0 GB)"
    cached = json.loads((data / "cache" / checks.TOKEN_RANGE_FILE).read_text())[prefix + ".bin"]
    assert (cached["min"], cached["max"], cached["size"]) == (0, 255, 1600)
    lines.clear()
    assert checks.token_range(checks.read_index(prefix), str(data / "cache"), lines.append) == (0, 255)
    assert lines == []  # from the cache
    os.utime(prefix + ".bin", ns=(0, 0))  # another file under the same name: scanned again
    checks.token_range(checks.read_index(prefix), str(data / "cache"), lines.append)
    assert len(lines) == 2


def test_token_range_without_a_writable_cache(data):
    """Read-only data (no cache can be written): the scan still runs, it is just not kept."""
    index = checks.read_index(str(data / "good"))
    assert checks.token_range(index, "/proc/self/token-cache", lambda line: None) == (0, 255)
