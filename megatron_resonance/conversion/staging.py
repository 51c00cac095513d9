"""Output directories that change only on success: write into a sibling temporary directory, then swap.

A non-empty ``--save`` is refused unless ``overwrite``; with it, the old contents are replaced only once
the new ones are complete and on disk (every file and directory fsynced before the swap, the parent after
it). Any failure leaves ``--save`` exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

from megatron_resonance.atomic import fsync
from megatron_resonance.errors import ConversionError


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


class StagedDirectory:
    """``path`` is where to write; ``commit()`` moves it to the destination, ``abort()`` discards it."""

    def __init__(self, destination: str, overwrite: bool, inputs: Sequence[str] = ()):
        self.destination = os.path.abspath(destination)
        for source in inputs:
            if _inside(self.destination, source) or _inside(source, self.destination):
                raise ConversionError(f"--save {destination} overlaps the input {source}")
        if os.path.exists(self.destination):
            if not os.path.isdir(self.destination):
                raise ConversionError(f"--save {destination} exists and is not a directory")
            if os.listdir(self.destination) and not overwrite:
                raise ConversionError(f"--save {destination} is not empty (pass --overwrite to replace it)")
        parent = os.path.dirname(self.destination)
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.destination)}.partial-", dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.path, 0o777 & ~umask)  # mkdtemp's 0700 would stick to the result
        except OSError as e:
            raise ConversionError(f"--save {destination}: cannot write there ({e.strerror or e})") from None

    def commit(self) -> None:
        for root, _, files in os.walk(self.path):
            for name in files:
                fsync(os.path.join(root, name))
            fsync(root)
        old = None
        if os.path.exists(self.destination):
            old = tempfile.mkdtemp(
                prefix=f".{os.path.basename(self.destination)}.old-", dir=os.path.dirname(self.destination)
            )
            os.rmdir(old)
            os.rename(self.destination, old)
        os.rename(self.path, self.destination)
        fsync(os.path.dirname(self.destination))
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
