"""Perplexity by context length for Megatron checkpoints (any TP/PP, under torchrun) and Hugging Face models.

    # several checkpoints, one plot (single process)
    python tools/eval_perplexity.py --load outputs/demo/ckpt/rope --load outputs/demo/ckpt/resonance_yarn \
        --lengths 128,256,384,512 --out outputs/demo/eval/perplexity

    # tensor parallel (the checkpoint's own TP/PP need not match)
    torchrun --nproc-per-node 2 tools/eval_perplexity.py --load CKPT --tensor-model-parallel-size 2 \
        --lengths 4096,8192 --data data/valid_text_document --out eval/ckpt

    # a Hugging Face model with a sliding window over JSONL text
    python tools/eval_perplexity.py --hf HF_DIR --lengths 4096 --stride 1024 --data docs.jsonl --out eval/hf

Writes OUT/report.json, OUT/report.md and OUT/perplexity.png; see megatron_resonance/evaluation/perplexity.py.
Bad input is one error line and exit status 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from megatron_resonance.cli import guard, quiet_library_warnings
from megatron_resonance.evaluation import command_line, memory
from megatron_resonance.evaluation.perplexity import build_parser, run

PROG = "eval_perplexity.py"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser(PROG).parse_args(argv)
    quiet_library_warnings()
    with guard(PROG), memory.proposing(PROG, argv):
        run(
            command_line.models_from_args(args),
            command_line.parse_lengths(args.lengths),
            data=args.data,
            stride=args.stride,
            max_documents=args.max_documents,
            seed=args.seed,
            add_bos=args.add_bos,
            options=command_line.run_options(args),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
