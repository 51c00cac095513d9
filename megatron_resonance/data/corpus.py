"""The embedded default corpus: this machine's Python standard-library source, as JSONL.

Nothing is downloaded. The documents are the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``:
real, long, naturally structured text (a median file is several thousand tokens), which is what a
context-extension demo needs. Third-party packages (``site-packages``), the test suites, the generated
codec tables (``encodings``) and the build-specific ``_sysconfigdata*`` module are left out.

Everything is a pure function of the relative path and the file bytes, so two runs on the same Python
build produce byte-identical files:

* **split by file**: a file is in the validation split when a SHA-256 bucket of its relative path falls
  below ``valid_fraction``; a document never straddles the two splits, and adding or removing other
  files never moves a file from one split to the other;
* **order**: files are visited in the order of a second, independent hash of the path (a fixed shuffle
  that mixes packages instead of walking the tree alphabetically);
* **size cap**: each split is filled greedily in that order, skipping a file that would overflow its
  byte budget, so a small demo corpus still samples the whole library.

Each JSONL line is ``{"text": <file contents>, "path": <relative path>}``; ``manifest.json`` next to
them records the Python version, the caps and every file with its split and size.

    python tools/build_corpus.py --output-dir data/stdlib --max-train-bytes 4000000
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_resonance import atomic
from megatron_resonance.cli import check_output_dir
from megatron_resonance.errors import ConfigError, DataError

DEFAULT_VALID_FRACTION = 0.05
DEFAULT_MAX_TRAIN_BYTES = 4_000_000
DEFAULT_MAX_VALID_BYTES = 400_000
DEFAULT_MIN_BYTES = 2_048
#: directory names (anywhere in the relative path) whose files are not part of the corpus
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})
EXCLUDED_PREFIXES = ("_sysconfigdata",)
_BUCKETS = 1_000_000


def stdlib_root() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _digest(relpath: str) -> bytes:
    return hashlib.sha256(relpath.encode("utf-8")).digest()


def is_validation(relpath: str, valid_fraction: float = DEFAULT_VALID_FRACTION) -> bool:
    """Whether the file at ``relpath`` (POSIX, relative to the library root) belongs to validation."""
    bucket = int.from_bytes(_digest(relpath)[:8], "big") % _BUCKETS
    return bucket < round(valid_fraction * _BUCKETS)


def _order_key(relpath: str) -> bytes:
    # bytes 8..16 of the digest: independent of the split bucket (bytes 0..8)
    return _digest(relpath)[8:16] + relpath.encode("utf-8")


@dataclass(frozen=True)
class SourceFile:
    """One candidate document: path relative to the library root (POSIX) and its size in bytes."""

    relpath: str
    num_bytes: int


def list_stdlib_sources(root: Optional[Path] = None, min_bytes: int = DEFAULT_MIN_BYTES) -> List[SourceFile]:
    """Corpus candidates under ``root`` (default: :func:`stdlib_root`), in the corpus's fixed order.

    Skips excluded directories, files smaller than ``min_bytes`` and files that are not valid UTF-8.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise DataError(f"standard-library directory not found: {root}")
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith(EXCLUDED_PREFIXES):
            continue
        if not path.is_file() or path.is_symlink():
            continue
        size = path.stat().st_size
        if size < min_bytes:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        found.append(SourceFile(rel.as_posix(), size))
    found.sort(key=lambda f: _order_key(f.relpath))
    return found


@dataclass
class SplitStats:
    """What went into one split."""

    path: str
    documents: int = 0
    num_bytes: int = 0
    files: List[str] = field(default_factory=list)


@dataclass
class CorpusManifest:
    """Contents of ``manifest.json``: enough to tell whether two corpora are the same."""

    python_version: str
    stdlib_root: str
    valid_fraction: float
    max_train_bytes: Optional[int]
    max_valid_bytes: Optional[int]
    min_bytes: int
    train: SplitStats
    valid: SplitStats


def select_files(
    sources: Sequence[SourceFile],
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    max_train_bytes: Optional[int] = DEFAULT_MAX_TRAIN_BYTES,
    max_valid_bytes: Optional[int] = DEFAULT_MAX_VALID_BYTES,
) -> tuple[List[SourceFile], List[SourceFile]]:
    """Split ``sources`` by file and fill each split greedily up to its byte cap (None: no cap)."""
    train, valid = [], []
    used = {"train": 0, "valid": 0}
    for src in sources:
        name, bucket, cap = (
            ("valid", valid, max_valid_bytes)
            if is_validation(src.relpath, valid_fraction)
            else ("train", train, max_train_bytes)
        )
        if cap is not None and used[name] + src.num_bytes > cap:
            continue
        bucket.append(src)
        used[name] += src.num_bytes
    return train, valid


def build_stdlib_corpus(
    output_dir,
    *,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    max_train_bytes: Optional[int] = DEFAULT_MAX_TRAIN_BYTES,
    max_valid_bytes: Optional[int] = DEFAULT_MAX_VALID_BYTES,
    min_bytes: int = DEFAULT_MIN_BYTES,
    root: Optional[Path] = None,
) -> CorpusManifest:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``manifest.json`` into ``output_dir``.

    Args:
        output_dir: created if missing; existing corpus files in it are replaced.
        valid_fraction: share of *files* (by path hash) that go to validation.
        max_train_bytes, max_valid_bytes: UTF-8 byte budget of each split (None: the whole library).
        min_bytes: files smaller than this are not documents worth training long context on.
        root: library root; default :func:`stdlib_root` (tests pass a small directory).

    Returns:
        The manifest (also written as ``manifest.json``), with per-split paths, counts and file lists.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    check_output_dir(output_dir, "output directory")
    root = Path(root) if root is not None else stdlib_root()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = select_files(list_stdlib_sources(root, min_bytes), valid_fraction, max_train_bytes, max_valid_bytes)
    if not train or not valid:
        raise DataError(
            f"no {'training' if not train else 'validation'} documents selected from {root} "
            f"(raise the byte caps or lower min_bytes)"
        )
    splits = {}
    for name, files in (("train", train), ("valid", valid)):
        stats = SplitStats(path=str(out / f"{name}.jsonl"))
        with atomic.replacing(stats.path, encoding="utf-8", newline="\n") as f:
            for src in files:
                text = (root / src.relpath).read_bytes().decode("utf-8")
                f.write(json.dumps({"text": text, "path": src.relpath}, ensure_ascii=False) + "\n")
                stats.documents += 1
                stats.num_bytes += src.num_bytes
                stats.files.append(src.relpath)
        splits[name] = stats
    manifest = CorpusManifest(
        python_version=platform.python_version(),
        stdlib_root=str(root),
        valid_fraction=valid_fraction,
        max_train_bytes=max_train_bytes,
        max_valid_bytes=max_valid_bytes,
        min_bytes=min_bytes,
        train=splits["train"],
        valid=splits["valid"],
    )
    atomic.write_text(str(out / "manifest.json"), json.dumps(asdict(manifest), indent=1) + "\n")
    return manifest
