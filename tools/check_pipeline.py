"""Check a context-extension pipeline before its first job is submitted, and say which stages a (re)submission
into its work directory runs: ``slurm/submit_pipeline.sh`` calls this on the submitting node.

    python tools/check_pipeline.py --hf-model hf/Llama-2-7b-hf --work-dir runs/llama2-7b-32k \
        --nodes 1 --nproc-per-node 8 --gpus-per-node 8 --eval-lengths 4096,32768 -- \
        --config configs/llama2_7b_4k_to_32k_resonance_yarn.yaml --load runs/llama2-7b-32k/megatron \
        --save runs/llama2-7b-32k/extended --data-path data/pg19_text_document

After ``--``: the extension's trainer flags, as ``slurm/extend_context.sbatch`` passes them. Prints one line
per stage, ``<stage> <skip|run|replace|resume> <detail>`` (megatron_resonance/pipeline.py has the rules), or
one error line ``check_pipeline.py: error: <stage>: <problem>`` and exit status 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from megatron_resonance.cli import ArgumentParser, guard, quiet_library_warnings
from megatron_resonance.evaluation.command_line import parse_lengths

# the pipeline (huggingface_hub, torch) is imported after the arguments are parsed: --help runs without it.

PROG = "check_pipeline.py"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Check a pipeline's stages before submitting it; say which run.")
    p.add_argument("--hf-model", required=True, help="the Hugging Face model the pipeline extends")
    p.add_argument("--work-dir", required=True, help="the pipeline's work directory")
    p.add_argument("--convert-dtype", default=None, help="dtype of the conversion (default: the source's)")
    p.add_argument("--export-dtype", default=None, help="dtype of the export (default: the checkpoint's)")
    p.add_argument("--rope-format", default="longrope", help="the export's rope format (default longrope)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the extension")
    p.add_argument("--nproc-per-node", type=int, default=1, help="extension processes per node")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0: CPU mode")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU (GPU mode; default 80)")
    p.add_argument("--node-memory-gb", type=float, default=None, help="GiB of a node (CPU mode's memory)")
    p.add_argument(
        "--eval-memory-gb", type=float, default=None, help="GiB of the eval job (CPU mode; default --node-memory-gb)"
    )
    p.add_argument("--eval-lengths", required=True, help="evaluation lengths, comma-separated")
    p.add_argument("--eval-model", action="append", default=None, help="a model name in the report (repeat)")
    p.add_argument("--eval-data", default=None, help="the evaluation's --data")
    p.add_argument("--eval-args", default="", help="more flags of tools/eval_perplexity.py, whitespace-split")
    p.add_argument("--overwrite", action="store_true", help="run every stage again")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extend_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    quiet_library_warnings()
    from megatron_resonance import pipeline

    with guard(PROG):
        request = pipeline.Request(
            hf_model=args.hf_model, work_dir=args.work_dir, extend_args=extend_args, nodes=args.nodes,
            nproc_per_node=args.nproc_per_node, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
            node_memory_gb=args.node_memory_gb, eval_memory_gb=args.eval_memory_gb,
            convert_dtype=args.convert_dtype, export_dtype=args.export_dtype, rope_format=args.rope_format,
            eval_lengths=parse_lengths(args.eval_lengths),
            eval_models=args.eval_model or ["extended"], eval_data=args.eval_data, eval_args=args.eval_args.split(),
            overwrite=args.overwrite,
        )  # fmt: skip
        stages = pipeline.plan(request)
    for stage in stages:
        print(stage.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
