"""``pretrain_llama.py`` with Megatron-LM's document flags on real (indexed) data, 2 processes (DP=2): the
flags reach megatron's dataset (the run's ``[data]`` line: where positions restart in the first sample, its
EOD tokens out of the loss), the model trains and evaluates through the per-document attention and rotary,
the flags are stored with the checkpoint, and the losses differ from the same run without them (which
prints no such line). Two torchrun jobs, ~15 s each."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from tests.fake_data import write_dataset
from tests.training.conftest import PRETRAIN, TINY_MODEL, records, run, stored_config

EOD = 255  # the vocabulary's last id: the end-of-document id without --tokenizer-model
FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("documents")
    rng = np.random.default_rng(0)
    for name, count in (("train", 300), ("valid", 40)):  # documents of 3..24 tokens: several per sample
        docs = [[*rng.integers(0, EOD, int(n)).tolist(), EOD] for n in rng.integers(2, 24, count)]
        write_dataset(tmp / name, docs)
    common = [
        *TINY_MODEL, "--data-path", tmp / "train", "--valid-data-path", tmp / "valid", "--seq-length", 32,
        "--micro-batch-size", 2, "--global-batch-size", 8, "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", 1, "--log-interval", 1, "--eval-iters", 1, "--train-iters", 6,
    ]  # fmt: skip
    out = {}
    for name, flags in (("on", FLAGS), ("off", [])):
        save = tmp / name
        proc = run(PRETRAIN, *common, *flags, "--save", save)
        out[name] = {"save": save, "stdout": proc.stdout, "records": records(save)}
    return out


def test_first_sample_has_reset_positions(runs):
    lines = [line for line in runs["on"]["stdout"].splitlines() if line.startswith("[data] documents")]
    assert len(lines) == 1, runs["on"]["stdout"]
    line = lines[0]
    assert "--reset-position-ids --reset-attention-mask --eod-mask-loss; EOD id 255" in line
    lengths = [int(n) for n in re.search(r"lengths \[([\d, ]+)\]", line).group(1).split(",")]
    restarts = [int(n) for n in re.search(r"restart at \[([\d, ]+)\]", line).group(1).split(",")]
    assert sum(lengths) == 32 and len(lengths) >= 2
    # positions restart right after each EOD: at the start of every document but the first
    assert restarts == np.cumsum(lengths)[:-1].tolist()
    out_of_loss = int(re.search(r"(\d+) tokens out of the loss", line).group(1))
    assert out_of_loss in (len(lengths) - 1, len(lengths))  # the EODs (the last document may be cut)
    assert not any(line.startswith("[data] documents") for line in runs["off"]["stdout"].splitlines())


def test_trains_and_evaluates(runs):
    recs = runs["on"]["records"]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert any(math.isfinite(r.get("eval_loss", math.nan)) for r in recs)


def test_flags_are_stored_with_the_checkpoint(runs):
    data = stored_config(runs["on"]["save"] / "iter_0000006")["run"]["data"]
    assert (data["reset_position_ids"], data["reset_attention_mask"], data["eod_mask_loss"]) == (True, True, True)
    off = stored_config(runs["off"]["save"] / "iter_0000006")["run"]["data"]
    assert not any(off[k] for k in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"))


def test_flags_change_the_losses(runs):
    on, off = ([r["loss"] for r in runs[k]["records"] if "loss" in r] for k in ("on", "off"))
    assert abs(on[0] - off[0]) > 1e-4, (on, off)
