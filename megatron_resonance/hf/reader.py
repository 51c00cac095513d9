"""Streaming reader of a Hugging Face checkpoint directory: safetensors or PyTorch ``.bin``, sharded or not.

Nothing is loaded up front but the config and the tensor headers: safetensors files are opened with
``safetensors.safe_open`` (memory-mapped; a tensor is read when it is asked for); ``.bin`` files are
unpickled with ``weights_only=True`` (no arbitrary code) and memory-mapped when they are in the zip
format, so a tensor costs memory only while it is being converted. Every problem (missing file or shard,
unreadable file, refused pickle) is raised as a one-line ``ConversionError`` before any conversion work
starts.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from huggingface_hub import constants

from megatron_resonance.cli import one_line
from megatron_resonance.errors import ConversionError

# safetensors (the optional ``hf`` extra) is imported where a checkpoint's tensors are read.

SAFETENSORS_INDEX = constants.SAFETENSORS_INDEX_FILE
SAFETENSORS_SINGLE = constants.SAFETENSORS_SINGLE_FILE
BIN_SINGLE = constants.PYTORCH_WEIGHTS_NAME
BIN_INDEX = f"{BIN_SINGLE}.index.json"


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable {what} ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: unreadable {what} (not a JSON object)")
    return data


def _bin_error(path: str, e: BaseException) -> str:
    """One line out of torch.load's multi-paragraph errors."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    blocked = next((line for line in lines if "GLOBAL" in line), None)
    if blocked:
        return f"{path}: refused to unpickle with weights_only=True (it would run code): {blocked}"
    detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(e).__name__)
    return f"{path}: unreadable .bin file ({detail.split('. ')[0]})"


class HFCheckpoint:
    """A Hugging Face model directory: ``config.json`` plus weights, read one tensor at a time."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ConversionError(f"{path}: not a directory")
        self.path = path
        self.config = read_json(os.path.join(path, "config.json"), "config.json")
        self.format, self.weight_map = self._find_weights()
        self._files: Dict[str, object] = {}  # file name -> safe_open handle or loaded .bin dict
        self._bin_mmap: Dict[str, bool] = {}
        self._unread: Dict[str, set] = {}  # file name -> keys not read yet (once get() touched the file)
        self._headers: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        self._read_headers()

    # ------------------------------------------------------------------ discovery
    def _find_weights(self) -> Tuple[str, Dict[str, str]]:
        """(format, {tensor name: file}) from an index, or from a single file's own header."""
        for fmt, index, single in (
            ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
            ("bin", BIN_INDEX, BIN_SINGLE),
        ):
            index_path = os.path.join(self.path, index)
            if os.path.exists(index_path):
                data = read_json(index_path, "checkpoint index")
                weight_map = data.get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ConversionError(f"{index_path}: unreadable checkpoint index (no weight_map)")
                missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(self.path, f))})
                if missing:
                    raise ConversionError(
                        f"{self.path}: missing shard(s) named in {index}: {', '.join(missing[:4])}"
                        + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                    )
                return fmt, dict(weight_map)
            if os.path.isfile(os.path.join(self.path, single)):
                return fmt, {}  # filled from the file itself
        raise ConversionError(
            f"{self.path}: no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
        )

    @property
    def files(self) -> List[str]:
        if self.weight_map:
            return sorted(set(self.weight_map.values()))
        return [SAFETENSORS_SINGLE if self.format == "safetensors" else BIN_SINGLE]

    # ------------------------------------------------------------------ opening
    def _open(self, name: str):
        handle = self._files.get(name)
        if handle is not None:
            return handle
        path = os.path.join(self.path, name)
        if self.format == "safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(path, framework="pt", device="cpu")
            except Exception as e:  # SafetensorsError, OSError: truncated, garbage, unreadable
                raise ConversionError(f"{path}: unreadable safetensors file ({one_line(e)})") from None
        else:
            handle = self._load_bin(path)
            if not self._bin_mmap[name]:
                # a legacy (non-zip) .bin sits fully in memory: keep only one such file at a time
                for other in [k for k, v in self._bin_mmap.items() if not v and k != name]:
                    self._files.pop(other, None)
        self._files[name] = handle
        return handle

    def _load_bin(self, path: str) -> Dict[str, torch.Tensor]:
        name = os.path.basename(path)
        try:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self._bin_mmap[name] = True
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
                self._bin_mmap[name] = False
        except Exception as e:  # UnpicklingError (refused by weights_only), EOFError, zip errors, OSError
            raise ConversionError(_bin_error(path, e)) from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
        ):
            raise ConversionError(f"{path}: not a state dict of tensors")
        return data

    def _read_headers(self) -> None:
        """Names, shapes and dtypes of every tensor; the index is checked against the files."""
        indexed = dict(self.weight_map)
        for name in self.files:
            handle = self._open(name)
            if self.format == "safetensors":
                for key in handle.keys():
                    self._add_header(key, *_safetensors_header(handle, key, name), name)
            else:
                for key, t in handle.items():
                    self._add_header(key, tuple(t.shape), t.dtype, name)
        absent = sorted(k for k, f in indexed.items() if self.weight_map.get(k) != f)
        if absent:
            key = absent[0]
            raise ConversionError(
                f"{self.path}: {len(absent)} tensor(s) listed in the index are missing from their shard, "
                f"e.g. {key} (index: {indexed[key]})"
            )

    def _add_header(self, key: str, shape: Tuple[int, ...], dtype: torch.dtype, file: str) -> None:
        if key in self._headers and self.weight_map.get(key) != file:
            raise ConversionError(f"{self.path}: tensor {key} appears in two shards ({self.weight_map[key]}, {file})")
        self._headers[key] = (shape, dtype)
        self.weight_map[key] = file

    # ------------------------------------------------------------------ access
    def keys(self) -> Iterable[str]:
        return self._headers.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._headers[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._headers[key][1]

    def file(self, key: str) -> str:
        """The path of the file that holds ``key``."""
        return os.path.join(self.path, self.weight_map[key])

    def nbytes(self, key: str) -> int:
        shape, dtype = self._headers[key]
        return math.prod(shape) * dtype.itemsize

    def get(self, key: str) -> torch.Tensor:
        """The tensor: a copy-on-write, memory-mapped view of its file (safetensors, zip .bin; the mapping
        lives as long as a tensor from it does), or a tensor of a legacy .bin loaded whole. A file's handle
        is dropped once every tensor in it has been read."""
        name = self.weight_map[key]
        handle = self._open(name)
        try:
            tensor = handle.get_tensor(key) if self.format == "safetensors" else handle[key]
        except Exception as e:
            raise ConversionError(f"{self.file(key)}: cannot read {key} ({one_line(e)})") from None
        unread = self._unread.setdefault(name, {k for k, f in self.weight_map.items() if f == name})
        unread.discard(key)
        if not unread:
            self._files.pop(name, None)
        return tensor

    def floating_dtype(self) -> Optional[torch.dtype]:
        """The most common floating dtype among the tensors (the checkpoint's precision)."""
        counts: Dict[torch.dtype, int] = {}
        for key, (_, dtype) in self._headers.items():
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + self.nbytes(key)
        return max(counts, key=counts.get) if counts else None

    def close(self) -> None:
        self._files.clear()


def _safetensors_header(handle, key: str, file: str) -> Tuple[Tuple[int, ...], torch.dtype]:
    """(shape, torch dtype) of one tensor, as safetensors maps it, without reading its data: an empty slice
    (a 0-d tensor is read whole: a few bytes)."""
    sl = handle.get_slice(key)
    shape = tuple(sl.get_shape())
    try:
        probe = sl[:0] if shape else handle.get_tensor(key)
    except Exception:  # a dtype this torch has no type for
        raise ConversionError(f"{file}: unsupported tensor dtype {sl.get_dtype()}") from None
    return shape, probe.dtype
