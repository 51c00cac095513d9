"""Document-masked attention: time and memory of the ways to keep attention inside documents.

    python benchmarks/document_masking.py                        # 8192 tokens, 16 documents, 8 heads / 2 groups, d 64
    python benchmarks/document_masking.py --tokens 4096 --documents 8 --repeat 5 --options segments,dense

One packed sequence of ``--tokens`` tokens cut into ``--documents`` documents of random lengths (fixed
seed), forward + backward (``--forward-only``: forward) of causal attention that never crosses a document,
fp32 on this machine's device (CPU here; CUDA where present). Each option runs in a fresh process, which
reports its best and median step time (a shared machine's load only adds) and its peak memory
above what it held before the first step (CPU: ``ru_maxrss`` growth; CUDA:
``max_memory_allocated``):

* ``segments``: ``megatron_resonance.megatron.documents.document_attention``, one causal SDPA per document
  (what the trainer uses);
* ``dense``: one SDPA with a dense [s, s] boolean mask (what megatron-core's ``create_attention_mask``
  would feed a kernel that honours it);
* ``flex``: ``torch.nn.attention.flex_attention`` with a document-causal ``BlockMask``, compiled
  (``torch.compile``; compile time not counted);
* ``flex_eager``: the same without compiling (torch's reference path);
* ``causal``: plain causal SDPA over the whole sequence, crossing documents (today's cost, the reference).

Every option's output is compared with ``segments`` (max abs difference). Prints a markdown table and, with
``--json PATH``, writes the numbers.
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

OPTIONS = ("causal", "segments", "dense", "flex", "flex_eager")


def _document_ids(tokens: int, documents: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(tokens - 1, generator=g)[: documents - 1].sort().values + 1
    ids = torch.zeros(tokens, dtype=torch.int64)
    ids[cuts] = 1
    return torch.cumsum(ids, 0)[None]


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_option(args) -> dict:
    """One option, in this process: median fwd+bwd seconds, peak memory growth, the output for checking."""
    import warnings

    warnings.simplefilter("ignore")
    import torch
    import torch.nn.functional as F

    from megatron_resonance.megatron.documents import DocumentLayout, document_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = _document_ids(args.tokens, args.documents, args.seed).to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    q0 = torch.randn(1, args.heads, args.tokens, args.head_dim, generator=g).to(device)
    k0, v0 = (torch.randn(1, args.groups, args.tokens, args.head_dim, generator=g).to(device) for _ in "kv")
    gqa = args.heads != args.groups
    option = args.run

    if option == "segments":

        def attend(q, k, v):
            return document_attention(q, k, v, DocumentLayout(document_ids=doc))
    elif option == "causal":

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif option == "dense":

        def attend(q, k, v):
            i = torch.arange(args.tokens, device=device)
            mask = (doc[0][:, None] == doc[0][None, :]) & (i[:, None] >= i[None, :])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        ids = doc[0]

        def document_causal(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

        kernel = torch.compile(flex_attention) if option == "flex" else flex_attention

        def attend(q, k, v):
            block = create_block_mask(document_causal, None, None, args.tokens, args.tokens, device=device)
            return kernel(q, k, v, block_mask=block, enable_gqa=gqa)

    def step():
        q, k, v = (t.clone().requires_grad_(not args.forward_only) for t in (q0, k0, v0))
        out = attend(q, k, v)
        if not args.forward_only:
            out.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return out.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = _rss_kib()
    out = step()  # warm-up (compiles flex)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else (_rss_kib() - rss_before) / 1024
    torch.save(out.cpu(), args.out)
    return {
        "option": option,
        "seconds": min(times),
        "median_seconds": statistics.median(times),
        "peak_mib": peak,
        "device": device,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--documents", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--forward-only", action="store_true", help="time the forward only (flex has no CPU backward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--json")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(run_option(args)))
        return

    import tempfile

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for option in args.options.split(","):
            out = os.path.join(tmp, f"{option}.pt")
            cmd = (
                [sys.executable, __file__, "--run", option, "--out", out]
                + [
                    f"--{k.replace('_', '-')}={getattr(args, k)}"
                    for k in ("tokens", "documents", "heads", "groups", "head_dim", "repeat", "seed")
                ]
                + (["--forward-only"] if args.forward_only else [])
            )
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                rows.append({"option": option, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows[-1]["out"] = out
        reference = next((r["out"] for r in rows if r["option"] == "segments" and "out" in r), None)
        for r in rows:
            if "out" in r and reference:
                r["max_abs_diff_vs_segments"] = float((torch.load(r["out"]) - torch.load(reference)).abs().max())
            r.pop("out", None)
    print(
        f"{args.tokens} tokens, {args.documents} documents, {args.heads} heads / {args.groups} groups, "
        f"head dim {args.head_dim}, fp32 {'forward' if args.forward_only else 'forward + backward'}, "
        f"best and median of {args.repeat}"
    )
    print("| option | seconds (best) | median | peak MiB | max abs diff vs segments |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['option']} | failed: {r['error'][:80]} | | | |")
        else:
            diff = r.get("max_abs_diff_vs_segments")
            print(
                f"| {r['option']} | {r['seconds']:.3f} | {r['median_seconds']:.3f} | {r['peak_mib']:.0f} | "
                f"{'' if diff is None else f'{diff:.1e}'} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
