"""Perplexity by context length on long documents, for Megatron checkpoints and Hugging Face models.

    # the demo models, one plot (single process, CPU)
    python tools/eval_perplexity.py --load outputs/demo/ckpt/rope --load outputs/demo/ckpt/yarn \
        --load outputs/demo/ckpt/resonance_yarn --lengths 128,256,384,512 --out outputs/demo/eval/perplexity

    # a Megatron checkpoint at TP=2 (any saved TP/PP loads: dist checkpoints reshard)
    torchrun --nproc-per-node 2 tools/eval_perplexity.py --load CKPT --tensor-model-parallel-size 2 \
        --lengths 4096,8192,16384,32768 --data valid_text_document --out eval/ckpt

    # a Hugging Face model, sliding window
    python tools/eval_perplexity.py --hf hf/llama2-7b-32k --lengths 4096,32768 --stride 1024 \
        --data proofpile.jsonl --out eval/hf

At each length L, by default every document with at least L tokens contributes its first L tokens
(L - 1 predictions); shorter documents are skipped and counted. With ``--stride S`` every such document
is covered by L-token windows S tokens apart, each scoring only the tokens no earlier window scored
(Hugging Face's strided perplexity; see ``documents.windows``). Perplexity is
``exp(sum of token NLL / number of scored tokens)`` over all used documents, the softmax taken over the
model's real vocabulary. Documents are visited in a seeded order (``--seed``); ``--max-documents N``
keeps the first N long enough at each length.

Outputs in ``--out``: ``report.json``, ``report.md`` and ``perplexity.png`` (log-y, one line per model,
dashed at each model's original training length). ``report.json``::

    {"perplexity": {"128": 9.1, "256": 8.7}, ...}                 one model
    {"perplexity": {"rope": {"128": 9.1, ...}, "yarn": {...}}, ...}   several (keyed by --name / basename)

plus ``details`` (per model and length: ``nll``, ``tokens``, ``documents``, ``skipped``, ``windows``),
``models`` (path, rope plan, original length, tokenizer) and ``settings``. A length where no document
is long enough has perplexity ``null``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from megatron_resonance.cli import ArgumentParser, check_output_dir
from megatron_resonance.data.tokenizer import load_tokenizer
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation import command_line, loading
from megatron_resonance.evaluation import documents as docs_lib
from megatron_resonance.evaluation.command_line import RunOptions
from megatron_resonance.evaluation.loading import Scorer
from megatron_resonance.evaluation.plots import fmt, markdown_table, plot_perplexity
from megatron_resonance.evaluation.resolve import ModelSpec, ResolvedModel, resolve_all
from megatron_resonance.megatron import distributed

REPORT, MARKDOWN, FIGURE = "report.json", "report.md", "perplexity.png"


@dataclasses.dataclass
class LengthResult:
    """Perplexity of one model at one context length."""

    length: int
    perplexity: Optional[float]
    """exp(nll); None when no document is long enough."""
    nll: Optional[float]
    """Mean negative log-likelihood per scored token (nats)."""
    tokens: int
    """Scored tokens (predictions)."""
    documents: int
    """Documents used."""
    skipped: int
    """Documents shorter than the length."""
    windows: int
    """Forward passes of ``length`` tokens."""


def build_parser(prog: str = "eval_perplexity.py") -> ArgumentParser:
    """tools/eval_perplexity.py's flags (also what the pipeline's check parses the evaluation job's with)."""
    p = ArgumentParser(prog=prog, description="Perplexity by context length (Megatron checkpoints, HF models).")
    command_line.add_model_arguments(p, several=True)
    g = p.add_argument_group("evaluation")
    g.add_argument("--lengths", required=True, help="context lengths, comma-separated (e.g. 128,256,512)")
    g.add_argument(
        "--data",
        default=None,
        help="indexed-dataset prefix (PATH of PATH.bin/.idx) or JSONL with "
        '{"text": ...} or {"tokens": [...]} per line (default: held-out standard-library files)',
    )
    g.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding windows S tokens apart (default: the first L tokens of each document)",
    )
    g.add_argument("--max-documents", type=int, default=None, help="at most N documents per length")
    g.add_argument("--seed", type=int, default=0, help="document order (default 0)")
    g.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to every document")
    g.add_argument("--out", required=True, help="directory for report.json, report.md, perplexity.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def perplexity_by_length(
    scorer: Scorer,
    documents: Sequence[np.ndarray],
    lengths: Sequence[int],
    *,
    stride: Optional[int] = None,
    max_documents: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> Dict[int, LengthResult]:
    """Perplexity of ``scorer``'s model at each length (see the module docstring).

    Collective for Megatron scorers: every rank calls it with the same arguments; windows are split over
    data-parallel replicas and the sums added, so every rank returns the same result."""
    plan = {}
    for L in lengths:
        used, skipped = docs_lib.select(documents, L, seed=seed, max_documents=max_documents)
        spans = [(d, start, first) for d in used for start, first in docs_lib.windows(len(documents[d]), L, stride)]
        plan[L] = (used, skipped, spans)
    groups = {
        L: list(range(0, len(spans), scorer.batch_size))[scorer.dp_rank :: scorer.dp_size]
        for L, (_, _, spans) in plan.items()
    }
    bar = tqdm(
        total=sum(len(g) for g in groups.values()),
        desc=scorer.model.name,
        unit="batch",
        disable=not (progress and distributed.is_rank0()),
        dynamic_ncols=True,
    )
    results = {}
    for L, (used, skipped, spans) in plan.items():
        bar.set_postfix(length=L)
        sums = torch.zeros(len(spans), dtype=torch.float64)
        for g in groups[L]:
            batch = spans[g : g + scorer.batch_size]
            tokens = torch.from_numpy(np.stack([documents[d][s : s + L] for d, s, _ in batch]))
            nll = scorer.scores(tokens).nll.double()
            for row, (_, s, first) in enumerate(batch):
                sums[g + row] = nll[row, first - s - 1 :].sum()
            bar.update()
        sums = scorer.all_reduce(sums)
        count = sum(s + L - first for _, s, first in spans)
        mean = float(sums.sum()) / count if count else None
        results[L] = LengthResult(
            length=L,
            perplexity=math.exp(min(mean, 700.0)) if mean is not None else None,
            nll=mean,
            tokens=count,
            documents=len(used),
            skipped=skipped,
            windows=len(spans),
        )
    bar.close()
    return results


# ----------------------------------------------------------------------------------------------------------
# The run: check · data · evaluate · report
# ----------------------------------------------------------------------------------------------------------


def run(
    models: Sequence[ModelSpec],
    lengths: Sequence[int],
    *,
    data: Optional[str] = None,
    stride: Optional[int] = None,
    max_documents: Optional[int] = None,
    seed: int = 0,
    add_bos: bool = False,
    options: Optional[RunOptions] = None,
) -> dict:
    """Evaluate ``models`` at ``lengths`` and (rank 0) write the report into ``options.out``; returns the report.

    Raises UserError (one line) for bad input, before any model is loaded. Megatron models need
    ``torch.distributed`` launched as the layout in ``options.runtime`` asks (single process by default)."""
    options = options or RunOptions()
    runtime, out, say = options.runtime, options.out, options.say

    # ---------------------------------------------------------------- check
    lengths = sorted(set(int(L) for L in lengths))
    if not lengths or lengths[0] < 2:
        raise UserError("--lengths: need lengths of at least 2 tokens")
    if stride is not None and not 1 <= stride <= lengths[0]:
        raise UserError(f"--stride {stride}: must be between 1 and the shortest length {lengths[0]}")
    if max_documents is not None and max_documents < 1:
        raise UserError(f"--max-documents {max_documents}: must be >= 1")
    resolved = resolve_all(models, options.tokenizer)
    runtime.check(resolved, lengths)
    loading.check_memory(resolved, runtime, lengths[-1], options.max_memory_gb)
    if out:
        check_output_dir(out, "--out")  # created once the documents are read: bad data leaves nothing behind

    # ---------------------------------------------------------------- data
    documents = model_documents(resolved, data, add_bos)
    if out:
        command_line.prepare_out(out)

    # ---------------------------------------------------------------- evaluate
    if any(m.spec.kind == "megatron" for m in resolved):
        loading.initialize(runtime)
    results = {}
    for m in resolved:
        say(
            f"[eval] {m.name}: {m.spec.kind} {m.directory} rope={m.rope.get('kind', m.rope.get('rope_type'))} "
            f"original length {m.original_length}"
        )
        with loading.open_scorer(m, runtime, lengths[-1]) as scorer:
            results[m.name] = perplexity_by_length(
                scorer,
                documents[m.name],
                lengths,
                stride=stride,
                max_documents=max_documents,
                seed=seed,
                progress=options.progress,
            )

    # ---------------------------------------------------------------- report
    settings = dict(
        lengths=lengths,
        data=data or "default: held-out standard-library files",
        stride=stride,
        max_documents=max_documents,
        seed=seed,
        add_bos=add_bos,
        tensor_model_parallel_size=runtime.tensor_model_parallel_size,
        pipeline_model_parallel_size=runtime.pipeline_model_parallel_size,
        context_parallel_size=runtime.context_parallel_size,
        micro_batch_size=runtime.micro_batch_size,
        dtype=str(runtime.torch_dtype).replace("torch.", ""),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )
    report = make_report(resolved, results, settings)
    if out and distributed.is_rank0():
        write_report(report, resolved, out)
        say(f"[eval] wrote {os.path.join(out, REPORT)}, {MARKDOWN}, {FIGURE}")
    say(summary_table(report))
    return report


def model_documents(
    resolved: Sequence[ResolvedModel], data: Optional[str], add_bos: bool
) -> Dict[str, List[np.ndarray]]:
    """Each model's documents (``--data``, tokenized with its tokenizer where the data is text); models
    sharing a tokenizer (or token data) share the arrays. UserError for data no model can read."""
    text = docs_lib.needs_tokenizer(data)
    what = f"--data {data}" if data else "the default data (held-out standard-library files)"
    cache: Dict[Optional[str], List[np.ndarray]] = {}
    out = {}
    for m in resolved:
        if (text or add_bos) and m.tokenizer is None:
            raise UserError(
                f"{what} is text and no tokenizer is stored with {m.name}: pass --tokenizer"
                if text
                else f"--add-bos needs a tokenizer: none is stored with {m.name}"
            )
        key = m.tokenizer if (text or add_bos or docs_lib.data_kind(data) == "indexed") else None
        if key not in cache:
            tok = load_tokenizer(key) if key else None
            found = docs_lib.load_documents(data, tok)
            if add_bos:
                if tok.bos_id is None:
                    raise UserError(f"--add-bos: the tokenizer {key} has no BOS token")
                found = [np.concatenate([[tok.bos_id], d]).astype(np.int64) for d in found]
            cache[key] = found
        if not cache[key]:
            raise UserError(f"{what} holds no documents")
        docs_lib.check_token_range(cache[key], m.vocab_size, f"{what} for {m.name}")
        out[m.name] = cache[key]
    return out


def make_report(resolved: Sequence[ResolvedModel], results: Dict[str, Dict[int, LengthResult]], settings: dict) -> dict:
    ppl = {m.name: {str(L): r.perplexity for L, r in results[m.name].items()} for m in resolved}
    return {
        "perplexity": ppl[resolved[0].name] if len(resolved) == 1 else ppl,
        "details": {m.name: {str(L): dataclasses.asdict(r) for L, r in results[m.name].items()} for m in resolved},
        "models": {m.name: m.describe() for m in resolved},
        "settings": settings,
    }


def _by_model(report: dict) -> Dict[str, Dict[str, Optional[float]]]:
    names = list(report["models"])
    return {names[0]: report["perplexity"]} if len(names) == 1 else report["perplexity"]


def summary_table(report: dict) -> str:
    ppl, details = _by_model(report), report["details"]
    names = list(ppl)
    rows = []
    for L in map(str, report["settings"]["lengths"]):
        rows.append([L] + [f"{fmt(ppl[n][L])} ({details[n][L]['documents']} docs)" for n in names])
    return markdown_table(["length"] + names, rows)


def write_report(report: dict, resolved: Sequence[ResolvedModel], out: str) -> None:
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    ppl = _by_model(report)
    plot_perplexity(
        {n: {int(L): p for L, p in by.items()} for n, by in ppl.items()},
        {m.name: m.original_length for m in resolved},
        os.path.join(out, FIGURE),
    )
    s = report["settings"]
    mode = (
        f"sliding L-token windows {s['stride']} tokens apart over each document at least L tokens long"
        if s["stride"]
        else "the first L tokens of each document at least L tokens long"
    )
    lines = [
        "# Perplexity by context length",
        "",
        f"Data: {s['data']}; {mode}; documents in seeded order (seed {s['seed']})"
        + (f", at most {s['max_documents']} per length" if s["max_documents"] else "")
        + ".",
        "Perplexity = exp(mean token NLL) over all scored tokens; cells: perplexity (documents used, skipped).",
        "",
    ]
    names = list(ppl)
    rows = []
    for L in map(str, s["lengths"]):
        row = [L]
        for n in names:
            d = report["details"][n][L]
            row.append(f"{fmt(ppl[n][L])} ({d['documents']} used, {d['skipped']} skipped)")
        rows.append(row)
    lines += [
        markdown_table(["length"] + names, rows),
        "",
        "| model | kind | rope | original length | path |",
        "|---|---|---|---:|---|",
    ]
    for m in resolved:
        rope = m.rope.get("kind") or m.rope.get("rope_type")
        factor = m.rope.get("factor")
        rope_text = f"{rope} ×{factor:g}" if isinstance(factor, (int, float)) and factor != 1 else str(rope)
        lines.append(f"| {m.name} | {m.spec.kind} | {rope_text} | {m.original_length} | `{m.spec.path}` |")
    lines += ["", f"![perplexity by length]({FIGURE})", ""]
    with open(os.path.join(out, MARKDOWN), "w") as f:
        f.write("\n".join(lines))
