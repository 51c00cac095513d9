"""Worker: make the tiny models (optional), then run the evaluation tools' ``main(argv)`` in this process.

    python tests/evaluation/workers/run_tools.py PLAN.json RESULTS.json            # setup + commands
    torchrun --nproc-per-node 2 tests/evaluation/workers/run_tools.py PLAN.json RESULTS.json   # commands only

PLAN.json::

    {"setup": {...} | null, "commands": [["perplexity" | "passkey" | "ruler", [argv...]], ...]}

``setup`` (single process) builds a tiny random LLaMA with ``llama.build_model`` and saves it with
``checkpointing.save_checkpoint`` (recording the tokenizer as a training run would), computes the
reference perplexity of the first-L-token windows with a direct forward of that same model (logits cut to
the real vocabulary, ``F.cross_entropy``), exports it with ``tools/convert_megatron_to_hf.py`` and writes
an indexed dataset of the text documents with ``data.preprocess``. One process for everything saves the
megatron import per command; megatron's parallel state stays out of pytest. RESULTS.json (rank 0): exit
status and stderr of each command, and the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]


def make_model(setup: dict) -> dict:
    import torch.nn.functional as F

    from megatron_resonance.megatron import checkpointing, distributed, llama
    from megatron_resonance.rope import RopeConfig

    distributed.initialize(1, 1, seed=0)
    cfg = llama.LlamaConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
        vocab_size=setup["vocab_size"], max_position_embeddings=64,
        rope=RopeConfig(**setup["rope"], head_dim=16),
    )
    (model,) = llama.build_model(cfg, spec="local")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from init: logits of order 1, padding rows included (they must not count)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "layernorm" in name else 0.1 * noise)
    model.eval()
    run_config = {"data": {"tokenizer_model": setup["tokenizer"]}}
    checkpointing.save_checkpoint(setup["root"], 10, [model], cfg, run_config=run_config)

    docs = [json.loads(line)["tokens"] for line in open(setup["tokens"]) if line.strip()]
    reference = {}
    with torch.no_grad():
        for L in setup["lengths"]:
            nll, count = 0.0, 0
            for doc in docs:
                if len(doc) < L:
                    continue
                tokens = torch.tensor([doc[:L]])
                logits = model(tokens, torch.arange(L)[None], None)[..., : cfg.vocab_size].float()
                nll += F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum").item()
                count += L - 1
            reference[str(L)] = float(torch.tensor(nll / count, dtype=torch.float64).exp()) if count else None
    distributed.destroy()
    return reference


def convert(setup: dict) -> None:
    argv = sys.argv
    sys.argv = ["convert_megatron_to_hf.py", "--load", setup["root"], "--save", setup["hf"], "--no-progress"]
    try:
        runpy.run_path(str(REPO / "tools" / "convert_megatron_to_hf.py"), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"convert_megatron_to_hf exited {e.code}") from None
    finally:
        sys.argv = argv


def main(plan_path: str, results_path: str) -> None:
    sys.path.insert(0, str(REPO))
    from tests.launch import load_tool

    perplexity, passkey, ruler = load_tool("eval_perplexity"), load_tool("eval_passkey"), load_tool("eval_ruler")

    plan = json.loads(Path(plan_path).read_text())
    rank0 = os.environ.get("RANK", "0") == "0"
    results = {"commands": []}
    setup = plan.get("setup")
    if setup:
        results["reference"] = make_model(setup)
        convert(setup)
        from megatron_resonance.data.preprocess import preprocess

        preprocess([setup["text"]], setup["indexed"], setup["tokenizer"], progress=False, log=None)
    tools = {"perplexity": perplexity.main, "passkey": passkey.main, "ruler": ruler.main}
    for tool, argv in plan["commands"]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = tools[tool](argv)
            except SystemExit as e:
                status = e.code
            except Exception:
                status = "exception"
                err.write(traceback.format_exc())
        results["commands"].append({"tool": tool, "argv": argv, "status": status, "stdout": out.getvalue()[-3000:],
                                    "stderr": err.getvalue()[-6000:]})
        if rank0:
            print(tool, " ".join(argv), "->", status, flush=True)
    if rank0:
        Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:3])
