"""``checkpoint_layout.verify_checkpoint`` on a real checkpoint with one file damaged at a time: CheckpointError with
one line naming the file, before megatron reads anything; a bit-flipped weight, which only loading can see,
is the loader's non-finite error (through the export tool, one process).

The checkpoint comes from the real pretraining command (2 processes, 3 iterations), made once per module."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_resonance.errors import CheckpointError
from megatron_resonance.megatron import checkpoint_layout, checkpointing
from tests.training.conftest import PRETRAIN, REPO, TINY_RUN, env, run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("integrity") / "ckpt"
    run(PRETRAIN, *TINY_RUN, "--train-iters", 3, "--eval-interval", 0, "--save", save)
    return save / "iter_0000003"


@pytest.fixture
def copy(checkpoint, tmp_path) -> Path:
    target = tmp_path / "iter_0000003"
    shutil.copytree(checkpoint, target)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        checkpoint_layout.verify_checkpoint(str(ckpt))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_complete_checkpoint_passes(checkpoint):
    checkpoint_layout.verify_checkpoint(str(checkpoint))
    assert sorted(p.name for p in checkpoint.glob("*.distcp"))  # what the cases below damage exists


def test_truncated_shard(copy):
    shard = max(copy.glob("*.distcp"), key=lambda p: p.stat().st_size)
    truncate(shard)
    assert error(copy).startswith(f"{shard}: truncated (")


def test_missing_shard(copy):
    shard = sorted(copy.glob("*.distcp"))[-1]
    shard.unlink()
    assert error(copy) == f"{shard}: missing (named in {copy / '.metadata'})"


@pytest.mark.parametrize("keep", [0.5, 0.0])
@pytest.mark.parametrize("name", [".metadata", "common.pt", "megatron_resonance.json", "metadata.json"])
def test_truncated_file(copy, name, keep):
    truncate(copy / name, keep)
    assert error(copy).startswith(f"{copy / name}: unreadable (")


@pytest.mark.parametrize("name", ["megatron_resonance.json", "metadata.json"])
def test_invalid_json(copy, name):
    (copy / name).write_text('{"model": ')
    assert error(copy).startswith(f"{copy / name}: unreadable (JSONDecodeError: ")


@pytest.mark.parametrize("name", [".metadata", "common.pt", "megatron_resonance.json", "metadata.json"])
def test_missing_file(copy, name):
    (copy / name).unlink()
    assert error(copy) == f"{copy / name}: missing"


def test_load_reports_a_damaged_file_in_one_line(copy):
    """``load_checkpoint`` checks before megatron touches the files (no process group needed to fail)."""
    truncate(copy / ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable \(UnpicklingError"):
        checkpointing.load_checkpoint(str(copy), [torch.nn.Linear(2, 2)])


def test_newest_usable_checkpoint_skips_a_damaged_latest(checkpoint, tmp_path):
    root = tmp_path / "save"
    for iteration in (1, 2):
        shutil.copytree(checkpoint, checkpoint_layout.iteration_dir(str(root), iteration))
    (root / checkpoint_layout.TRACKER).write_text("2")
    newest = checkpoint_layout.iteration_dir(str(root), 2)
    assert checkpoint_layout.newest_usable_checkpoint(str(root)) == (newest, None)
    truncate(root / "iter_0000002" / "common.pt")
    ckpt, warning = checkpoint_layout.newest_usable_checkpoint(str(root))
    assert ckpt == checkpoint_layout.iteration_dir(str(root), 1)
    assert warning.startswith(f"[resume] {root}/iter_0000002 is unusable (common.pt: unreadable (")
    assert warning.endswith("); resuming from iter_0000001, the newest complete checkpoint")
    (root / "iter_0000001" / "megatron_resonance.json").unlink()
    with pytest.raises(CheckpointError, match="no earlier checkpoint in .* is complete"):
        checkpoint_layout.newest_usable_checkpoint(str(root))


def test_check_finite_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    checkpointing.check_finite([model], "ckpt")
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"^ckpt: parameter 1.bias holds non-finite values"):
        checkpointing.check_finite([model], "ckpt")
    with torch.no_grad():
        model[1].bias[0] = 3e36  # 0.02 with the exponent's top bit flipped
    with pytest.raises(CheckpointError, match=r"parameter 1.bias holds a value of magnitude 3e\+36"):
        checkpointing.check_finite([model], "ckpt")


def flip_exponent(ckpt: Path, fqn: str) -> None:
    """Set the exponent bits of the first float32 of tensor ``fqn`` in its shard (NaN or infinity): the bytes
    stay the same length, so nothing but the values can tell."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    index, info = next((i, s) for i, s in storage.items() if i.fqn == fqn)
    shard = ckpt / info.relative_path
    blob = bytearray(shard.read_bytes())
    item = bytes(blob[info.offset : info.offset + info.length])
    values = torch.load(io.BytesIO(item), weights_only=True)
    assert values.dtype == torch.float32
    at = info.offset + item.index(values.contiguous().numpy().tobytes()[:64])
    blob[at + 3] |= 0x7F  # little endian: sign and the exponent's top 7 bits, then its lowest bit
    blob[at + 2] |= 0x80
    shard.write_bytes(blob)


def test_bit_flipped_weight_is_a_non_finite_error(copy):
    flip_exponent(copy, "embedding.word_embeddings.weight")
    checkpoint_layout.verify_checkpoint(str(copy))  # sizes and metadata are intact
    proc = subprocess.run(
        [sys.executable, REPO / "tools" / "convert_megatron_to_hf.py", "--load", copy, "--save", copy.parent / "hf",
         "--no-progress"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"convert_megatron_to_hf.py: error: {copy}: parameter embedding.word_embeddings.weight holds non-finite "
        "values (a corrupted shard)"
    ]
