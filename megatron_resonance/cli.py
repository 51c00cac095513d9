"""Command-line conventions shared by every entry point: bad input is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from typing import Iterator, Tuple

from megatron_resonance.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):  # noqa: D401 - argparse API
        fail(f"{self.prog}: error: {message}")


def fail(line: str, status: int = 2):
    """Print one error line to stderr and exit."""
    print(line, file=sys.stderr)
    sys.exit(status)


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type's name when it has none)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def one_line(e: BaseException, limit: int = 400) -> str:
    """The whole message of ``e`` on one line (for errors whose detail is on later lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_output_dir(path, what: str, shown=None) -> None:
    """UserError ``<what> <shown>: <problem>`` (one line; ``what`` names the flag, ``shown`` the value,
    by default ``path``) unless ``path`` is a directory this process can write in, or one it could create:
    the nearest existing ancestor a writable directory. Checks only, writes nothing. Writability is
    ``os.access``: as root that sees read-only mounts and kernel file systems (``/proc/self``) but not
    permission bits, which root ignores anyway."""
    path, shown = str(path), str(path if shown is None else shown)
    if shown == path and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {shown}: exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # also a path under a file: exists() is False there
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{what} {shown}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {shown}: {existing} is not writable")


def jsonl_records(path, what: str = "") -> Iterator[Tuple[int, object]]:
    """``(line number, parsed JSON)`` for each non-blank line of the JSONL file ``path``; UserError naming
    the file and line (and for undecodable text the file's byte offset) for a line that is not UTF-8 JSON.
    ``what`` (e.g. ``"--data "``) goes before the path in the message."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # (a byte-order mark is fine)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{what}{path}:{number}: not UTF-8 text ({e.reason} at byte {start + e.start} of the file)"
                ) from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{what}{path}:{number}: not a JSON line ({e.msg})") from None
            yield number, record


#: notices megatron-core and torch print on import and load that would drown a tool's progress and error
#: lines: no Apex / Transformer Engine on this machine, torch deprecations raised through megatron
_LIBRARY_NOTICES = (".*(Apex|Transformer Engine).* not installed", ".*ShardedTensor.*", ".*non-leaf Tensor",
                    ".*is deprecated")


def _ignore_library_notices() -> None:
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for message in _LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message)


def quiet_library_warnings() -> None:
    """Hide the library notices for the rest of the process (a tool calls it first)."""
    _ignore_library_notices()


@contextlib.contextmanager
def library_warnings_quiet():
    """Hide the library notices inside a block (library code that builds or loads a megatron model)."""
    with warnings.catch_warnings():
        _ignore_library_notices()
        yield
