"""Command-line conventions shared by every entry point: each runs inside :func:`guard`, so bad input is one
line ``<prog>: error: <message>`` on stderr and exit status 2 (see :mod:`megatron_resonance.errors`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from typing import Iterator, NoReturn, Optional, Tuple

from megatron_resonance.errors import TrainingError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):  # noqa: D401 - argparse API
        fail(f"{self.prog}: error: {message}")


def fail(line: str, status: int = 2):
    """Print one error line to stderr and exit."""
    print(line, file=sys.stderr)
    sys.exit(status)


#: set by the training launcher (``training/launch.py``) for its workers: it prints their error line itself
LAUNCHER_ENV = "MEGATRON_RESONANCE_LAUNCHER"


def is_rank0() -> bool:
    """Rank 0 of the process group, or before there is one, of the launch (torchrun's or srun's rank).
    Reads torch.distributed only where the process already imported it: the tools without torch stay light."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def report(line: str, status: int) -> NoReturn:
    """Print ``line`` (rank 0 of the launch only) and exit ``status`` (every rank). Under torchrun also write it
    to this worker's error file, so torchrun's failure report shows it; under the training launcher, which
    prints the failed worker's line after torchrun's log, the worker leaves printing to it."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                info = {"py_callstack": line, "timestamp": str(int(time.time())), "exit_status": status}
                json.dump({"message": {"message": line, "extraInfo": info}}, f)
        except OSError:
            error_file = None
    if is_rank0() and not (error_file and os.environ.get(LAUNCHER_ENV)):
        fail(line, status)
    sys.exit(status)


@contextlib.contextmanager
def guard(prog: str, interrupted: Optional[str] = None) -> Iterator[None]:
    """The body of every tool and entry point: a :class:`UserError` ends it as one line ``<prog>: error:
    <message>`` and exit status 2, a :class:`TrainingError` the same with status 1 (see :func:`report`);
    with ``interrupted``, Ctrl-C ends it as ``<prog>: <interrupted>`` and status 130. Any other exception
    is a bug and passes with its traceback."""
    try:
        yield
    except (UserError, TrainingError) as e:
        report(f"{prog}: error: {e}", e.exit_status)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        report(f"{prog}: {interrupted}", 130)


def one_line(e: BaseException, limit: int = 400) -> str:
    """A foreign exception (a library's, the OS's) as one line inside a user error's message:
    ``<type>: <first line of its message>``, its type alone when it has no message. torch DCP's
    CheckpointException (each rank's failure with its traceback) by its first rank's cause; megatron's
    CheckpointingException whole (the keys it names are on the lines after the first), up to ``limit``
    characters; a first line of several sentences (torch.load's zip errors) by its first."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        cause = first[0] if isinstance(first, tuple) and first else first
        if isinstance(cause, BaseException):
            return one_line(cause, limit)
    megatron = sys.modules.get("megatron.core.dist_checkpointing.core")
    if megatron is not None and isinstance(e, megatron.CheckpointingException):
        text = " ".join(str(e).split())
        line = text if len(text) <= limit else text[: limit - 3] + "..."
    else:
        text = str(e).strip()
        line = text.splitlines()[0] if text else ""
        if len(line) > 160 and ". " in line:
            line = line.split(". ")[0]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


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
_LIBRARY_NOTICES = (
    ".*(Apex|Transformer Engine).* not installed",
    ".*ShardedTensor.*",
    ".*non-leaf Tensor",
    ".*is deprecated",
)


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
