"""Convert a Hugging Face LLaMA (LLaMA / LLaMA-2 / LLaMA-3; safetensors or .bin, sharded or not) into a
Megatron-Core dist checkpoint that loads at any TP/PP, with the rope plan stored.

    python tools/convert_hf_to_megatron.py --load hf/Llama-2-7b-hf --save checkpoints/llama2-7b

    # record a context-extension plan: 4096 x 8 -> max_position_embeddings 32768
    python tools/convert_hf_to_megatron.py --load hf/Llama-2-7b-hf --save checkpoints/llama2-7b-32k \
        --rope-kind resonance_yarn --rope-factor 8 --dtype bfloat16

Writes ``SAVE/latest_checkpointed_iteration.txt``, ``SAVE/iter_0000000/`` (the checkpoint and
``megatron_resonance.json``) and ``SAVE/hf/`` (the source config.json and tokenizer files, used by the
exporter). Single process, CPU is enough; peak memory is about one copy of the weights. Bad input (weights
with NaN/Inf included) is one error line and exit status 2, with SAVE left untouched; a non-empty SAVE is
refused without --overwrite.
"""

from __future__ import annotations

import sys

from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_resonance.conversion.runtime import use_single_process_env
from megatron_resonance.hf.config import DTYPES
from megatron_resonance.rope import KINDS

PROG = "convert_hf_to_megatron.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="Hugging Face model directory (config.json + weights)")
    p.add_argument("--save", required=True, help="Megatron checkpoint directory to create")
    p.add_argument(
        "--rope-kind",
        choices=KINDS,
        default=None,
        help="record a context-extension plan of this kind (default: keep the source's rope)",
    )
    p.add_argument(
        "--rope-factor",
        type=float,
        default=None,
        help="scale s of the plan: max_position_embeddings = original length x s (default 1)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="parameter dtype of the checkpoint (default: the source weights' dtype; if they mix dtypes, "
        "that of most bytes, and a line says what changed: float32 keeps every value)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    use_single_process_env()
    with guard(PROG, interrupted="interrupted; --save unchanged"):
        done = convert_hf_to_megatron(
            args.load,
            args.save,
            rope_kind=args.rope_kind,
            rope_factor=args.rope_factor,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    print(done.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
