"""Haystack text and word lists of the RULER tasks.

* :class:`Haystack`: the running text of RULER's "essay" haystack (RULER: Paul Graham's essays). The
  default is prose taken from this interpreter's standard library: the docstrings (module, class,
  function) of its ``*.py`` files in path order (without the folders and modules that
  :mod:`megatron_resonance.data.corpus` leaves out), without their indented blocks and doctest lines (code
  examples), whitespace collapsed as RULER does with its essays. Nothing is downloaded, and the same
  Python build gives the same text. Files are parsed lazily, only as far as a requested length needs. A
  user's file (JSONL with a ``"text"`` key, or plain text) replaces it.
* ``NOISE``: RULER's "noise" haystack sentence (the passkey filler).
* :func:`key_words`, :func:`common_words`: the ``wonderwords`` lists RULER draws needle keys (adjective-noun)
  and common-words-extraction words from.

Follows NVIDIA/RULER (https://github.com/NVIDIA/RULER, Apache-2.0; Hsieh et al. 2024).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from megatron_resonance.data.corpus import EXCLUDED_DIRS, EXCLUDED_PREFIXES, stdlib_root
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.passkey import FILLER

# wonderwords is imported where its word lists are first needed: a missing install is one line then.

#: RULER's noise haystack: one unit is the whole five-sentence string
NOISE = FILLER.strip()

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: docstring lines that are code, not prose: indented blocks and doctest prompts
_CODE_LINE = re.compile(r"^(\s|>>>|\.\.\.)")


def split_sentences(text: str) -> List[str]:
    """Sentences of ``text`` (whitespace already collapsed): cut after ``.``, ``!`` or ``?`` and a space.
    RULER uses NLTK's Punkt here; this plain rule needs no model and cuts a few abbreviations too."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _docstring_prose(source: str) -> str:
    """The prose of every docstring in ``source``, in ``ast.walk`` order, code lines dropped."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    parts = []
    for node in ast.walk(tree):
        doc = ast.get_docstring(node) if isinstance(node, kinds) else None
        if doc:
            parts.extend(line for line in doc.splitlines() if line.strip() and not _CODE_LINE.match(line))
    return " ".join(parts)


def _stdlib_documents() -> Iterator[str]:
    root = stdlib_root()
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]  # never walk site-packages
        paths.extend(
            os.path.join(folder, name)
            for name in files
            if name.endswith(".py") and not name.startswith(EXCLUDED_PREFIXES)
        )
    for path in sorted(paths, key=lambda p: Path(p).relative_to(root).as_posix()):
        try:
            yield _docstring_prose(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue


def _file_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.suffix not in (".jsonl", ".json"):
            yield f.read()
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f'--haystack {path}: line {number} is not a JSON object with a "text" string') from None
            if not isinstance(text, str):
                raise UserError(f'--haystack {path}: line {number}: "text" is not a string')
            yield text


class Haystack:
    """Words of a running text, read from ``documents`` only as far as asked (:meth:`ensure`)."""

    def __init__(self, name: str, documents: Iterator[str]):
        self.name = name
        self._documents = documents
        self.words: List[str] = []
        self.exhausted = False

    def ensure(self, count: int) -> int:
        """Read documents until ``count`` words are known or the text ends; the number of words known."""
        while len(self.words) < count and not self.exhausted:
            document = next(self._documents, None)
            if document is None:
                self.exhausted = True
            else:
                self.words.extend(document.split())
        return len(self.words)

    def too_short(self, task: str, length: int, prompt_tokens: int) -> UserError:
        """The one-line error of a text that cannot fill ``length`` tokens: the prompt of ``task`` with all
        of it is ``prompt_tokens`` long."""
        return UserError(
            f"--haystack {self.name} holds {len(self.words)} words: the {task} prompt with all of them "
            f"is {prompt_tokens} tokens, short of the length {length}"
        )

    def __repr__(self) -> str:
        return f"Haystack({self.name!r})"


def load_haystack(path: Optional[str] = None) -> Haystack:
    """The essay haystack: a user's JSONL (``"text"`` of every line, in order) or plain text file, or, with
    ``path`` None, the standard library's docstrings (see the module docstring)."""
    if path is None:
        return Haystack(f"<standard-library docstrings of {stdlib_root()}>", _stdlib_documents())
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--haystack {path}: no such file")
    return Haystack(str(path), _file_documents(file))


@functools.lru_cache(maxsize=1)
def _wonderwords() -> Tuple[List[str], List[str], List[str]]:
    try:
        from wonderwords import random_word
    except ImportError:
        raise UserError("the RULER tasks need the wonderwords word lists: pip install wonderwords") from None
    lists = [random_word._get_words_from_text_file(f"{name}list.txt") for name in ("noun", "adjective", "verb")]
    return tuple(sorted(set(words)) for words in lists)


def key_words() -> Tuple[List[str], List[str]]:
    """Adjectives and nouns (sorted, distinct): a needle key is ``f"{adjective}-{noun}"``."""
    nouns, adjectives, _ = _wonderwords()
    return adjectives, nouns


@functools.lru_cache(maxsize=1)
def common_words() -> List[str]:
    """Nouns, adjectives and verbs, distinct and sorted: the words of common words extraction."""
    return sorted(set().union(*_wonderwords()))
