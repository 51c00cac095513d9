"""Tokenize text/JSONL documents into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input data/stdlib/train.jsonl --output-prefix data/stdlib/train \
        --tokenizer-model data/stdlib/spm2048.model --workers 2

Inputs: JSONL files (.jsonl/.json, one {"text": ...} per line) or any other file as one document;
several are joined with commas. EOS follows every document (--no-eod to omit it); empty documents are
skipped. The tokenizer: a SentencePiece .model, a Hugging Face tokenizer.json (Llama-3's byte-level
BPE) or a directory with either; a vocabulary of 65,500 ids or more is stored as int32. Bad input is
one error line and exit status 2; an existing dataset is never overwritten without --overwrite.
"""

from __future__ import annotations

import sys

from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.data.preprocess import preprocess

PROG = "preprocess_data.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="FILE[,FILE...]: JSONL (.jsonl/.json) or text files")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--tokenizer-model",
        "--tokenizer",
        dest="tokenizer_model",
        required=True,
        help="SentencePiece .model (ours or LLaMA's), Hugging Face tokenizer.json (Llama-3), or a "
        "directory with either",
    )
    p.add_argument("--json-key", default="text", help="JSONL field holding the document (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument(
        "--append-eod",
        dest="append_eod",
        action="store_true",
        default=True,
        help="append EOS after every document (the default)",
    )
    p.add_argument("--no-eod", dest="append_eod", action="store_false", help="do not append EOS")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with guard(PROG, interrupted="interrupted; nothing written"):
        preprocess(
            [s for s in args.input.split(",") if s],
            args.output_prefix,
            args.tokenizer_model,
            json_key=args.json_key,
            workers=args.workers,
            append_eod=args.append_eod,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
