"""RULER (NVIDIA's long-context suite) on Megatron checkpoints (any TP/PP, under torchrun) and Hugging Face models.

    # the demo's checkpoint and its Hugging Face export side by side (single process)
    python tools/convert_megatron_to_hf.py --load outputs/demo/ckpt/resonance_yarn --save outputs/demo/hf/resonance_yarn
    python tools/eval_ruler.py --load outputs/demo/ckpt/resonance_yarn --hf outputs/demo/hf/resonance_yarn \
        --tokenizer outputs/demo/data/tokenizer.model --lengths 1024,2048 --samples 4 --out outputs/demo/eval/ruler

    # tensor parallel, a few tasks, the haystack from your own text
    torchrun --nproc-per-node 2 tools/eval_ruler.py --load CKPT --tensor-model-parallel-size 2 \
        --lengths 4096,8192,16384 --samples 20 --tasks niah_single_2,niah_multikey_1,vt,cwe \
        --haystack essays.jsonl --out eval/ruler

    # an instruction-tuned model: its tokenizer's chat template around every prompt
    python tools/eval_ruler.py --hf HF_DIR --chat-template --lengths 4096 --samples 20 --out eval/ruler_chat

Writes OUT/report.json, OUT/report.md, OUT/needle.png and OUT/predictions.jsonl; see
megatron_resonance/evaluation/ruler/ and docs/ruler.md. Bad input is one error line and exit status 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from megatron_resonance.cli import ArgumentParser, guard, quiet_library_warnings
from megatron_resonance.evaluation import command_line, memory
from megatron_resonance.evaluation.passkey import parse_depths
from megatron_resonance.evaluation.ruler.suite import DEFAULT_DEPTHS, parse_tasks, run

PROG = "eval_ruler.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="RULER long-context tasks: retrieval, tracing, aggregation.")
    command_line.add_model_arguments(p, several=True)
    g = p.add_argument_group("evaluation")
    g.add_argument("--lengths", required=True, help="prompt lengths in the model's tokens, comma-separated")
    g.add_argument("--samples", type=int, required=True, help="samples per task and length")
    g.add_argument("--tasks", default=None, help="comma-separated RULER task names (default: all)")
    g.add_argument(
        "--depths",
        default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
        help="needle depths in [0, 1] for the needle tasks (default 0,0.25,0.5,0.75,1)",
    )
    g.add_argument("--seed", type=int, default=0, help="sample draws and perplexity document order (default 0)")
    g.add_argument(
        "--haystack",
        default=None,
        help='text for the essay haystacks: JSONL with {"text": ...} per line, or a plain text '
        "file (default: the embedded corpus)",
    )
    g.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap prompts in the tokenizer's chat template (instruction-tuned models; default: base-model prompts)",
    )
    g.add_argument("--add-bos", action="store_true", help="start every prompt with the tokenizer's BOS")
    g.add_argument(
        "--max-new-tokens", type=int, default=None, help="cap the answer length (default: each task's RULER budget)"
    )
    g.add_argument(
        "--perplexity-data",
        default=None,
        help="data for the perplexity at each model's original length (as eval_perplexity.py's "
        "--data; default: held-out standard-library files)",
    )
    g.add_argument(
        "--perplexity-documents",
        type=int,
        default=16,
        help="documents for that perplexity (default 16; 0 leaves it out)",
    )
    g.add_argument("--out", required=True, help="directory for report.json, report.md, needle.png, predictions.jsonl")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_warnings()
    with guard(PROG), memory.proposing(PROG, argv):
        run(
            command_line.models_from_args(args),
            command_line.parse_lengths(args.lengths),
            samples=args.samples,
            tasks=parse_tasks(args.tasks),
            depths=parse_depths(args.depths),
            seed=args.seed,
            haystack=args.haystack,
            chat_template=args.chat_template,
            add_bos=args.add_bos,
            max_new_tokens=args.max_new_tokens,
            perplexity_data=args.perplexity_data,
            perplexity_documents=args.perplexity_documents,
            options=command_line.run_options(args),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
