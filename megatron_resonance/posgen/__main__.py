"""Write a PosGen split as JSON lines, one ``{"tokens": [...]}`` per sequence (token values 0..16).

    python -m megatron_resonance.posgen generate --task semi_recursive --split train \
        --num-sequences 10000 --length 64 --seed 0 --out data/semi_recursive_train.jsonl

Splits never share a seed prefix, whatever --seed and --length (see ``megatron_resonance/posgen/splits.py``).
An existing --out is an error unless --overwrite is given; the file is written to a temporary name in the
same directory and moved into place, so a failed run leaves no partial file. The directory must exist.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from megatron_resonance.cli import ArgumentParser, fail
from megatron_resonance.posgen.splits import POOL_SIZES, SPLITS, make_split
from megatron_resonance.posgen.tasks import MIN_LENGTH, TASKS

PROG = "python -m megatron_resonance.posgen"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    g = commands.add_parser("generate", help="write one split of one task as JSON lines")
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
    g.add_argument(
        "--length", type=int, required=True, metavar="L", help=f"tokens per sequence (>= {MIN_LENGTH})"
    )
    g.add_argument("--seed", type=int, default=0, metavar="S", help="chooses the seed prefixes (default 0)")
    g.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def write_jsonl(tokens, path: str) -> None:
    """Write rows of ``tokens`` (LongTensor [N, L]) to ``path`` atomically, one JSON object per line."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".posgen-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in tokens.tolist():
                f.write(json.dumps({"tokens": row}) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def generate_command(args) -> int:
    prog = f"{PROG} generate"
    if args.num_sequences <= 0:
        fail(f"{prog}: error: --num-sequences must be positive, got {args.num_sequences}")
    if args.num_sequences > POOL_SIZES[args.split]:
        fail(
            f"{prog}: error: --num-sequences {args.num_sequences} exceeds the {POOL_SIZES[args.split]} "
            f"distinct seed prefixes of split {args.split!r}"
        )
    if args.length < MIN_LENGTH:
        fail(f"{prog}: error: --length must be >= {MIN_LENGTH} (4-token seed prefix + 1), got {args.length}")
    if args.seed < 0 or args.seed >= 2**64:
        fail(f"{prog}: error: --seed must be in [0, 2**64), got {args.seed}")
    out = args.out
    if os.path.isdir(out):
        fail(f"{prog}: error: --out {out!r} is a directory")
    if os.path.exists(out) and not args.overwrite:
        fail(f"{prog}: error: --out {out!r} exists (pass --overwrite to replace it)")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        fail(f"{prog}: error: directory of --out does not exist: {directory!r}")
    try:
        tokens = make_split(args.task, args.split, args.num_sequences, args.length, args.seed)
        write_jsonl(tokens, out)
    except (ValueError, OSError) as e:
        fail(f"{prog}: error: {e}")
    print(
        f"wrote {args.num_sequences} {args.task} sequences of length {args.length} "
        f"(split {args.split}, seed {args.seed}) to {out}"
    )
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate_command(args)
    fail(f"{PROG}: error: unknown command {args.command!r}")  # unreachable: argparse checks choices


if __name__ == "__main__":
    sys.exit(main())
