"""``megatron_resonance.hf.writer`` (huggingface_hub's shard plan, safetensors files) and ``hf.reader``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_resonance.errors import ConversionError
from megatron_resonance.hf.reader import HFCheckpoint
from megatron_resonance.hf.writer import parse_size, plan_shards, write_sharded


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(33, generator=g),
        "c.weight": torch.randn(4, 4, 3, generator=g).half(),
        "d.weight": torch.randn(100, 10, generator=g),
    }


@pytest.mark.parametrize("max_shard", [10**9, 900])
def test_writer_output_is_read_by_safetensors(tmp_path, max_shard):
    data = tensors()
    specs = [(k, tuple(v.shape), v.dtype) for k, v in data.items()]
    files = write_sharded(str(tmp_path), specs, lambda k: data[k], max_shard)
    read = {}
    for f in files:
        if f.endswith(".safetensors"):
            read.update(load_file(tmp_path / f))
            with safe_open(tmp_path / f, "pt") as h:
                assert h.metadata() == {"format": "pt"}
            assert (tmp_path / f).read_bytes()[:8] != b"\0" * 8
    assert read.keys() == data.keys() and all(torch.equal(read[k], data[k]) for k in data)
    if max_shard == 900:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in data.values())
        assert set(index["weight_map"]) == set(data) and len(files) > 2
    else:
        assert files == ["model.safetensors"]


def test_plan_shards_and_sizes():
    specs = [(str(i), (10,), torch.float32) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in plan_shards(specs, 100).filename_to_tensors.values()] == [2, 2, 1]
    oversized = plan_shards(specs, 10)  # a shard each
    assert list(oversized.filename_to_tensors) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1024") == 1024
    with pytest.raises(ConversionError, match="unreadable size"):
        parse_size("lots")


def _write_model(tmp_path, data, index=True):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if index:
        save_file({"a.weight": data["a.weight"]}, tmp_path / "s1.safetensors")
        save_file({k: v for k, v in data.items() if k != "a.weight"}, tmp_path / "s2.safetensors")
        weight_map = {k: "s1.safetensors" if k == "a.weight" else "s2.safetensors" for k in data}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(data, tmp_path / "model.safetensors")


def test_reader_streams_sharded_safetensors(tmp_path):
    data = tensors()
    _write_model(tmp_path, data)
    hf = HFCheckpoint(str(tmp_path))
    assert set(hf.keys()) == set(data)
    assert hf.shape("d.weight") == (100, 10) and hf.dtype("a.weight") == torch.bfloat16
    assert hf.floating_dtype() == torch.float32
    assert all(torch.equal(hf.get(k), v) for k, v in data.items())


def test_reader_checks_the_index_against_the_shards(tmp_path):
    data = tensors()
    _write_model(tmp_path, data)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["b.weight"] = "s1.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="missing from their shard, e.g. b.weight"):
        HFCheckpoint(str(tmp_path))


def test_reader_reads_bin_with_weights_only(tmp_path):
    data = tensors()
    (tmp_path / "config.json").write_text("{}")
    torch.save(data, tmp_path / "pytorch_model.bin")
    hf = HFCheckpoint(str(tmp_path))
    assert hf.format == "bin" and all(torch.equal(hf.get(k), v) for k, v in data.items())
    # legacy (non-zip) serialization: no mmap, still weights_only
    torch.save(data, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    hf = HFCheckpoint(str(tmp_path))
    assert all(torch.equal(hf.get(k), v) for k, v in data.items())
