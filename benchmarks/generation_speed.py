"""Greedy generation speed on CPU: our Megatron path (megatron-core's static inference, ``scorer.generate``)
against transformers' ``generate`` on the Hugging Face export of the same model.

    python benchmarks/generation_speed.py                          # 4 layers, hidden 512, prompt 1024, 64 new
    python benchmarks/generation_speed.py --prompt 2048 --new 128 --repeat 5 --threads 2

Builds a random LLaMA (resonance_yarn x4 over 512 positions) with ``llama.build_model``, saves it with
``checkpointing.save_checkpoint`` and exports it with ``tools/convert_megatron_to_hf.py`` into a temporary
directory; loads both through ``loading.open_scorer`` (float32, one process, ``--threads`` torch threads)
and times, in alternating rounds, ``generate`` with one new token (the prefill: the prompt's forward and
the first token) and with ``--new`` tokens. transformers runs outside ``cpu_compat``'s device mode, as the
evaluation tools run Hugging Face models (the mode is megatron's). Decode tokens/s = (new - 1) /
(time(new) - time(1)), from the medians over ``--repeat`` rounds after one warm-up, in process CPU time
(on a shared machine, what other processes take is not counted; one thread: CPU time is the work) and in
wall time. Prints a markdown table; ``--out FILE`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per generation")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", help="JSON file for the numbers")
    return p.parse_args(argv)


def build(args, root: Path):
    """Random checkpoint and its Hugging Face export under ``root``; returns their directories."""
    import torch

    from megatron_resonance.megatron import checkpointing, distributed, llama
    from megatron_resonance.rope import RopeConfig

    distributed.initialize(1, 1, seed=0)
    cfg = llama.LlamaConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4 * 512,
        rope=RopeConfig(
            kind="resonance_yarn", factor=4.0, original_max_position=512, head_dim=args.hidden // args.heads
        ),
    )
    (model,) = llama.build_model(cfg, spec="local")
    torch.manual_seed(0)
    with torch.no_grad():  # logits far from uniform, so greedy choices are clear-cut on both sides
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.normal_(0, 0.04)
    checkpointing.save_checkpoint(str(root / "ckpt"), 1, [model], cfg, run_config={})
    del model
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_megatron_to_hf.py"),
            "--load",
            str(root / "ckpt"),
            "--save",
            str(root / "hf"),
            "--no-progress",
        ],
        check=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"),
    )
    return root / "ckpt", root / "hf"


def timed(fn) -> tuple:
    """(process CPU seconds, wall seconds) of ``fn()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from megatron_resonance.environment import describe
    from megatron_resonance.evaluation import loading, resolve
    from megatron_resonance.megatron import cpu_speed

    with tempfile.TemporaryDirectory(prefix="generation_speed_") as tmp:
        ckpt, hf = build(args, Path(tmp))
        prompt = torch.randint(0, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
        runtime = loading.Runtime(dtype="float32")
        models = {
            "megatron": resolve.resolve(resolve.ModelSpec("megatron", str(ckpt))),
            "transformers": resolve.resolve(resolve.ModelSpec("hf", str(hf))),
        }
        length = args.prompt + args.new
        with (
            loading.open_scorer(models["megatron"], runtime, length) as meg,
            loading.open_scorer(models["transformers"], runtime, length) as hf_scorer,
        ):
            scorers = {"megatron": meg, "transformers": hf_scorer}
            modes = {"megatron": contextlib.nullcontext, "transformers": cpu_speed.suspended}
            tokens = {}
            for key, scorer in scorers.items():  # warm-up
                with modes[key]():
                    tokens[key] = scorer.generate([prompt], args.new)[0]
            times = {k: {"prefill": [], "full": []} for k in scorers}
            for _ in range(args.repeat):
                for key, scorer in scorers.items():
                    with modes[key]():
                        times[key]["prefill"].append(timed(lambda: scorer.generate([prompt], 1)))
                        times[key]["full"].append(timed(lambda: scorer.generate([prompt], args.new)))
    rows = {}
    for key, t in times.items():
        row = {"prefill_rounds": t["prefill"], "total_rounds": t["full"]}
        for clock, i in (("cpu", 0), ("wall", 1)):
            prefill = statistics.median(r[i] for r in t["prefill"])
            full = statistics.median(r[i] for r in t["full"])
            row[clock] = {
                "prefill_s": prefill,
                "total_s": full,
                "decode_tokens_per_s": (args.new - 1) / (full - prefill),
            }
        rows[key] = row
    ratio = {
        clock: rows["megatron"][clock]["decode_tokens_per_s"] / rows["transformers"][clock]["decode_tokens_per_s"]
        for clock in ("cpu", "wall")
    }
    report = {
        "environment": describe(),
        "load_average": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows,
        "decode_ratio": ratio,
        "same_tokens": tokens["megatron"] == tokens["transformers"],
    }
    print(f"| path | clock | prefill ({args.prompt} tokens) s | {args.new} new tokens s | decode tokens/s |")
    print("|---|---|---|---|---|")
    for key, row in rows.items():
        for clock in ("cpu", "wall"):
            r = row[clock]
            print(f"| {key} | {clock} | {r['prefill_s']:.3f} | {r['total_s']:.3f} | {r['decode_tokens_per_s']:.1f} |")
    print(
        f"decode megatron / transformers: {ratio['cpu']:.2f} (CPU time), {ratio['wall']:.2f} (wall); same tokens: "
        f"{report['same_tokens']}; load average {report['load_average'][0]:.1f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
