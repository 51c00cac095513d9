"""Command-line conventions shared by every entry point: bad input is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """Bad user input. Entry points print ``<prog>: error: <message>`` and exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):  # noqa: D401 - argparse API
        fail(f"{self.prog}: error: {message}")


def fail(line: str, status: int = 2):
    """Print one error line to stderr and exit."""
    print(line, file=sys.stderr)
    sys.exit(status)
