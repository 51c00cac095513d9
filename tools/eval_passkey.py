"""Passkey retrieval accuracy by length and depth for a Megatron checkpoint or a Hugging Face model.

    python tools/eval_passkey.py --load outputs/demo/ckpt/resonance_yarn --lengths 128,256,512 --trials 10 \
        --out outputs/demo/eval/passkey
    torchrun --nproc-per-node 2 tools/eval_passkey.py --load CKPT --tensor-model-parallel-size 2 \
        --lengths 4096,8192 --trials 20 --depths 0,0.25,0.5,0.75,1 --out eval/passkey
    python tools/eval_passkey.py --hf HF_DIR --add-bos --lengths 4096,8192 --trials 20 --out eval/passkey

Writes OUT/report.json, OUT/report.md and OUT/passkey.png; see megatron_resonance/evaluation/passkey.py.
Bad input is one error line and exit status 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from megatron_resonance.cli import ArgumentParser, guard, quiet_library_warnings
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation import command_line, memory
from megatron_resonance.evaluation.passkey import DEFAULT_DEPTHS, parse_depths, run

PROG = "eval_passkey.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Passkey retrieval accuracy by length and depth.")
    command_line.add_model_arguments(p, several=False)
    g = p.add_argument_group("evaluation")
    g.add_argument("--lengths", required=True, help="prompt lengths in tokens, comma-separated")
    g.add_argument("--trials", type=int, required=True, help="trials per length and depth")
    g.add_argument(
        "--depths",
        default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
        help="key depths in [0, 1] (default 0,0.25,0.5,0.75,1)",
    )
    g.add_argument("--seed", type=int, default=0, help="key draws (default 0)")
    g.add_argument("--add-bos", action="store_true", help="start every prompt with the tokenizer's BOS")
    g.add_argument("--out", required=True, help="directory for report.json, report.md, passkey.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_warnings()
    with guard(PROG), memory.proposing(PROG, argv):
        specs = command_line.models_from_args(args)
        if len(specs) != 1:
            raise UserError(f"give exactly one model (--load or --hf), got {len(specs)}")
        run(
            specs[0],
            command_line.parse_lengths(args.lengths),
            trials=args.trials,
            depths=parse_depths(args.depths),
            seed=args.seed,
            add_bos=args.add_bos,
            options=command_line.run_options(args),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
