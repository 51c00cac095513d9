"""Worker: make the tiny models (optional), then run the evaluation tools' ``main(argv)`` in this process.

    python tests/evaluation/workers/run_tools.py PLAN.json RESULTS.json            # setup + commands
    torchrun --nproc-per-node 2 tests/evaluation/workers/run_tools.py PLAN.json RESULTS.json   # commands only

PLAN.json::

    {"setup": {...} | null, "commands": [["perplexity" | "passkey" | "ruler", [argv...]], ...],
     "generation": {"prompts": [[ids...], ...], "max_new_tokens": n, "runs": {key: {"kind": "megatron" | "hf",
                    "path": DIR, "tp": 1, "pp": 1, "cp": 1}, ...}} | null}

``setup`` (single process) builds a tiny random LLaMA with ``llama.build_model`` and saves it with
``checkpointing.save_checkpoint`` (recording the tokenizer as a training run would), computes the
reference perplexity of the first-L-token windows with a direct forward of that same model (logits cut to
the real vocabulary, ``F.cross_entropy``), exports it with ``tools/convert_megatron_to_hf.py`` and writes
an indexed dataset of the text documents with ``data.preprocess``. One process for everything saves the
megatron import per command; megatron's parallel state stays out of pytest. ``generation`` runs
``scorer.generate`` of ``loading.open_scorer`` at each run's layout (``generate_run``). RESULTS.json (rank
0): exit status and stderr of each command, the reference, and each generation run's record.
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
    from tests.tiny_llama import tiny_llama

    distributed.initialize(1, 1, seed=0)
    cfg = tiny_llama(RopeConfig(**setup["rope"]), hidden_size=64, ffn_hidden_size=96, vocab_size=setup["vocab_size"])
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


def generate_run(run: dict, prompts: list, max_new_tokens: int) -> dict:
    """Greedy tokens of ``prompts`` through ``scorer.generate`` at the run's layout, with what checks them:
    ``full_forward``, per prompt, whether each new token is the arg-max of a forward without a cache over
    everything before it (``scorer.scores``' greedy match); ``stopped``, the same generation with a stop id
    (the middle token of the first prompt's continuation); ``ranks_agree``, every rank got the same tokens.
    A ``UserError`` is recorded as ``error``."""
    import torch.distributed as dist

    from megatron_resonance.errors import UserError
    from megatron_resonance.evaluation import loading, resolve

    model = resolve.resolve(resolve.ModelSpec(run["kind"], run["path"]))
    runtime = loading.Runtime(
        tensor_model_parallel_size=run.get("tp", 1),
        pipeline_model_parallel_size=run.get("pp", 1),
        context_parallel_size=run.get("cp", 1),
    )
    if run["kind"] == "megatron":
        loading.initialize(runtime)
    longest = max(map(len, prompts)) + max_new_tokens
    with loading.open_scorer(model, runtime, longest) as scorer:
        try:
            tokens = scorer.generate(prompts, max_new_tokens)
        except UserError as e:
            return {"error": str(e)}
        full = [scorer.scores(torch.tensor([p + t])).greedy[0, len(p) - 1 :].tolist() for p, t in zip(prompts, tokens)]
        stop = tokens[0][len(tokens[0]) // 2]
        stopped = scorer.generate(prompts, max_new_tokens, stop_ids=[stop])
    gathered = [tokens]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, tokens)
    return {
        "tokens": tokens,
        "full_forward": full,
        "stop": stop,
        "stopped": stopped,
        "ranks_agree": all(g == tokens for g in gathered),
    }


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
        results["commands"].append(
            {
                "tool": tool,
                "argv": argv,
                "status": status,
                "stdout": out.getvalue()[-3000:],
                "stderr": err.getvalue()[-6000:],
            }
        )
        if rank0:
            print(tool, " ".join(argv), "->", status, flush=True)
    generation = plan.get("generation") or {}
    results["generation"] = {}
    for key, run in generation.get("runs", {}).items():
        try:
            record = generate_run(run, generation["prompts"], generation["max_new_tokens"])
        except Exception:
            record = {"exception": traceback.format_exc()[-6000:]}
        results["generation"][key] = record
        if rank0:
            print("generate", key, "->", "ok" if "tokens" in record else record, flush=True)
    if rank0:
        Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:3])
