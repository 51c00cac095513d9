"""Write the embedded default corpus (this Python's standard-library source) as train/valid JSONL.

    python tools/build_corpus.py --output-dir data/stdlib [--max-train-bytes 4000000] \
        [--max-valid-bytes 400000] [--valid-fraction 0.05]
"""

from __future__ import annotations

import sys

from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.data.corpus import (
    DEFAULT_MAX_TRAIN_BYTES,
    DEFAULT_MAX_VALID_BYTES,
    DEFAULT_MIN_BYTES,
    DEFAULT_VALID_FRACTION,
    build_stdlib_corpus,
)

PROG = "build_corpus.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", required=True, help="writes train.jsonl, valid.jsonl, manifest.json")
    p.add_argument(
        "--max-train-bytes",
        type=int,
        default=DEFAULT_MAX_TRAIN_BYTES,
        help="train text budget in bytes (0: the whole library)",
    )
    p.add_argument(
        "--max-valid-bytes",
        type=int,
        default=DEFAULT_MAX_VALID_BYTES,
        help="validation text budget in bytes (0: the whole library)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        help="share of files (by path hash) held out for validation",
    )
    p.add_argument("--min-bytes", type=int, default=DEFAULT_MIN_BYTES, help="skip smaller files")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with guard(PROG):
        m = build_stdlib_corpus(
            args.output_dir,
            valid_fraction=args.valid_fraction,
            max_train_bytes=args.max_train_bytes or None,
            max_valid_bytes=args.max_valid_bytes or None,
            min_bytes=args.min_bytes,
        )
    print(
        f"{m.train.path}: {m.train.documents} files, {m.train.num_bytes / 1e6:.2f} MB; "
        f"{m.valid.path}: {m.valid.documents} files, {m.valid.num_bytes / 1e6:.2f} MB (Python "
        f"{m.python_version}, {m.stdlib_root})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
