"""Conversion throughput and memory: HF -> Megatron -> HF on a LLaMA-shaped model, next to ``cp -r``.

    python benchmarks/convert_speed.py                      # hidden 1024, 12 layers, vocab 32000, bf16 (~412 MB)
    python benchmarks/convert_speed.py --hidden 4096 --intermediate 11008 --layers 4 --heads 32 --kv-heads 32 \
        --repeat 3                                          # LLaMA-2-7B-shaped, 4 layers (2.1 GB), medians of 3

Builds a random LLaMA with transformers and saves it as safetensors shards, then times (wall clock, each
step a fresh process, files written just before so every reader starts from the page cache):

* ``cp -r`` of the Hugging Face directory (the floor: read + write the same bytes), and ``cp -r`` followed by
  ``sync`` (megatron's checkpoint writer fsyncs every file it writes; ``cp`` leaves data in the page cache);
* ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py`` as a user runs them, with the
  GB/s each tool reports (its own wall time, which includes importing megatron-core and allocating the
  model: "setup") — and that rate without the setup — and each tool's peak resident memory (``ru_maxrss`` of
  the process, from ``wait4``).

``--repeat N`` runs every step N times (in turn: cp, cp && sync, import, export) and reports the medians.
Prints a markdown table and writes ``WORKDIR/convert_speed.json``. Checks the round trip is bit-exact.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_resonance.environment import describe  # noqa: E402

SUMMARY = re.compile(r"(\d+) tensors, ([\d.]+) GB in ([\d.]+) s \(([\d.]+) GB/s; setup ([\d.]+) s of it\)")


def make_model(path: Path, args) -> None:
    """The random model, saved by transformers. Run in a process of its own (see ``main``)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, args.dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size=args.shard_size)


def timed(cmd) -> tuple:
    """(wall seconds, stdout, peak RSS in bytes) of ``cmd`` run to completion in a fresh process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=err, env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (Linux: ru_maxrss in KiB)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err.read()[-3000:]}")
        return wall, out.read(), usage.ru_maxrss * 1024


def tool_run(tool: str, load: Path, save: Path, extra=()) -> dict:
    shutil.rmtree(save, ignore_errors=True)
    subprocess.run(["sync"])
    wall, out, rss = timed(
        [sys.executable, REPO / "tools" / tool, "--load", load, "--save", save, "--no-progress", *extra]
    )
    m = SUMMARY.search(out)
    tensors, gb, seconds, rate, setup = int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5])
    return {
        "process_wall_s": wall,
        "tool_s": seconds,
        "setup_s": setup,
        "gb": gb,
        "tool_gb_per_s": rate,
        "gb_per_s_without_setup": gb / (seconds - setup),
        "process_gb_per_s": gb / wall,
        "tensors": tensors,
        "peak_rss_gb": rss / 1e9,
    }


def copy_run(src: Path, copy: Path, then_sync: bool) -> float:
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["sync"])
    wall, _, _ = timed(["sh", "-c", f"cp -r '{src}' '{copy}'" + (" && sync" if then_sync else "")])
    return wall


def medians(runs: list) -> dict:
    """The median of every field over ``runs`` (a list of dicts of numbers), plus the runs themselves."""
    return {**{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/megatron_resonance_convert_speed")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-size", default="100MB")
    p.add_argument("--repeat", type=int, default=1, help="run each step this many times; report medians")
    p.add_argument("--keep", action="store_true", help="keep the model directories")
    args = p.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, copy, megatron, back = work / "hf", work / "hf_copy", work / "megatron", work / "hf_back"
    # made in a child process: a forked child's ru_maxrss starts at its parent's resident size (Linux keeps
    # the pre-exec high-water mark), so this process stays small while it times the tools
    maker = multiprocessing.get_context("spawn").Process(target=make_model, args=(src, args))
    maker.start()
    maker.join()
    if maker.exitcode != 0:
        sys.exit("making the model failed")
    files = sorted(f.name for f in src.iterdir() if f.suffix == ".safetensors")
    on_disk = sum((src / f).stat().st_size for f in files)
    index = src / "model.safetensors.index.json"
    nbytes = json.loads(index.read_text())["metadata"]["total_size"] if index.exists() else on_disk

    runs = {"cp_r": [], "cp_r_sync": [], "hf_to_megatron": [], "megatron_to_hf": []}
    for _ in range(args.repeat):
        for key, then_sync in (("cp_r", False), ("cp_r_sync", True)):
            wall = copy_run(src, copy, then_sync)
            runs[key].append({"wall_s": wall, "gb_per_s": on_disk / 1e9 / wall})
        runs["hf_to_megatron"].append(tool_run("convert_hf_to_megatron.py", src, megatron))
        runs["megatron_to_hf"].append(
            tool_run("convert_megatron_to_hf.py", megatron, back, ["--max-shard-size", args.shard_size])
        )
    cp, cp_sync, imp, exp = (medians(runs[k]) for k in runs)
    cp_wall, cp_sync_wall = cp["wall_s"], cp_sync["wall_s"]

    import torch
    from safetensors.torch import load_file

    a, b = {}, {}
    for f in files:
        a.update(load_file(src / f))
    for f in sorted(back.glob("*.safetensors")):
        b.update(load_file(f))
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    result = {
        "model": {
            k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "dtype")
        },
        "weights_gb": nbytes / 1e9,
        "safetensors_files": len(files),
        "safetensors_gb_on_disk": on_disk / 1e9,
        "repeat": args.repeat,
        "cp_r": cp,
        "cp_r_sync": cp_sync,
        "hf_to_megatron": imp,
        "megatron_to_hf": exp,
        "roundtrip_bit_exact": exact,
        "machine": describe(),
        "load_average": os.getloadavg(),
    }
    (work / "convert_speed.json").write_text(json.dumps(result, indent=2))
    print(
        f"model: {result['model']} -> {nbytes / 1e9:.3f} GB in {len(files)} safetensors shards; "
        f"{result['machine']['hardware']}; load average {result['load_average'][0]:.1f}"
    )
    print(f"medians of {args.repeat} run(s)")
    print(
        "| step | wall s (process) | GB/s (process) | tool's own s | tool GB/s | setup s | GB/s w/o setup "
        "| peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(f"| cp -r | {cp_wall:.2f} | {cp['gb_per_s']:.2f} | | | | | |")
    print(f"| cp -r && sync | {cp_sync_wall:.2f} | {cp_sync['gb_per_s']:.2f} | | | | | |")
    for name, r in (("hf -> megatron", imp), ("megatron -> hf", exp)):
        print(
            f"| {name} | {r['process_wall_s']:.2f} | {r['process_gb_per_s']:.2f} | {r['tool_s']:.2f} | "
            f"{r['tool_gb_per_s']:.2f} | {r['setup_s']:.2f} | {r['gb_per_s_without_setup']:.2f} | "
            f"{r['peak_rss_gb']:.2f} |"
        )
    print(f"round trip bit-exact: {exact}")
    if not args.keep:
        for d in (src, copy, megatron, back):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
