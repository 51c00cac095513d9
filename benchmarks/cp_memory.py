"""Context parallelism without Transformer Engine: peak memory per rank and step time, CP=1 against CP=2.

    python benchmarks/cp_memory.py --lengths 8192 16384 --steps 2 --out runs/cp_memory.json

A small, wide LLaMA (``--hidden-size 1024``, 2 layers, 16 heads / 4 query groups, vocabulary 256; fp32,
the local spec with SDPA attention) takes training steps on one sequence per step: forward, backward
(the per-token loss of megatron's cross entropy), and the gradient all-reduce over the CP group that DDP
does over DP x CP (at CP=1 there is none). CP=1 runs as one process, CP=2 as two (torchrun, gloo), every
process with ``--threads`` threads; each configuration is a fresh launch, so a process's peak RSS is
that configuration's.

Per rank: ``peak_rss`` (resource.getrusage's ru_maxrss: weights, gradients, the process itself and the
step's activations) and ``step_peak`` (peak RSS minus the RSS just before the first step: what the step
adds). Step time: the median of ``--steps`` timed steps after one untimed step. Prints one JSON object;
``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(
    num_layers=2, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16, num_query_groups=4, vocab_size=256
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(length: int, steps: int) -> dict:
    """One rank's measurements (run under torchrun or as one process)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_resonance.megatron import compat, distributed, llama
    from megatron_resonance.rope import RopeConfig

    cp = int(os.environ.get("WORLD_SIZE", "1"))
    distributed.initialize(context_parallel_size=cp, seed=0)
    cfg = llama.LlamaConfig(
        **MODEL,
        max_position_embeddings=length,
        rope=RopeConfig(kind="resonance_yarn", factor=4.0, original_max_position=length // 4),
    )
    (model,) = llama.build_model(cfg, spec="local", seq_length=length, per_token_loss=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (1, length + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(length).unsqueeze(0)}
    batch = compat.batch_on_this_cp_rank(batch)
    group = ps.get_context_parallel_group()

    def step() -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=False)
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss = losses.sum()
        loss.backward()
        if cp > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
            dist.barrier()
        return time.perf_counter() - start

    for p in model.parameters():  # gradients allocated before the baseline, as DDP's buffers are
        p.grad = torch.zeros_like(p)
    before = _rss_bytes()
    step()  # the untimed first step (its peak counts: the steps are alike)
    times = [step() for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {
        "rank": dist.get_rank(),
        "cp": cp,
        "length": length,
        "local_tokens": length // cp,
        "rss_before_step": before,
        "peak_rss": peak,
        "step_peak": peak - before,
        "step_seconds": statistics.median(times),
        "threads": torch.get_num_threads(),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    return gathered


def launch(cp: int, length: int, steps: int, threads: int) -> list:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    args = [__file__, "--worker", "--lengths", str(length), "--steps", str(steps)]
    if cp == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={cp}",
            "--master-addr=127.0.0.1",
            f"--master-port={29700 + length % 97}",
            *args,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("[cp_memory] "))
    return json.loads(line[len("[cp_memory] ") :])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--steps", type=int, default=2, help="timed steps after one untimed step")
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        records = worker(args.lengths[0], args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print("[cp_memory] " + json.dumps(records), flush=True)
        return
    results = {"model": MODEL, "threads_per_process": args.threads, "steps": args.steps, "runs": []}
    for length in args.lengths:
        ranks = {cp: launch(cp, length, args.steps, args.threads) for cp in (1, 2)}
        one, two = ranks[1][0], max(ranks[2], key=lambda r: r["peak_rss"])
        results["runs"].append(
            {
                "length": length,
                "cp1": ranks[1],
                "cp2": ranks[2],
                "peak_rss_ratio": two["peak_rss"] / one["peak_rss"],
                "step_peak_ratio": two["step_peak"] / one["step_peak"],
                "step_time_ratio": max(r["step_seconds"] for r in ranks[2]) / one["step_seconds"],
            }
        )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
