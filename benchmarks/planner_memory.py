"""The planner's training estimate (megatron_resonance/planning.py) against the peak resident memory of the
real training entry point on CPU, per rank.

    python benchmarks/planner_memory.py [--quick] [--out benchmarks/results/DATE_planner_memory.md]

Each setting runs ``pretrain/pretrain_llama.py --nproc-per-node N`` (fp32, the local spec, mock data, 2
steps) under a small Python parent that reports ``ru_maxrss`` of its largest descendant: the peak RSS of
the rank that needed most. glibc's mmap threshold is fixed (``MMAP_THRESHOLD``; ``--default-malloc`` for
glibc's dynamic one) so that the RSS follows the tensors alive. A process's fixed cost (torch, megatron
and gloo, the dataset, allocator arenas: nothing the estimate counts) is measured per TP as the same run
at length 256 less the estimate there, and subtracted. The comparison is then (measured - fixed) against
the estimate; ``tests/planning/test_measured.py`` asserts ±20 % on a few of these settings.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_resonance.planning import Layout, ModelShape, training_estimate  # noqa: E402

MiB = 2**20
#: 4 layers, head dim 32, GQA 8:4: activations dominate at a few thousand tokens
SHAPE = ModelShape(
    num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8, num_query_groups=4, vocab_size=2048
)
BASELINE_LENGTH = 256
#: (length, TP, recomputation, CP)
SETTINGS = [
    (2048, 1, "none", 1), (4096, 1, "none", 1), (8192, 1, "none", 1), (4096, 1, "full", 1), (8192, 1, "full", 1),
    (4096, 1, "selective", 1), (2048, 2, "none", 1), (4096, 2, "none", 1), (8192, 2, "none", 1),
    (4096, 2, "selective", 1), (4096, 1, "none", 2), (8192, 1, "none", 2), (8192, 1, "full", 2),
]  # fmt: skip
QUICK = [(4096, 1, "full", 1), (4096, 2, "selective", 1), (8192, 1, "none", 2)]
_PARENT = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
    "sys.exit(rc)\n"
)


def model_flags(shape: ModelShape = SHAPE) -> List[str]:
    return [
        "--num-layers",
        str(shape.num_layers),
        "--hidden-size",
        str(shape.hidden_size),
        "--ffn-hidden-size",
        str(shape.ffn_hidden_size),
        "--num-attention-heads",
        str(shape.num_attention_heads),
        "--num-query-groups",
        str(shape.num_query_groups),
        "--vocab-size",
        str(shape.vocab_size),
    ]


def recompute_flags(recompute: str) -> List[str]:
    if recompute == "full":
        return ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if recompute == "selective":
        return ["--recompute-granularity", "selective"]
    return []


def peak_rss(cmd: List[str], env: Optional[Dict[str, str]] = None, timeout: int = 600) -> float:
    """Run ``cmd``; the peak RSS in bytes of its largest descendant process. RuntimeError with the output
    when it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", _PARENT, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return float(lines[-1].split()[1]) * 1024


def train_command(length: int, tp: int, recompute: str = "none", cp: int = 1) -> List[str]:
    return [
        sys.executable,
        str(REPO / "pretrain" / "pretrain_llama.py"),
        "--nproc-per-node",
        str(tp * cp),
        "--context-parallel-size",
        str(cp),
        *model_flags(),
        "--max-position-embeddings",
        str(max(length, 8192)),
        "--mock-data",
        "--seq-length",
        str(length),
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "1",
        "--tensor-model-parallel-size",
        str(tp),
        "--train-iters",
        "2",
        "--eval-iters",
        "0",
        "--log-interval",
        "1",
        "--lr",
        "1e-4",
        "--min-lr",
        "1e-5",
        *recompute_flags(recompute),
    ]


def estimate(length: int, tp: int, recompute: str = "none", cp: int = 1) -> float:
    """The planner's estimate for the CPU run: fp32, the local spec with the CPU speed measures, no
    sequence parallelism, one micro-batch, DP=1."""
    layout = Layout(tp=tp, cp=cp, recompute=recompute, sequence_parallel=False)
    return training_estimate(SHAPE, length, layout, bf16=False, spec="local", cpu=True).total


#: glibc malloc serves allocations from this size up with mmap, returned to the system when freed. By
#: default the threshold rises to the size of each mmapped block freed (up to 32 MiB), after which a
#: training step's MiB-sized tensors come from the heap, whose high-water mark then holds freed holes between
#: saved activations: the RSS measures glibc's heap, up to 56 % above the tensors alive (full recomputation
#: at 8K; benchmarks/results/2026-12-06_planner_memory.md). A fixed threshold keeps RSS on the tensors alive.
MMAP_THRESHOLD = 262144


def child_env(mmap_threshold: bool = True) -> Dict[str, str]:
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), PYTHONWARNINGS="ignore")
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return env


def import_rss(env: Dict[str, str]) -> float:
    """Peak RSS of a process that only imports torch, megatron-core and the trainer (for reference)."""
    return peak_rss([sys.executable, "-c", "import torch, megatron.core, megatron_resonance.training.trainer"], env=env)


def measure(settings, env=None, log=print) -> List[dict]:
    env = env or child_env()
    fixed = {}
    rows = []
    for tp, cp in sorted({(s[1], s[3]) for s in settings}):
        base = peak_rss(train_command(BASELINE_LENGTH, tp, cp=cp), env=env)
        fixed[tp, cp] = base - estimate(BASELINE_LENGTH, tp, cp=cp)
        log(f"TP={tp} CP={cp}: length {BASELINE_LENGTH} peak {base / MiB:.0f} MiB, fixed {fixed[tp, cp] / MiB:.0f} MiB")
    for length, tp, recompute, cp in settings:
        peak = peak_rss(train_command(length, tp, recompute, cp), env=env)
        est = estimate(length, tp, recompute, cp)
        measured = peak - fixed[tp, cp]
        row = dict(
            length=length,
            tp=tp,
            cp=cp,
            recompute=recompute,
            peak_mib=peak / MiB,
            fixed_mib=fixed[tp, cp] / MiB,
            measured_mib=measured / MiB,
            estimate_mib=est / MiB,
            error=(est - measured) / measured,
        )
        rows.append(row)
        log(
            f"L={length} TP={tp} CP={cp} {recompute}: peak {row['peak_mib']:.0f} MiB, measured "
            f"{row['measured_mib']:.0f}, estimate {row['estimate_mib']:.0f} ({row['error']:+.1%})"
        )
    return rows


def markdown(rows: List[dict], imported: float) -> str:
    lines = [
        "| length | TP | CP | recomputation | peak RSS (MiB) | fixed (MiB) | measured − fixed | estimate | error |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['tp']} | {r['cp']} | {r['recompute']} | {r['peak_mib']:.0f} | "
            f"{r['fixed_mib']:.0f} | {r['measured_mib']:.0f} | {r['estimate_mib']:.0f} | {r['error']:+.1%} |"
        )
    lines.append("")
    lines.append(f"Import alone (torch, megatron-core, the trainer): {imported / MiB:.0f} MiB peak RSS.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the test's settings only")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="glibc's default (dynamic) mmap threshold instead of MMAP_THRESHOLD",
    )
    args = p.parse_args(argv)
    env = child_env(mmap_threshold=not args.default_malloc)
    imported = import_rss(env)
    rows = measure(QUICK if args.quick else SETTINGS, env=env)
    table = markdown(rows, imported)
    print(table)
    if args.out:
        Path(args.out).write_text(f"# Planner estimate against measured memory, {datetime.date.today()}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
