"""Bad inputs: each is one error line on stderr, exit status 2, and ``--save`` left exactly as it was.

The tools validate everything they can before importing megatron, so most cases call the tools' ``main``
in this process; one runs the real command line in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conversion import tiny_models
from tests.launch import REPO

TOOLS = REPO / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"convert_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def good_source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_inputs") / "good"
    tiny_models.write_source("gqa", path)
    return path


class Evil:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit_config(path: Path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _shards(path: Path):
    return sorted(p for p in path.iterdir() if p.name.endswith(".safetensors"))


def make_case(case: str, src: Path, tmp: Path) -> Path:
    """A broken copy of the good source."""
    bad = tmp / "src"
    shutil.copytree(src, bad)
    if case == "non_llama_architecture":
        _edit_config(bad, architectures=["MistralForCausalLM"], model_type="mistral")
    elif case == "non_llama_model_type":
        _edit_config(bad, architectures=None, model_type="gpt2")
    elif case == "missing_shard":
        _shards(bad)[1].unlink()
    elif case == "shape_mismatch":
        _edit_config(bad, intermediate_size=128)
    elif case == "corrupt_safetensors":
        _shards(bad)[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" * 3)
    elif case == "truncated_safetensors":
        shard = _shards(bad)[0]
        shard.write_bytes(shard.read_bytes()[:200])
    elif case in ("unsafe_pickle", "corrupt_bin"):
        for p in bad.iterdir():
            if p.name.startswith("model"):
                p.unlink()
        data = {"model.embed_tokens.weight": torch.zeros(2)}
        if case == "unsafe_pickle":
            data["payload"] = Evil(tmp / "pwned")
            torch.save(data, bad / "pytorch_model.bin")
        else:
            (bad / "pytorch_model.bin").write_bytes(b"definitely not a pickle" * 8)
    elif case == "unsupported_rope_type":
        _edit_config(bad, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    elif case == "foreign_longrope":
        _edit_config(
            bad,
            rope_parameters={
                "rope_type": "longrope",
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        )
    elif case == "no_config":
        (bad / "config.json").unlink()
    elif case == "unreadable_config":
        (bad / "config.json").write_text("{ this is not json")
    elif case == "no_weights":
        for p in bad.iterdir():
            if p.name.startswith("model"):
                p.unlink()
    return bad


IMPORT_CASES = {
    "non_llama_architecture": "is not a LLaMA model",
    "non_llama_model_type": "model_type 'gpt2' is not a LLaMA model",
    "missing_shard": "missing shard(s) named in model.safetensors.index.json",
    "shape_mismatch": "shape mismatch for model.layers.0.mlp.gate_proj.weight: [96, 64] in the checkpoint, "
    "[128, 64] expected",
    "corrupt_safetensors": "unreadable safetensors file",
    "truncated_safetensors": "unreadable safetensors file",
    "unsafe_pickle": "refused to unpickle with weights_only=True",
    "corrupt_bin": "unreadable .bin file",
    "unsupported_rope_type": "unsupported Hugging Face rope type 'dynamic'",
    "foreign_longrope": "unsupported Hugging Face rope type 'longrope'",
    "no_config": "no config.json",
    "unreadable_config": "unreadable config.json",
    "no_weights": "no weights",
}


def snapshot(path: Path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def expect_failure(tool, argv, capsys, save: Path, match: str):
    """One stderr line containing ``match``, exit 2, ``save`` and its parent unchanged."""
    before, siblings = snapshot(save), sorted(os.listdir(save.parent))
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool.PROG}: error: "), err
    assert match in lines[0], lines[0]
    assert snapshot(save) == before and sorted(os.listdir(save.parent)) == siblings  # no staging leftovers
    return lines[0]


@pytest.fixture
def save(tmp_path) -> Path:
    """An existing --save with content: every failing command must leave it as it is (even with --overwrite)."""
    path = tmp_path / "out" / "save"
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("precious")
    return path


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_refuses(case, good_source, tmp_path, save, capsys):
    bad = make_case(case, good_source, tmp_path)
    tool = load_tool("hf_to_megatron")
    line = expect_failure(
        tool,
        ["--load", str(bad), "--save", str(save), "--overwrite", "--no-progress"],
        capsys,
        save,
        IMPORT_CASES[case],
    )
    print(line)
    if case == "unsafe_pickle":
        assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "is not empty (pass --overwrite to replace it)"),
        (["--overwrite", "--rope-factor", "4"], "--rope-factor needs --rope-kind"),
        (["--overwrite", "--rope-kind", "yarn", "--rope-factor", "0.5"], "factor must be"),
        (["--overwrite", "--rope-kind", "bogus"], "invalid choice: 'bogus'"),
        (["--overwrite", "--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_import_refuses_bad_options(extra, match, good_source, save, capsys):
    tool = load_tool("hf_to_megatron")
    expect_failure(tool, ["--load", str(good_source), "--save", str(save), *extra], capsys, save, match)


def test_import_refuses_save_inside_load(good_source, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(good_source, src)
    tool = load_tool("hf_to_megatron")
    expect_failure(tool, ["--load", str(src), "--save", str(src / "inside")], capsys, src, "overlaps the input")


def test_export_refuses(tmp_path, save, capsys):
    tool = load_tool("megatron_to_hf")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_failure(tool, ["--load", str(empty), "--save", str(save), "--overwrite"], capsys, save, "no checkpoint at")
    expect_failure(
        tool,
        ["--load", str(tmp_path / "nowhere"), "--save", str(save), "--overwrite"],
        capsys,
        save,
        "the path does not exist",
    )
    (empty / "latest_checkpointed_iteration.txt").write_text("3")
    expect_failure(
        tool, ["--load", str(empty), "--save", str(save), "--overwrite"], capsys, save, "missing or incomplete"
    )
    expect_failure(
        tool,
        ["--load", str(empty), "--save", str(save), "--max-shard-size", "lots", "--overwrite"],
        capsys,
        save,
        "unreadable size 'lots'",
    )
    expect_failure(
        tool,
        ["--load", str(empty), "--save", str(save), "--rope-format", "yaml"],
        capsys,
        save,
        "invalid choice: 'yaml'",
    )


def test_real_command_line(good_source, tmp_path, save):
    """The same through a real process: exit status 2, one line, and the pickle payload never ran."""
    bad = make_case("unsafe_pickle", good_source, tmp_path)
    before = snapshot(save)
    proc = subprocess.run(
        [sys.executable, TOOLS / "convert_hf_to_megatron.py", "--load", bad, "--save", save, "--overwrite"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to unpickle with weights_only=True" in lines[0], proc.stderr
    assert "posix.system" in lines[0]
    assert proc.stdout == "" and snapshot(save) == before and not (tmp_path / "pwned").exists()
