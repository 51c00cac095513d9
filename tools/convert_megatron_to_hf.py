"""Export a Megatron-Core LLaMA checkpoint (saved at any TP/PP) as a Hugging Face model directory that stock
transformers loads with exactly the model's rotary frequencies — no custom code, no trust_remote_code.

    python tools/convert_megatron_to_hf.py --load checkpoints/llama2-7b-32k --save hf/llama2-7b-32k-resonance

    # named rope type instead (loaders must call megatron_resonance.hf.register() first)
    python tools/convert_megatron_to_hf.py --load checkpoints/llama2-7b-32k --save hf/custom --rope-format custom

Writes safetensors shards + ``model.safetensors.index.json``, ``config.json`` (``max_position_embeddings`` =
the model's extended length; rope/linear/yarn/llama3 as themselves, resonance kinds through ``longrope``
per-feature factors, the true plan recorded as ``megatron_resonance_rope``) and the tokenizer files kept
by the importer (or --hf-reference). Single process; peak memory is about one copy of the weights. Bad
input is one error line and exit status 2, with SAVE untouched; a non-empty SAVE needs --overwrite.
"""

from __future__ import annotations

import sys

from megatron_resonance.cli import ArgumentParser, guard
from megatron_resonance.conversion.megatron_to_hf import convert_megatron_to_hf
from megatron_resonance.conversion.runtime import use_single_process_env
from megatron_resonance.hf.config import DTYPES
from megatron_resonance.hf.rope import ROPE_FORMATS

PROG = "convert_megatron_to_hf.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--load",
        required=True,
        help="Megatron checkpoint root (with latest_checkpointed_iteration.txt) or one iter_XXXXXXX directory",
    )
    p.add_argument("--save", required=True, help="Hugging Face directory to create")
    p.add_argument(
        "--rope-format",
        choices=ROPE_FORMATS,
        default="longrope",
        help="how plans without a native transformers rope type (resonance, ntk) are written: "
        "longrope (portable, default) or custom (type 'megatron_resonance', needs "
        "megatron_resonance.hf.register())",
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="dtype of the exported weights (default: the checkpoint's)"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    p.add_argument(
        "--hf-reference",
        default=None,
        help="Hugging Face directory whose tokenizer files and non-architecture config fields are "
        "carried over (default: LOAD/hf, kept by convert_hf_to_megatron.py)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    use_single_process_env()
    with guard(PROG, interrupted="interrupted; --save unchanged"):
        done = convert_megatron_to_hf(
            args.load,
            args.save,
            rope_format=args.rope_format,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            hf_reference=args.hf_reference,
            progress=not args.no_progress,
        )
    print(done.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
