"""The package's error model: every failure a tool or entry point reports is one of these.

- :class:`UserError` and its subclasses: input the user can fix (a flag, a config, a data file, a checkpoint
  directory, a model to convert). Reported as one line ``<prog>: error: <message>``, exit status 2.
- :class:`TrainingError`: a run that had to stop (a non-finite loss, a failed save). One line, exit status 1.

Every tool and entry point runs inside :func:`megatron_resonance.cli.guard`, which reports them; any other
exception is a bug and keeps its traceback. Nothing here imports the rest of the package: every module
may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad user input: one line, exit status 2. The message is made one line here (its whitespace, line
    breaks included, becomes single spaces), so a foreign message quoted in it cannot break the rule."""

    exit_status = 2

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError, ValueError):
    """A configuration the run cannot start with."""


class DataError(UserError, ValueError):
    """A dataset that cannot be used: one line naming the file, the problem and the fix."""


class CheckpointError(UserError):
    """A checkpoint directory that cannot be used (missing, incomplete, incompatible)."""


class ConversionError(UserError):
    """Input the converters cannot use (wrong architecture, missing shard, shape mismatch, ...)."""


class TrainingError(Exception):
    """A run that must stop without saving (a non-finite loss, a failed save): one line, exit status 1."""

    exit_status = 1
