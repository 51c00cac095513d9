"""Prepare the embedded default data: stdlib corpus, tokenizer, train/valid indexed datasets.

    python tools/prepare_data.py --output-dir data/stdlib [--vocab-size 2048] [--max-train-bytes 4000000]

Reuses OUTPUT_DIR when it already holds data prepared with the same settings.
"""

from __future__ import annotations

import sys

from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.data.corpus import DEFAULT_MAX_TRAIN_BYTES, DEFAULT_MAX_VALID_BYTES
from megatron_resonance.data.prepare import prepare_default_data
from megatron_resonance.data.tokenizer import DEFAULT_VOCAB_SIZE
from megatron_resonance.errors import UserError

PROG = "prepare_data.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", required=True, help="directory to fill (created if missing)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer vocabulary size")
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
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with guard(PROG):
        if args.vocab_size < 300:
            raise UserError(f"--vocab-size must be >= 300, got {args.vocab_size}")
        data = prepare_default_data(
            args.output_dir,
            vocab_size=args.vocab_size,
            max_train_bytes=args.max_train_bytes or None,
            max_valid_bytes=args.max_valid_bytes or None,
            workers=args.workers,
        )
    print(
        f"train: {data.train_prefix} ({data.train_tokens} tokens), valid: {data.valid_prefix} "
        f"({data.valid_tokens} tokens), tokenizer: {data.tokenizer_model} (vocab {data.vocab_size}, "
        f"eod {data.eod_id})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
