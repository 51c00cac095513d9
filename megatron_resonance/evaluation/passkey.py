"""Passkey retrieval: can the model repeat a 5-digit key hidden at a given depth of a long prompt?

    python tools/eval_passkey.py --hf hf/llama2-7b-32k --add-bos --lengths 4096,8192,16384,32768 \
        --trials 20 --out eval/passkey
    torchrun --nproc-per-node 2 tools/eval_passkey.py --load CKPT --tensor-model-parallel-size 2 \
        --lengths 1024,2048 --trials 10 --depths 0,0.5,1 --out eval/passkey

The prompt (Mohtashami & Jaggi 2023, as used by YaRN and Resonance RoPE), built in token space::

    [BOS] INTRO  filler[:a]  NEEDLE  filler[a:F]  QUESTION ANSWER

INTRO: "There is an important info hidden inside a lot of irrelevant text. ...", filler: "The grass is
green. The sky is blue. ..." repeated and cut to F tokens, NEEDLE: "The pass key is 12345. Remember it.
12345 is the pass key.", QUESTION: "What is the pass key? The pass key is", ANSWER: the key's tokens.
F makes the whole prompt exactly L tokens; the needle starts ``a = round(depth * F)`` filler tokens in,
so depth 0 puts it right after the intro and depth 1 right before the question.

**Scoring: teacher-forced greedy match.** One forward pass over the L tokens; a trial is correct when
every answer token is the arg-max of its prediction. That is exactly "greedy decoding emits the key's
tokens first" (each greedy step would see the same prefix), without a decode loop, so it runs through
megatron's pipeline schedules and batches like perplexity. ``answer_nll`` (mean NLL per answer token)
is reported too: it moves before accuracy does on weak models.

Keys are drawn from ``random.Random(f"{seed}/{length}/{depth}/{trial}")``: the same prompts for every
model, run and parallel layout. ``report.json``::

    {"accuracy": {"1024": 0.9, ...}, "by_depth": {"1024": {"0": 1.0, "0.5": 0.8, ...}, ...},
     "answer_nll": {"1024": 0.12, ...}, "model": {...}, "settings": {...}}

and ``passkey.png``, a heatmap of accuracy by length (columns) and depth (rows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from megatron_resonance.data.tokenizer import load_tokenizer
from megatron_resonance.errors import UserError
from megatron_resonance.evaluation import command_line, loading
from megatron_resonance.evaluation.command_line import RunOptions
from megatron_resonance.evaluation.loading import Scorer
from megatron_resonance.evaluation.plots import fmt, markdown_table, plot_passkey
from megatron_resonance.evaluation.resolve import ModelSpec, resolve_all
from megatron_resonance.megatron import distributed

REPORT, MARKDOWN, FIGURE = "report.json", "report.md", "passkey.png"

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. "
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass
class PasskeyPrompt:
    """One prompt of exactly ``len(tokens)`` tokens with the key at ``depth``."""

    tokens: List[int]
    key: str
    depth: float
    needle_start: int
    """Index of the needle sentence's first token."""
    needle_end: int
    filler_start: int
    """Index of the first filler token (after BOS and the intro)."""
    filler_tokens: int
    """F: filler tokens in the prompt (the needle sits after round(depth * F) of them)."""
    answer_start: int
    """Index of the first answer token; the answer runs to the end."""

    @property
    def answer(self) -> List[int]:
        return self.tokens[self.answer_start :]


class PromptBuilder:
    """Builds :class:`PasskeyPrompt` s with ``tokenizer`` (``encode``/``decode``; optional BOS)."""

    def __init__(self, tokenizer, *, add_bos: bool = False):
        if add_bos and tokenizer.bos_id is None:
            raise UserError("--add-bos: the tokenizer has no BOS token")
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_id] if add_bos else []
        self.intro = tokenizer.encode(INTRO)
        self.filler_unit = tokenizer.encode(FILLER)

    def question_and_answer(self, key: str):
        """Tokens of ``QUESTION + " " + key`` split into question and answer: the answer is the shortest
        token suffix that decodes to the key (so the split follows the tokenizer's own merges)."""
        tail = self.tokenizer.encode(f"{QUESTION} {key}")
        for k in range(1, len(tail)):
            if self.tokenizer.decode(tail[-k:]).strip() == key:
                return tail[:-k], tail[-k:]
        raise UserError(f"the tokenizer merges the key {key} with the question text; cannot score it")

    def fixed_tokens(self, key: str = "12345") -> int:
        """Tokens of everything but the filler: the shortest possible prompt."""
        question, answer = self.question_and_answer(key)
        return (
            len(self.bos)
            + len(self.intro)
            + len(self.tokenizer.encode(NEEDLE.format(key=key)))
            + len(question)
            + len(answer)
        )

    def build(self, length: int, depth: float, key: str) -> PasskeyPrompt:
        if not 0.0 <= depth <= 1.0:
            raise UserError(f"depth {depth} is outside [0, 1]")
        needle = self.tokenizer.encode(NEEDLE.format(key=key))
        question, answer = self.question_and_answer(key)
        filler_count = length - len(self.bos) - len(self.intro) - len(needle) - len(question) - len(answer)
        if filler_count < 0:
            raise UserError(
                f"length {length} is shorter than the passkey prompt without filler ({length - filler_count} tokens)"
            )
        repeats = -(-filler_count // len(self.filler_unit)) if filler_count else 0
        filler = (self.filler_unit * repeats)[:filler_count]
        before = round(depth * filler_count)
        head = self.bos + self.intro
        tokens = head + filler[:before] + needle + filler[before:] + question + answer
        assert len(tokens) == length
        needle_start = len(head) + before
        return PasskeyPrompt(
            tokens=tokens,
            key=key,
            depth=depth,
            needle_start=needle_start,
            needle_end=needle_start + len(needle),
            filler_start=len(head),
            filler_tokens=filler_count,
            answer_start=length - len(answer),
        )


def passkey(seed: int, length: int, depth: float, trial: int) -> str:
    """The 5-digit key of one trial (string-seeded ``random.Random``: stable across runs and platforms)."""
    return str(random.Random(f"{seed}/{length}/{depth:g}/{trial}").randint(10000, 99999))


def depth_key(depth: float) -> str:
    return f"{depth:g}"


def evaluate_passkey(
    scorer: Scorer,
    builder: PromptBuilder,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    *,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, dict]:
    """Accuracy by length and depth, and the mean answer NLL (see the module docstring). Collective for
    Megatron scorers; every rank returns the same result."""
    plan = {}
    for L in lengths:
        cells = [(d, t) for d in depths for t in range(trials)]
        plan[L] = [builder.build(L, d, passkey(seed, L, d, t)) for d, t in cells]
    groups = {L: list(range(0, len(p), scorer.batch_size))[scorer.dp_rank :: scorer.dp_size] for L, p in plan.items()}
    bar = tqdm(
        total=sum(len(g) for g in groups.values()),
        desc=f"{scorer.model.name} passkey",
        unit="batch",
        disable=not (progress and distributed.is_rank0()),
        dynamic_ncols=True,
    )
    accuracy, by_depth, answer_nll = {}, {}, {}
    for L, prompts in plan.items():
        bar.set_postfix(length=L)
        result = torch.zeros(len(prompts), 2, dtype=torch.float64)  # correct, answer NLL
        for g in groups[L]:
            batch = prompts[g : g + scorer.batch_size]
            scores = scorer.scores(torch.tensor([p.tokens for p in batch]))
            for row, p in enumerate(batch):
                predictions = slice(p.answer_start - 1, L - 1)  # prediction j is of token j + 1
                result[g + row, 0] = float(bool(scores.greedy[row, predictions].all()))
                result[g + row, 1] = scores.nll[row, predictions].double().mean()
            bar.update()
        result = scorer.all_reduce(result)
        accuracy[str(L)] = float(result[:, 0].mean())
        answer_nll[str(L)] = float(result[:, 1].mean())
        by_depth[str(L)] = {
            depth_key(d): float(result[[i for i, p in enumerate(prompts) if p.depth == d], 0].mean()) for d in depths
        }
    bar.close()
    return {"accuracy": accuracy, "by_depth": by_depth, "answer_nll": answer_nll}


# ----------------------------------------------------------------------------------------------------------
# The run: check · prompts · evaluate · report
# ----------------------------------------------------------------------------------------------------------


def parse_depths(text: str) -> List[float]:
    depths = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--depths {text!r}: {item.strip()!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--depths {text!r}: {value:g} is outside [0, 1]")
        depths.append(value)
    return sorted(set(depths))


def run(
    model: ModelSpec,
    lengths: Sequence[int],
    *,
    trials: int,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    seed: int = 0,
    add_bos: bool = False,
    options: Optional[RunOptions] = None,
) -> dict:
    """Passkey retrieval of ``model`` at ``lengths``; (rank 0) writes the report into ``options.out``; returns
    it."""
    options = options or RunOptions()
    runtime, out, say = options.runtime, options.out, options.say

    # ---------------------------------------------------------------- check
    lengths = sorted(set(int(L) for L in lengths))
    if trials < 1:
        raise UserError(f"--trials {trials}: must be >= 1")
    if not depths:
        raise UserError("--depths: need at least one depth")
    (resolved,) = resolve_all([model], options.tokenizer)
    runtime.check([resolved], lengths)
    if resolved.tokenizer is None:
        raise UserError(f"passkey prompts are text and no tokenizer is stored with {resolved.name}: pass --tokenizer")
    builder = PromptBuilder(load_tokenizer(resolved.tokenizer), add_bos=add_bos)
    shortest = builder.fixed_tokens()
    if lengths[0] < shortest:
        raise UserError(
            f"--lengths: {lengths[0]} is shorter than the passkey prompt without filler "
            f"({shortest} tokens with this tokenizer)"
        )
    loading.check_memory([resolved], runtime, lengths[-1], options.max_memory_gb)
    if max(builder.build(shortest + len(builder.filler_unit), 0.5, "12345").tokens) >= resolved.vocab_size:
        raise UserError(
            f"the tokenizer {resolved.tokenizer} gives ids beyond {resolved.name}'s vocabulary ({resolved.vocab_size})"
        )
    if out:
        command_line.prepare_out(out)

    # ---------------------------------------------------------------- evaluate
    if resolved.spec.kind == "megatron":
        loading.initialize(runtime)
    say(
        f"[passkey] {resolved.name}: {resolved.spec.kind} {resolved.directory}, {trials} trial(s) x "
        f"{len(depths)} depth(s) per length"
    )
    with loading.open_scorer(resolved, runtime, lengths[-1]) as scorer:
        result = evaluate_passkey(scorer, builder, lengths, depths, trials, seed=seed, progress=options.progress)

    # ---------------------------------------------------------------- report
    report = {
        **result,
        "model": {"name": resolved.name, **resolved.describe()},
        "settings": dict(
            lengths=lengths,
            depths=[depth_key(d) for d in depths],
            trials=trials,
            seed=seed,
            add_bos=add_bos,
            scoring="teacher-forced greedy match of every answer token",
            tensor_model_parallel_size=runtime.tensor_model_parallel_size,
            pipeline_model_parallel_size=runtime.pipeline_model_parallel_size,
            context_parallel_size=runtime.context_parallel_size,
            dtype=str(runtime.torch_dtype).replace("torch.", ""),
        ),
    }
    if out and distributed.is_rank0():
        write_report(report, resolved.original_length, out)
        say(f"[passkey] wrote {os.path.join(out, REPORT)}, {MARKDOWN}, {FIGURE}")
    say(
        markdown_table(
            ["length", "accuracy", "answer NLL"],
            [[L, fmt(report["accuracy"][L]), fmt(report["answer_nll"][L])] for L in report["accuracy"]],
        )
    )
    return report


def write_report(report: dict, original_length: Optional[int], out: str) -> None:
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    s, name = report["settings"], report["model"]["name"]
    plot_passkey(
        {int(L): v for L, v in report["by_depth"].items()},
        s["depths"],
        os.path.join(out, FIGURE),
        title=f"Passkey retrieval: {name}",
        original_length=original_length,
    )
    header = ["length", "accuracy", "answer NLL"] + [f"depth {d}" for d in s["depths"]]
    rows = [
        [L, fmt(report["accuracy"][L], 2), fmt(report["answer_nll"][L])]
        + [fmt(report["by_depth"][L][d], 2) for d in s["depths"]]
        for L in report["accuracy"]
    ]
    lines = [
        f"# Passkey retrieval: {name}",
        "",
        f"{s['trials']} trial(s) per length and depth, seed {s['seed']}; a trial counts when every answer token is "
        f"the greedy choice (teacher-forced). Original training length: {original_length}.",
        "",
        markdown_table(header, rows),
        "",
        f"![passkey accuracy]({FIGURE})",
        "",
    ]
    with open(os.path.join(out, MARKDOWN), "w") as f:
        f.write("\n".join(lines))
