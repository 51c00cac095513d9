"""``tools/posgen_generate.py``: JSON-lines output and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_resonance.posgen import make_split, rule_satisfied
from tests.launch import child_env, load_tool

main = load_tool("posgen_generate").main

REPO = Path(__file__).resolve().parents[2]


def generate_args(out, **overrides) -> list[str]:
    opts = {
        "task": "cot",
        "split": "train",
        "num-sequences": "20",
        "length": "12",
        "seed": "3",
        "out": str(out),
    }
    opts.update({k.replace("_", "-"): str(v) for k, v in overrides.items()})
    return [x for k, v in opts.items() for x in (f"--{k}", v)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_writes_one_token_list_per_line(tmp_path, capsys):
    out = tmp_path / "cot.jsonl"
    assert main(generate_args(out)) == 0
    assert "wrote 20 cot sequences" in capsys.readouterr().out
    rows = read_jsonl(out)
    assert len(rows) == 20
    assert all(set(row) == {"tokens"} and len(row["tokens"]) == 12 for row in rows)
    assert all(isinstance(t, int) and 0 <= t <= 16 for row in rows for t in row["tokens"])
    tokens = torch.tensor([row["tokens"] for row in rows])
    assert rule_satisfied(tokens, "cot").all()
    # The file holds exactly the in-process split.
    assert torch.equal(tokens, make_split("cot", "train", 20, 12, seed=3))
    assert not [p for p in os.listdir(tmp_path) if p != "cot.jsonl"], "temporary file left behind"


def test_script_entry_point(tmp_path):
    out = tmp_path / "semi.jsonl"
    args = generate_args(out, task="semi_recursive", split="test", num_sequences=5, length=256)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "posgen_generate.py"), *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    tokens = torch.tensor([row["tokens"] for row in read_jsonl(out)])
    assert tokens.shape == (5, 256)
    assert rule_satisfied(tokens, "semi_recursive").all()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "data.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(SystemExit) as e:
        main(generate_args(out))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists (pass --overwrite" in err
    assert out.read_text() == "keep me\n"
    assert main(generate_args(out) + ["--overwrite"]) == 0
    assert len(read_jsonl(out)) == 20


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "fibonacci"}, "argument --task: invalid choice: 'fibonacci'"),
        ({"split": "dev"}, "argument --split: invalid choice: 'dev'"),
        ({"num_sequences": 0}, "--num-sequences must be positive, got 0"),
        ({"num_sequences": -3}, "--num-sequences must be positive, got -3"),
        ({"num_sequences": "ten"}, "argument --num-sequences: invalid int value: 'ten'"),
        ({"split": "test", "num_sequences": 8353}, "exceeds the 8352 distinct seed prefixes of split 'test'"),
        ({"length": 4}, "--length must be >= 5"),
        ({"seed": -1}, "--seed must be in [0, 2**64)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message):
    out = tmp_path / "x.jsonl"
    with pytest.raises(SystemExit) as e:
        main(generate_args(out, **overrides))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("posgen_generate.py: error:")
    assert message in err
    assert not out.exists()


def test_bad_paths_and_missing_arguments(tmp_path, capsys):
    for argv in (
        [],
        ["--shuffle"],
        generate_args(tmp_path),
        generate_args(tmp_path / "missing" / "x.jsonl"),
        generate_args(tmp_path / "x.jsonl")[:-2],  # no --out
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert capsys.readouterr().err.count("\n") == 1, argv
