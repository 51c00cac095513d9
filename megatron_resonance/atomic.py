"""Writing files so that a reader sees the old file or the whole new one, never a torn one.

Every write goes to a temporary file in the destination's directory and is moved into place with
``os.replace`` (atomic on POSIX file systems) after an ``fsync``; a failed write removes the temporary
file and leaves the destination as it was. Directories are created as needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def replacing(path: str, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """``with replacing(path) as f: f.write(...)``: ``path`` gets the contents written only if the block
    finishes. The file gets the permissions a plain ``open`` would give it (``mkstemp``'s are 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with replacing(path, encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj: Any, indent: int = 1) -> None:
    """``obj`` as JSON (NaN refused: the result must be valid JSON), with a final newline."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def fsync(path: str) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
