"""Train the small byte-fallback SentencePiece BPE tokenizer that round-trips source code.

    python tools/train_tokenizer.py --input data/stdlib/train.jsonl --model-prefix data/stdlib/spm2048 \
        --vocab-size 2048

Writes PREFIX.model and PREFIX.vocab, then prints the vocabulary size, the compression (characters per
token) and whether decode(encode(text)) == text on every training document.
"""

from __future__ import annotations

import os
import sys

from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    Tokenizer,
    iter_training_texts,
    train_tokenizer,
)
from megatron_resonance.errors import UserError

PROG = "train_tokenizer.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="FILE[,FILE...]: JSONL (.jsonl/.json) or text files")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"ids including 3 special and 256 byte pieces (default: {DEFAULT_VOCAB_SIZE})",
    )
    p.add_argument("--json-key", default="text", help="JSONL field holding the document (default: text)")
    p.add_argument(
        "--max-sentences", type=int, default=0, help="sample this many training chunks (0: all; for large corpora)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    inputs = [s for s in args.input.split(",") if s]
    with guard(PROG):
        for path in inputs:
            if not os.path.isfile(path):
                raise UserError(f"input not found: {path}")
            if os.path.getsize(path) == 0:
                raise UserError(f"input is empty: {path}")
        if args.vocab_size < 300:
            raise UserError(f"--vocab-size must be >= 300 (259 byte/special pieces), got {args.vocab_size}")
        if os.path.exists(f"{args.model_prefix}.model") and not args.overwrite:
            raise UserError(f"output exists: {args.model_prefix}.model (pass --overwrite to replace it)")
        model = train_tokenizer(
            inputs,
            args.model_prefix,
            vocab_size=args.vocab_size,
            json_key=args.json_key,
            max_sentences=args.max_sentences,
        )
    tok = Tokenizer(model)
    chars = tokens = docs = exact = 0
    for text in iter_training_texts(inputs, args.json_key):
        ids = tok.encode(text)
        chars, tokens, docs = chars + len(text), tokens + len(ids), docs + 1
        exact += tok.decode(ids) == text
    print(
        f"wrote {model} (vocab_size {tok.vocab_size}, {os.path.getsize(model)} bytes): "
        f"{chars / max(tokens, 1):.2f} characters/token on {docs} documents, "
        f"round trip exact on {exact}/{docs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
