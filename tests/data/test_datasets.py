"""build_gpt_datasets under a 2-process gloo job: real indexed data (per-split and blend+split) and mock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_resonance.data.prepare import prepare_default_data
from tests.data.conftest import TINY_VOCAB, tool_main
from tests.launch import torchrun

WORKER = Path(__file__).with_name("datasets_worker.py")
SEQ = 64


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("default-data")
    data = prepare_default_data(d, vocab_size=TINY_VOCAB, max_train_bytes=120_000, max_valid_bytes=30_000, log=None)
    return d, data


def test_prepare_default_data_writes_and_then_reuses(default_data):
    d, data = default_data
    assert data.vocab_size == TINY_VOCAB and data.eod_id == 2
    assert data.train_tokens > data.valid_tokens > 0
    stamp = (d / "prepare.json").stat().st_mtime_ns
    lines = []
    again = prepare_default_data(
        d, vocab_size=TINY_VOCAB, max_train_bytes=120_000, max_valid_bytes=30_000, log=lines.append
    )
    assert again == data and lines == [f"reusing the prepared data in {d}"]
    assert (d / "prepare.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_build_gpt_datasets_under_gloo(default_data, tmp_path):
    d, data = default_data
    torchrun(WORKER, tmp_path, d, SEQ, nproc=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0] == reports[1]  # every rank sees the same samples
    report = reports[0]
    for mode in ("per_split", "blend_split", "mock"):
        for split, wanted in (("train", 40), ("valid", 8)):
            r = report[mode][split]
            assert r["length"] >= wanted, (mode, split)
            assert r["keys"] == ["labels", "loss_mask", "position_ids", "tokens"], (mode, split)
            assert r["shapes"] == [[SEQ]], (mode, split)
            assert r["dtypes"]["tokens"] == "torch.int64" and r["dtypes"]["loss_mask"] == "torch.float32"
            assert r["labels_are_shifted"] and r["positions_are_arange"], (mode, split)
            assert r["loss_mask_sum"] == [float(SEQ)] * 6, (mode, split)
            assert all(0 <= t < TINY_VOCAB for s in r["tokens"] for t in s), (mode, split)
    assert report["mock"]["type"] == "MockGPTDataset"
    assert report["per_split"]["train"]["tokens"] != report["per_split"]["valid"]["tokens"]
    # rank 0 cached the indices under a directory named by the .idx fingerprint
    cached = list((tmp_path / "cache").glob("*/*-GPTDataset-train-shuffle_index.npy"))
    assert len(cached) == 2  # per-split train, blend train


@pytest.mark.parametrize("where", ["file", "under a file", "unwritable"])
def test_prepare_data_output_dir_that_cannot_be_written(tmp_path, where):
    (tmp_path / "a_file").write_text("not a directory\n")
    out, message = {
        "file": (tmp_path / "a_file", f"output directory {tmp_path / 'a_file'}: exists and is not a directory"),
        "under a file": (
            tmp_path / "a_file" / "data",
            f"output directory {tmp_path / 'a_file' / 'data'}: {tmp_path / 'a_file'} is a file",
        ),
        "unwritable": ("/proc/self/data", "output directory /proc/self/data: /proc/self is not writable"),
    }[where]
    if where == "unwritable" and os.access("/proc/self", os.W_OK):
        pytest.skip("no directory here refuses writes to this user")
    status, err = tool_main("prepare_data.py", "--output-dir", out)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"prepare_data.py: error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
