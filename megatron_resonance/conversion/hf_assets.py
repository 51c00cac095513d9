"""The Hugging Face files that travel with the weights: tokenizer, generation settings, source config.

The importer keeps them in ``<MEGATRON_DIR>/hf/`` (the source ``config.json`` verbatim, plus whichever of
``HF_FILES`` exist); the exporter copies them into the Hugging Face directory and takes the source config
as the reference for every non-architecture field (token ids, ...).
"""

from __future__ import annotations

import os
import shutil
from typing import List, Optional

ASSETS_DIR = "hf"
HF_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def copy_assets(source: str, destination: str, include_config: bool) -> List[str]:
    """Copy the tokenizer/generation files (and config.json) present in ``source``. Returns their names."""
    names = [n for n in HF_FILES + (("config.json",) if include_config else ()) if os.path.isfile(
        os.path.join(source, n))]
    if names:
        os.makedirs(destination, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(source, n), os.path.join(destination, n))
    return names


def default_reference(load: str, checkpoint: str) -> Optional[str]:
    """``<root>/hf`` kept by the importer, for ``--load`` given as the root or as an ``iter_*`` directory."""
    for root in (load, os.path.dirname(os.path.abspath(checkpoint))):
        candidate = os.path.join(root, ASSETS_DIR)
        if os.path.isdir(candidate):
            return candidate
    return None
