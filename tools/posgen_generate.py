"""Write a PosGen split as JSON lines, one ``{"tokens": [...]}`` per sequence (token values 0..16).

    python tools/posgen_generate.py --task semi_recursive --split train \
        --num-sequences 10000 --length 64 --seed 0 --out data/semi_recursive_train.jsonl

Splits never share a seed prefix, whatever --seed and --length (see ``megatron_resonance/posgen/splits.py``).
An existing --out is an error unless --overwrite is given; the file is written to a temporary name in the
same directory and moved into place (``megatron_resonance.atomic``), so a failed run leaves no partial file.
The directory must exist.
"""

from __future__ import annotations

import json
import os
import sys

from megatron_resonance import atomic
from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.errors import UserError
from megatron_resonance.posgen.splits import POOL_SIZES, SPLITS, make_split
from megatron_resonance.posgen.tasks import MIN_LENGTH, TASKS

PROG = "posgen_generate.py"


def build_parser() -> ArgumentParser:
    g = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    g.add_argument("--task", required=True, choices=TASKS, help="PosGen subtask")
    g.add_argument("--split", required=True, choices=SPLITS, help="which seed-prefix pool to draw from")
    g.add_argument(
        "--num-sequences",
        type=int,
        required=True,
        metavar="N",
        help="sequences to write (at most "
        + ", ".join(f"{s} {n}" for s, n in POOL_SIZES.items())
        + "; each has its own seed prefix)",
    )
    g.add_argument("--length", type=int, required=True, metavar="L", help=f"tokens per sequence (>= {MIN_LENGTH})")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="chooses the seed prefixes (default 0)")
    g.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return g


def write_jsonl(tokens, path: str) -> None:
    """Write rows of ``tokens`` (LongTensor [N, L]) to ``path`` atomically, one JSON object per line."""
    with atomic.replacing(path, encoding="utf-8") as f:
        for row in tokens.tolist():
            f.write(json.dumps({"tokens": row}) + "\n")


def generate(args) -> int:
    with guard(PROG):
        if args.num_sequences <= 0:
            raise UserError(f"--num-sequences must be positive, got {args.num_sequences}")
        if args.num_sequences > POOL_SIZES[args.split]:
            raise UserError(
                f"--num-sequences {args.num_sequences} exceeds the {POOL_SIZES[args.split]} "
                f"distinct seed prefixes of split {args.split!r}"
            )
        if args.length < MIN_LENGTH:
            raise UserError(f"--length must be >= {MIN_LENGTH} (4-token seed prefix + 1), got {args.length}")
        if args.seed < 0 or args.seed >= 2**64:
            raise UserError(f"--seed must be in [0, 2**64), got {args.seed}")
        out = args.out
        if os.path.isdir(out):
            raise UserError(f"--out {out!r} is a directory")
        if os.path.exists(out) and not args.overwrite:
            raise UserError(f"--out {out!r} exists (pass --overwrite to replace it)")
        directory = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(directory):
            raise UserError(f"directory of --out does not exist: {directory!r}")
        tokens = make_split(args.task, args.split, args.num_sequences, args.length, args.seed)
        try:
            write_jsonl(tokens, out)
        except OSError as e:  # e.g. a directory this user cannot write in
            raise UserError(str(e)) from None
    print(
        f"wrote {args.num_sequences} {args.task} sequences of length {args.length} "
        f"(split {args.split}, seed {args.seed}) to {out}"
    )
    return 0


def main(argv=None) -> int:
    return generate(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
