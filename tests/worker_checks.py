"""Checks measured in a worker process and asserted in pytest.

A worker (a script under some ``tests/*/workers/``, run by torchrun) keeps each check's measurements as a
dict, or the traceback of the exception the check raised (:func:`run_check`), and writes them to a JSON file;
the tests read that file through :class:`CheckResults`, so one broken check fails the tests that read it
and no other.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest


def run_check(check, *args) -> dict:
    """``check(*args)``, or ``{"error": traceback}`` if it raised."""
    try:
        return check(*args)
    except Exception:
        return {"error": traceback.format_exc()}


class CheckResults:
    """A worker's records by check name; indexing a check that raised fails the test with its traceback."""

    def __init__(self, records: dict):
        self.records = records

    @classmethod
    def read(cls, path: Path) -> "CheckResults":
        return cls(json.loads(Path(path).read_text()))

    def __getitem__(self, name: str):
        found = self.records[name]
        if isinstance(found, dict) and "error" in found:
            pytest.fail(f"{name} raised in the worker:\n{found['error']}", pytrace=False)
        return found
