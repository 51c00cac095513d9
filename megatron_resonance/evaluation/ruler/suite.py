"""The RULER run: samples for every task and length, greedy answers from each model, scores, the report.

    python tools/eval_ruler.py --load ckpt/resonance_yarn --hf hf/resonance_yarn --lengths 1024,2048 \
        --samples 4 --out eval/ruler
    torchrun --nproc-per-node 2 tools/eval_ruler.py --load CKPT --tensor-model-parallel-size 2 \
        --lengths 4096,8192,16384 --samples 20 --out eval/ruler

Every model answers the same prompts (models sharing a tokenizer share the samples; a sample is fixed by
task, length, index and seed). Each answer is greedy, with a KV cache, up to the task's
``max_new_tokens`` (``--max-new-tokens`` caps it) and the tokenizer's EOS; it is scored by RULER's
``string_match_all`` (the fraction of expected values present in the answer). Samples are split over
data-parallel replicas. Beside the retrieval scores, each model's perplexity at its original training
length shows what the extension cost at short context.

Outputs in ``--out``: ``report.json``::

    {"scores": {model: {task: {length: score}}}, "average": {model: {length: mean over tasks}},
     "overall": {model: mean over lengths}, "needle": {model: {length: {depth: score}}},
     "perplexity": {model: {"length": L0, "perplexity": p} | null}, "models": {...}, "settings": {...}}

``report.md`` (a task x length table per model, the averages side by side), ``needle.png`` (single-needle
retrieval by length x depth, one panel per model) and ``predictions.jsonl`` (every sample's answer).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from megatron_resonance.cli import check_output_dir
from megatron_resonance.data.tokenizer import load_tokenizer
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation import command_line, loading
from megatron_resonance.evaluation.command_line import RunOptions
from megatron_resonance.evaluation.loading import Scorer
from megatron_resonance.evaluation.perplexity import model_documents, perplexity_by_length
from megatron_resonance.evaluation.plots import fmt, markdown_table, plot_depth_heatmaps
from megatron_resonance.evaluation.resolve import ModelSpec, ResolvedModel, resolve_all
from megatron_resonance.evaluation.ruler import (
    SINGLE_NEEDLE_TASKS,
    TASKS,
    Sample,
    build_samples,
    load_haystack,
    string_match_all,
)
from megatron_resonance.megatron import distributed

REPORT, MARKDOWN, FIGURE, PREDICTIONS = "report.json", "report.md", "needle.png", "predictions.jsonl"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_tasks(text: Optional[str]) -> List[str]:
    """``--tasks`` (comma-separated RULER task names; None: all of them, in RULER's order)."""
    if not text:
        return list(TASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"--tasks: unknown task {', '.join(unknown) or repr(text)}; the tasks are {', '.join(TASKS)}")
    return [t for t in TASKS if t in names]


def budget(task: str, max_new_tokens: Optional[int]) -> int:
    """Answer tokens a task may generate: RULER's budget for it, capped by ``--max-new-tokens``."""
    own = TASKS[task].max_new_tokens
    return min(own, max_new_tokens) if max_new_tokens else own


def build_all(
    tokenizer, tasks: Sequence[str], lengths: Sequence[int], *, progress: bool = False, **settings
) -> List[Sample]:
    """Every sample of the run, in task, length, index order (a progress bar over task x length when it
    takes more than a few seconds: a long prompt takes up to a second to fit to its length; a bad input
    found at the first prompt stays one line). ``settings``: :func:`build_samples`'s (samples, seed,
    depths, haystack, add_bos, chat_template)."""
    out: List[Sample] = []
    with tqdm(
        total=len(tasks) * len(lengths),
        desc="ruler prompts",
        unit="task x length",
        dynamic_ncols=True,
        delay=3,
        disable=not (progress and distributed.is_rank0()),
    ) as bar:
        for task in tasks:
            for L in lengths:
                bar.set_postfix(task=task, length=L, refresh=False)
                out += build_samples(task, tokenizer, L, **settings)
                bar.update()
    return out


def answer(
    scorer: Scorer, samples: Sequence[Sample], tokenizer, *, max_new_tokens: Optional[int] = None, progress: bool = True
) -> List[List[int]]:
    """Each sample's greedy answer tokens (EOS left out). Collective for Megatron scorers: samples are split
    over data-parallel replicas and the answers gathered, so every rank returns all of them."""
    longest = max(budget(s.task, max_new_tokens) for s in samples)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    mine = list(range(len(samples)))[scorer.dp_rank :: scorer.dp_size]
    # token + 1 per answer position, 0 where there is none: replicas fill disjoint rows, a sum gathers them
    table = torch.zeros(len(samples), longest, dtype=torch.long)
    bar = tqdm(
        total=len(mine),
        desc=f"{scorer.model.name} ruler",
        unit="sample",
        disable=not (progress and distributed.is_rank0()),
        dynamic_ncols=True,
    )
    for start in range(0, len(mine), scorer.batch_size):
        rows = mine[start : start + scorer.batch_size]
        limit = max(budget(samples[i].task, max_new_tokens) for i in rows)
        bar.set_postfix(task=samples[rows[0]].task, length=samples[rows[0]].length)
        outputs = scorer.generate([samples[i].tokens for i in rows], limit, stop_ids=stop)
        for i, tokens in zip(rows, outputs):
            tokens = [t for t in tokens if t not in stop][: budget(samples[i].task, max_new_tokens)]
            table[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long) + 1
        bar.update(len(rows))
    bar.close()
    table = scorer.all_reduce(table)
    return [[int(t) - 1 for t in row if t > 0] for row in table]


def score(samples: Sequence[Sample], predictions: Sequence[str]) -> Dict[str, dict]:
    """Scores by task and length, the per-length average over tasks, and single-needle scores by depth."""
    by_cell: Dict[tuple, List[float]] = {}
    by_depth: Dict[tuple, List[float]] = {}
    for s, text in zip(samples, predictions):
        value = string_match_all(text, s.outputs)
        by_cell.setdefault((s.task, s.length), []).append(value)
        if s.task in SINGLE_NEEDLE_TASKS:
            by_depth.setdefault((s.length, s.depth), []).append(value)
    scores: Dict[str, Dict[str, float]] = {}
    for (task, L), values in by_cell.items():
        scores.setdefault(task, {})[str(L)] = sum(values) / len(values)
    lengths = sorted({s.length for s in samples})
    average = {str(L): sum(scores[t][str(L)] for t in scores) / len(scores) for L in lengths}
    needle: Dict[str, Dict[str, float]] = {}
    for (L, depth), values in sorted(by_depth.items()):
        needle.setdefault(str(L), {})[f"{depth:g}"] = sum(values) / len(values)
    return {"scores": scores, "average": average, "overall": sum(average.values()) / len(average), "needle": needle}


# ----------------------------------------------------------------------------------------------------------
# The run: check · samples · generate · report
# ----------------------------------------------------------------------------------------------------------


def run(
    models: Sequence[ModelSpec],
    lengths: Sequence[int],
    *,
    samples: int,
    tasks: Optional[Sequence[str]] = None,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    seed: int = 0,
    haystack: Optional[str] = None,
    chat_template: bool = False,
    add_bos: bool = False,
    max_new_tokens: Optional[int] = None,
    perplexity_data: Optional[str] = None,
    perplexity_documents: int = 16,
    options: Optional[RunOptions] = None,
) -> dict:
    """RULER on ``models`` at ``lengths``; (rank 0) writes the report into ``options.out``; returns it.

    UserError (one line) for bad input before any model is loaded: an unknown task, a length the prompt
    text cannot fit into or memory cannot hold, a haystack too short, a tokenizer that is not the model's."""
    options = options or RunOptions()
    runtime, out, say = options.runtime, options.out, options.say

    # ---------------------------------------------------------------- check
    lengths = sorted(set(int(L) for L in lengths))
    tasks = list(tasks or TASKS)
    if samples < 1:
        raise UserError(f"--samples {samples}: must be >= 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if perplexity_documents < 0:
        raise UserError(f"--perplexity-documents {perplexity_documents}: must be >= 0")
    if not depths:
        raise UserError("--depths: need at least one depth")
    resolved = resolve_all(models, options.tokenizer)
    runtime.check(resolved, lengths)
    if runtime.context_parallel_size > 1:
        raise UserError(
            "--context-parallel-size: RULER answers by greedy decoding, which runs without context "
            "parallelism (megatron's static inference); use --tensor-model-parallel-size or "
            "--pipeline-model-parallel-size for long prompts"
        )
    longest = lengths[-1] + max(budget(task, max_new_tokens) for task in tasks)
    loading.check_memory(resolved, runtime, longest, options.max_memory_gb, generate=True)
    for m in resolved:
        if m.tokenizer is None:
            raise UserError(f"RULER prompts are text and no tokenizer is stored with {m.name}: pass --tokenizer")
    if out:
        check_output_dir(out, "--out")
    haystack_text = load_haystack(haystack)

    # ---------------------------------------------------------------- samples (one set per tokenizer)
    plans: Dict[str, List[Sample]] = {}
    for m in resolved:
        tok = load_tokenizer(m.tokenizer)
        check_tokenizer(m, tok)
        if m.tokenizer not in plans:
            plans[m.tokenizer] = build_all(
                tok,
                tasks,
                lengths,
                samples=samples,
                seed=seed,
                depths=depths,
                haystack=haystack_text,
                add_bos=add_bos,
                chat_template=chat_template,
                progress=options.progress,
            )
        check_tokenizer(m, tok, plans[m.tokenizer])
    documents = model_documents(resolved, perplexity_data, add_bos) if perplexity_documents else {}
    if out:
        command_line.prepare_out(out)

    # ---------------------------------------------------------------- generate
    if any(m.spec.kind == "megatron" for m in resolved):
        loading.initialize(runtime)
    results, answers, answer_tokens, perplexity = {}, {}, {}, {}
    for m in resolved:
        tok, plan = load_tokenizer(m.tokenizer), plans[m.tokenizer]
        say(
            f"[ruler] {m.name}: {m.spec.kind} {m.directory}, {len(tasks)} task(s) x {len(lengths)} length(s) x "
            f"{samples} sample(s)"
        )
        with loading.open_scorer(m, runtime, longest) as scorer:
            tokens = answer(scorer, plan, tok, max_new_tokens=max_new_tokens, progress=options.progress)
            if documents and m.original_length:
                ppl = perplexity_by_length(
                    scorer,
                    documents[m.name],
                    [m.original_length],
                    max_documents=perplexity_documents,
                    seed=seed,
                    progress=False,
                )
                r = ppl[m.original_length]
                perplexity[m.name] = {"length": m.original_length, "perplexity": r.perplexity, "documents": r.documents}
            else:
                perplexity[m.name] = None
        answer_tokens[m.name] = tokens
        answers[m.name] = [tok.decode(t) for t in tokens]
        results[m.name] = score(plan, answers[m.name])

    # ---------------------------------------------------------------- report
    settings = dict(
        tasks=tasks,
        lengths=lengths,
        samples=samples,
        depths=[f"{d:g}" for d in depths],
        seed=seed,
        haystack=haystack or "default: the embedded corpus",
        template="chat" if chat_template else "base",
        add_bos=add_bos,
        max_new_tokens=max_new_tokens,
        metric="string_match_all",
        perplexity_data=perplexity_data or "default: held-out standard-library files",
        perplexity_documents=perplexity_documents,
        tensor_model_parallel_size=runtime.tensor_model_parallel_size,
        pipeline_model_parallel_size=runtime.pipeline_model_parallel_size,
        context_parallel_size=runtime.context_parallel_size,
        dtype=str(runtime.torch_dtype).replace("torch.", ""),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )
    report = {
        key: {m.name: results[m.name][key] for m in resolved} for key in ("scores", "average", "overall", "needle")
    }
    report.update(perplexity=perplexity, models={m.name: m.describe() for m in resolved}, settings=settings)
    if out and distributed.is_rank0():
        write_report(report, resolved, out)
        write_predictions({m.name: plans[m.tokenizer] for m in resolved}, answers, answer_tokens, out)
        say(f"[ruler] wrote {os.path.join(out, REPORT)}, {MARKDOWN}, {FIGURE}, {PREDICTIONS}")
    say(average_table(report))
    return report


def check_tokenizer(model: ResolvedModel, tokenizer, plan: Sequence[Sample] = ()) -> None:
    """One line when the tokenizer cannot be the model's: a larger vocabulary, or prompt ids beyond it."""
    if tokenizer.vocab_size > model.vocab_size:
        raise UserError(
            f"the tokenizer {model.tokenizer} has {tokenizer.vocab_size} tokens, more than "
            f"{model.name}'s vocabulary ({model.vocab_size}): it is not this model's tokenizer"
        )
    top = max((max(s.tokens) for s in plan), default=-1)
    if top >= model.vocab_size:
        raise UserError(
            f"the tokenizer {model.tokenizer} gives id {top}, beyond {model.name}'s vocabulary ({model.vocab_size})"
        )


def average_table(report: dict) -> str:
    lengths = [str(L) for L in report["settings"]["lengths"]]
    rows = [
        [name] + [fmt(by[L], 3) for L in lengths] + [fmt(report["overall"][name], 3)]
        for name, by in report["average"].items()
    ]
    return markdown_table(["model"] + lengths + ["average"], rows)


def write_report(report: dict, resolved: Sequence[ResolvedModel], out: str) -> None:
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    s = report["settings"]
    lengths = [str(L) for L in s["lengths"]]
    needle = {name: {int(L): by for L, by in cells.items()} for name, cells in report["needle"].items() if cells}
    if needle:
        plot_depth_heatmaps(
            needle,
            s["depths"],
            os.path.join(out, FIGURE),
            title="RULER single-needle retrieval",
            original_lengths={m.name: m.original_length for m in resolved},
        )
    lines = [
        "# RULER",
        "",
        f"{len(s['tasks'])} task(s), {s['samples']} sample(s) per task and length, seed {s['seed']}; "
        + ("the tokenizer's chat template." if s["template"] == "chat" else "base-model prompts (no chat template)."),
        f"Haystack: {s['haystack']}. Greedy answers; score = RULER's string_match_all (the fraction of expected "
        "values in the answer), averaged over samples.",
        "",
        "## Average over tasks",
        "",
        average_table(report),
        "",
        "## Perplexity at the original training length",
        "",
        markdown_table(
            ["model", "length", "perplexity", "documents"],
            [
                [name, str(p["length"]), fmt(p["perplexity"]), str(p["documents"])] if p else [name, "—", "—", "—"]
                for name, p in report["perplexity"].items()
            ],
        ),
        "",
    ]
    for name, by_task in report["scores"].items():
        lines += [
            f"## {name}",
            "",
            markdown_table(
                ["task"] + lengths,
                [[task] + [fmt(by_task[task][L], 2) for L in lengths] for task in s["tasks"]]
                + [["**average**"] + [f"**{fmt(report['average'][name][L], 2)}**" for L in lengths]],
            ),
            "",
        ]
    if needle:
        lines += [f"![single-needle retrieval by length and depth]({FIGURE})", ""]
    with open(os.path.join(out, MARKDOWN), "w") as f:
        f.write("\n".join(lines))


def write_predictions(
    plans: Dict[str, Sequence[Sample]],
    answers: Dict[str, Sequence[str]],
    tokens: Dict[str, Sequence[List[int]]],
    out: str,
) -> None:
    """One JSON line per model and sample: the expected values, the answer (text and tokens) and its score
    (RULER's prediction files)."""
    with open(os.path.join(out, PREDICTIONS), "w") as f:
        for name, plan in plans.items():
            for s, text, ids in zip(plan, answers[name], tokens[name]):
                f.write(
                    json.dumps(
                        {
                            "model": name,
                            "task": s.task,
                            "length": s.length,
                            "index": s.index,
                            "depth": s.depth,
                            "prompt_tokens": len(s.tokens),
                            "outputs": s.outputs,
                            "prediction": text,
                            "answer_tokens": ids,
                            "score": string_match_all(text, s.outputs),
                        }
                    )
                    + "\n"
                )
