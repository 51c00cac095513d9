"""Streaming safetensors writer: shards planned from shapes alone, each tensor written as it is produced.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape and
byte offsets, plus ``__metadata__``), then the raw little-endian tensor bytes back to back. Since every
shape and dtype is known before any tensor exists, the header is written first and each tensor is
streamed straight to disk: the exporter never holds more than the tensor it is writing (plus the model).
Shards and ``model.safetensors.index.json`` follow the Hugging Face naming.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from megatron_resonance.conversion.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}

TensorSpec = Tuple[str, Tuple[int, ...], torch.dtype]


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (also KB, MB, KiB, MiB, GiB or a plain number of bytes)."""
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ConversionError(f"unreadable size {text!r} (use e.g. 5GB, 500MB or a number of bytes)")
    return int(value * _UNITS[unit])


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> List[List[TensorSpec]]:
    """Consecutive groups of tensors, each at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        b = nbytes(spec[1], spec[2])
        if shards[-1] and size + b > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += b
    return shards


def _header(specs: Sequence[TensorSpec]) -> bytes:
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        end = offset + nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-(8 + len(data)) % 8)  # align the tensor data to 8 bytes, as safetensors does
    return struct.pack("<Q", len(data)) + data


def write_safetensors(path: str, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor]) -> int:
    """Write one safetensors file; ``produce(name)`` returns each tensor in turn. Returns bytes written."""
    if sys.byteorder != "little":
        raise ConversionError("writing safetensors needs a little-endian machine")
    written = 0
    with open(path, "wb") as f:
        f.write(_header(specs))
        for name, shape, dtype in specs:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ConversionError(
                    f"internal error: {name} produced as {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}"
                )
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(raw))
            written += raw.nbytes
    return written


def write_sharded(
    directory: str,
    specs: Sequence[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    max_shard_size: int,
    on_tensor: Callable[[int], None] = lambda n: None,
) -> List[str]:
    """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index. Returns the files written."""
    shards = plan_shards(specs, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    def produce_and_count(name):
        t = produce(name)
        on_tensor(t.numel() * t.element_size())
        return t

    for file, shard in zip(names, shards):
        write_safetensors(os.path.join(directory, file), shard, produce_and_count)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes(s[1], s[2]) for s in specs)},
            "weight_map": {s[0]: file for file, shard in zip(names, shards) for s in shard},
        }
        with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        names.append(SAFETENSORS_INDEX)
    return names
