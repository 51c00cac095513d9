"""RULER's scoring of the synthetic tasks (``scripts/eval/evaluate.py`` and
``scripts/eval/synthetic/constants.py`` of NVIDIA/RULER, Apache-2.0; Hsieh et al. 2024).

A prediction is post-processed (stripped; every ASCII control character, ``\\x00``-``\\x1f``, newlines
and tabs included, becomes a newline; stripped again), then each expected value counts when it occurs in
the prediction, case-insensitively. ``string_match_all`` (every synthetic task of RULER but QA) is the share
of the expected values found; RULER's summary is its mean over samples, times 100.
"""

from __future__ import annotations

import re
from typing import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share (0..1) of ``references`` that occur in the post-processed ``prediction``, ignoring case."""
    if not references:
        raise ValueError("string_match_all: no references")
    text = postprocess_pred(prediction).lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any of ``references`` occurs in the post-processed ``prediction`` (RULER's QA metric)."""
    text = postprocess_pred(prediction).lower()
    return float(any(ref.lower() in text for ref in references))
