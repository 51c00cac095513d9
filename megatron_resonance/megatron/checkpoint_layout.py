"""A checkpoint directory: its layout (Megatron-LM compatible), finding the checkpoint to load, reading its
configs and verifying its files without reading tensors.

Layout::

    <dir>/latest_checkpointed_iteration.txt     the iteration number, written last, atomically
    <dir>/iter_0000010/                          dist_checkpointing directory (any TP/PP loads it)
    <dir>/iter_0000010/megatron_resonance.json   model config (with rope plan) and run config
    <dir>/.megatron_resonance.lock               who holds the directory (megatron/save_lock.py)

megatron drops the rotary ``inv_freq`` from state dicts, so the rope plan travels in
``megatron_resonance.json`` (and in the common state dict). Saving and loading: megatron/checkpointing.py.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from megatron_resonance.cli import one_line
from megatron_resonance.errors import CheckpointError
from megatron_resonance.megatron import compat
from megatron_resonance.megatron.llama import LlamaConfig

# torch.distributed.checkpoint (about a second to import) is imported where a checkpoint's metadata is read.

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "megatron_resonance.json"
LOCK_FILE = ".megatron_resonance.lock"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration in the tracker, or None when ``root`` holds no complete checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable tracker {text!r}") from e


def resolve_checkpoint(path: str) -> str:
    """A directory that is itself a checkpoint (``iter_*``), or the one a root's tracker names."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    iteration = read_latest_iteration(path)
    if iteration is None:
        raise CheckpointError(f"no checkpoint at {path}: no {TRACKER} and no {CONFIG_FILE}")
    ckpt = iteration_dir(path, iteration)
    if not os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
        raise CheckpointError(f"checkpoint {ckpt} named by {TRACKER} is missing or incomplete")
    return ckpt


def read_config(path: str) -> Dict[str, Any]:
    """The stored ``megatron_resonance.json`` of a checkpoint (or of the latest under a root);
    CheckpointError with one line when it does not parse."""
    return _read_json(os.path.join(resolve_checkpoint(path), CONFIG_FILE), require="model")


def read_model_config(path: str) -> LlamaConfig:
    return LlamaConfig.from_dict(read_config(path)["model"])


def _read_json(path: str, require: Optional[str] = None) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({one_line(e)})") from None
    if not isinstance(data, dict) or (require and not isinstance(data.get(require), dict)):
        raise CheckpointError(f"{path}: not a checkpoint's {os.path.basename(path)} (no {require or 'object'})")
    return data


def verify_checkpoint(ckpt_dir: str) -> None:
    """Check what can be checked of the checkpoint directory ``ckpt_dir`` (an ``iter_*``) without reading
    its tensors: CheckpointError with one line naming the file and the problem.

    ``megatron_resonance.json`` and dist_checkpointing's ``metadata.json`` parse; torch DCP's ``.metadata``
    loads; every shard file it names exists and is at least as long as the last byte it refers to (a
    truncated or missing ``.distcp``); ``common.pt`` loads (as megatron loads it) unless the common state is
    in the shards (:func:`compat.common_state_in_shards`). Corrupted bytes inside a
    shard are not seen here; :func:`load_checkpoint` checks the loaded weights for that."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no checkpoint directory")
    _read_json(os.path.join(ckpt_dir, CONFIG_FILE), require="model")
    _read_json(os.path.join(ckpt_dir, "metadata.json"), require=None)
    metadata_path = os.path.join(ckpt_dir, ".metadata")
    if not os.path.isfile(metadata_path):
        raise CheckpointError(f"{metadata_path}: missing")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(ckpt_dir).read_metadata()
        storage = dict(metadata.storage_data or {})
    except Exception as e:  # noqa: BLE001 - pickle, EOF, zip errors of a truncated or damaged file
        raise CheckpointError(f"{metadata_path}: unreadable ({one_line(e)})") from None
    needed: Dict[str, int] = {}
    for info in storage.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = os.path.join(ckpt_dir, name)
        if not os.path.isfile(shard):
            raise CheckpointError(f"{shard}: missing (named in {metadata_path})")
        size = os.path.getsize(shard)
        if size < end:
            raise CheckpointError(f"{shard}: truncated ({size} bytes; .metadata refers to byte {end})")
    common = os.path.join(ckpt_dir, "common.pt")
    if not os.path.isfile(common) and compat.common_state_in_shards(metadata):
        return
    if not os.path.isfile(common):
        raise CheckpointError(f"{common}: missing")
    try:
        torch.load(common, map_location="cpu", weights_only=True)  # what megatron's common strategy does
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{common}: unreadable ({one_line(e)})") from None


def iterations_in(root: str) -> List[int]:
    """The iterations of the ``iter_*`` directories in ``root``, newest first (complete or not)."""
    found = []
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        if entry.startswith("iter_") and entry[5:].isdigit() and os.path.isdir(os.path.join(root, entry)):
            found.append(int(entry[5:]))
    return sorted(found, reverse=True)


def newest_usable_checkpoint(root: str) -> tuple:
    """For a run resuming from its own ``--save`` root: ``(checkpoint, warning)``, the checkpoint the tracker
    names when it passes :func:`verify_checkpoint`, else the newest earlier ``iter_*`` that does, with a
    one-line warning naming what was skipped. A root with ``iter_*`` directories but no tracker (a partial
    copy, a cleanup script) resumes from its newest complete one, with a warning. ``(None, None)`` for a
    root that holds no ``iter_*`` at all; CheckpointError when it holds some but none is usable, or when the
    tracker is not a file: a run never starts over on top of checkpoints."""
    tracker = os.path.join(root, TRACKER)
    if os.path.lexists(tracker) and not os.path.isfile(tracker):
        raise CheckpointError(
            f"{tracker} is not a file (Megatron's tracker of the latest iteration): remove or rename it, "
            f"and the run resumes from the newest complete iter_* in {root}"
        )
    latest = read_latest_iteration(root)
    found = iterations_in(root)
    if latest is None:
        if not found:
            return None, None
        named, reason, candidates = None, f"no {TRACKER}", found
    else:
        named = iteration_dir(root, latest)
        try:
            verify_checkpoint(named)
            return named, None
        except CheckpointError as e:
            reason = str(e)
            if reason.startswith(named + os.sep):
                reason = reason[len(named) + 1 :]
        candidates = [i for i in found if i < latest]
    for iteration in candidates:
        try:
            verify_checkpoint(iteration_dir(root, iteration))
        except CheckpointError:
            continue
        skipped = f"{named} is unusable ({reason})" if named else f"{root} has {reason}"
        return iteration_dir(root, iteration), (
            f"[resume] {skipped}; resuming from iter_{iteration:07d}, the newest complete checkpoint"
        )
    if named is None:
        raise CheckpointError(
            f"{root} holds iter_* directories but no {TRACKER} and none of them is a complete checkpoint: "
            "give another --save, or move them away to start over"
        )
    raise CheckpointError(f"{named} is unusable ({reason}) and no earlier checkpoint in {root} is complete")
