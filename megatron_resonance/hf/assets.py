"""The Hugging Face files that travel with the weights: tokenizer, generation settings, source config.

The importer keeps them in ``<MEGATRON_DIR>/hf/`` (the source ``config.json`` verbatim, plus whichever of
``HF_FILES`` exist); the exporter copies them into the Hugging Face directory and takes the source config
as the reference for every non-architecture field (token ids, ...). Training from such a checkpoint
(``--load``, e.g. context extension) carries ``hf/`` on into its ``--save`` (:func:`carry_assets`), so the
extended checkpoint is evaluated with the source's tokenizer and exported with its token ids and files.
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
    names = [
        n for n in HF_FILES + (("config.json",) if include_config else ()) if os.path.isfile(os.path.join(source, n))
    ]
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


def carry_assets(load: str, checkpoint: str, save: str) -> Optional[str]:
    """Copy the ``hf/`` kept beside ``load`` (``checkpoint``: its ``iter_*`` directory) to ``<save>/hf`` unless
    ``save`` has one already. Returns the new directory, or None when nothing was copied."""
    source = default_reference(load, checkpoint)
    destination = os.path.join(save, ASSETS_DIR)
    if source is None or os.path.exists(destination) or os.path.abspath(source) == os.path.abspath(destination):
        return None
    tmp = f"{destination}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    copy_assets(source, tmp, include_config=True)
    if not os.path.isdir(tmp):
        return None
    os.replace(tmp, destination)
    return destination
