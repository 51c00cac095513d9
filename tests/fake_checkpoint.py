"""The files of a checkpoint that ``checkpoint_layout.verify_checkpoint`` checks, without weights: for tests whose
fake checkpoints stand in for real ones as far as configuration is concerned."""

from __future__ import annotations

import json
import pickle
from pathlib import Path


def add_dist_files(ckpt: Path) -> Path:
    """dist_checkpointing's ``metadata.json``, a torch DCP ``.metadata`` naming no shard, and ``common.pt``."""
    import torch
    from torch.distributed.checkpoint.metadata import Metadata

    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "common_backend": "torch"}))
    (ckpt / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, storage_data={})))
    torch.save({}, ckpt / "common.pt")
    return ckpt
