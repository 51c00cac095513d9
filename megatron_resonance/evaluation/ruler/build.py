"""Samples of the RULER tasks in a model's own tokens, each prompt exactly the requested length.

**Length.** RULER's ``max_seq_length`` counts the prompt *and* ``tokens_to_generate``: it binary-searches
the haystack size so that ``len(prompt) + tokens_to_generate <= max_seq_length``. Here ``length`` is the
prompt itself (template, haystack, question, answer prefix, BOS and chat template included), so a length
sweep measures the model at the context length it is asked about; generation runs past it by at most
``max_new_tokens``. For one sample the builder searches the largest haystack size ``n`` (noise sentences,
essay words, distractor needles, list words or coded words) whose whole prompt, encoded as one text as
RULER does, is at most ``length`` tokens; then it closes the remaining gap (less than one haystack unit,
or the rounding of a coarse unit) with a *token-level fill*: the first tokens of more haystack of the same
kind, inserted at the end of the context (before the question). Every prompt is then exactly ``length``
tokens. The fill's tokens come from encoding the prompt's text up to the end of the context followed by the
extra haystack, so they join the context the way the tokenizer joins running text; they go in at the last
token boundary that the prompt, its context alone and the extended context share, so the question after
them is token for token as encoded. The fill ends in the middle of a unit (a word cut short), and the few
characters of the context after that boundary (often just its final ``.``) appear once more after it.

**Depths.** RULER draws each needle's depth at random from 40 depths over 0..100 %. Here sample ``i`` of a
needle task puts the needle of the first expected value at ``depths[i % len(depths)]`` (0: the start of the
context, 1: its end; it goes before sentence ``int(depth * sentences)`` as RULER inserts), and every other
needle (distractors, further values, further queried keys) at RULER's random depths.

**Determinism.** Everything random in a sample comes from ``random.Random(f"ruler/{task}/{length}/{seed}/
{index}")``: the same task, length, index and seed give the same sample (with the same tokenizer, haystack
and depths) whatever else is built.

Follows NVIDIA/RULER (https://github.com/NVIDIA/RULER, Apache-2.0; Hsieh et al. 2024).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from megatron_resonance.errors import UserError
from megatron_resonance.evaluation.passkey import DEFAULT_DEPTHS
from megatron_resonance.evaluation.ruler.haystack import Haystack, load_haystack
from megatron_resonance.evaluation.ruler.tasks import (
    NEEDLE_TASKS,
    TASKS,
    CommonWords,
    FrequentWords,
    Generator,
    Niah,
    Parts,
    VariableTracking,
)

#: RULER sizes variable tracking's solved example to 500 tokens; here also to at most this share of the length
VT_EXAMPLE_TOKENS, VT_EXAMPLE_SHARE = 500, 0.25
_CHAT_SLOT = "\x00RULER-PROMPT\x00"


@dataclass
class Sample:
    """One prompt of ``length`` tokens and what a correct answer must contain."""

    task: str
    length: int
    index: int
    depth: Optional[float]
    """Depth (0..1) of the needle holding ``outputs[0]``; None for tasks without needles."""
    tokens: List[int]
    """The whole prompt: BOS (when asked for), chat template, task template and answer prefix."""
    outputs: List[str]
    """The expected values (RULER's ``outputs``); scored by :func:`string_match_all`."""
    max_new_tokens: int
    """RULER's ``tokens_to_generate`` for the task."""
    answer_prefix: str
    """The answer's start, already at the end of ``tokens`` (RULER's ``answer_prefix``)."""
    fill_tokens: int = 0
    """Tokens of the token-level fill at the end of the context (see the module docstring)."""


class _Prompt:
    """Text around a task prompt (chat template) and its encoding with optional BOS."""

    def __init__(self, tokenizer, add_bos: bool, chat_template: bool):
        if add_bos and tokenizer.bos_id is None:
            raise UserError(f"add_bos: the tokenizer {tokenizer.path} has no BOS token")
        self.tokenizer = tokenizer
        self.before = self.after = ""
        if chat_template:
            self.before, self.after = _chat_wrapping(tokenizer)
        bos_text = tokenizer.id_to_piece(tokenizer.bos_id) if add_bos else None
        self.bos = [tokenizer.bos_id] if add_bos and not self.before.startswith(bos_text) else []

    def encode(self, text: str) -> List[int]:
        return self.bos + self.tokenizer.encode(text)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def up_to_context_end(self, parts: Parts) -> str:
        return self.before + parts.head + parts.context

    def text(self, parts: Parts) -> str:
        return self.up_to_context_end(parts) + parts.tail + self.after + parts.answer_prefix


def _chat_wrapping(tokenizer) -> tuple:
    """The tokenizer's chat template around one user message, split at the message: (before, after)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not getattr(hf, "chat_template", None):
        raise UserError(f"--chat-template: the tokenizer {tokenizer.path} has no chat template")
    rendered = hf.apply_chat_template(
        [{"role": "user", "content": _CHAT_SLOT}], tokenize=False, add_generation_prompt=True
    )
    if rendered.count(_CHAT_SLOT) != 1:
        raise UserError(f"--chat-template: the chat template of {tokenizer.path} does not show the user message as is")
    before, after = rendered.split(_CHAT_SLOT)
    return before, after


def _largest_fitting(count: Callable[[int], int], lo: int, hi: int, limit: int) -> Optional[int]:
    """The largest ``n`` in ``[lo, hi]`` with ``count(n) <= limit`` for a nondecreasing ``count`` (None when
    not even ``lo`` fits): a guess from the token rate, a galloping bracket around it, then bisection."""
    base = count(lo)
    if base > limit:
        return None
    guess = lo
    for probe in (min(lo + 16, hi), None):
        probe = guess if probe is None else probe
        if probe > lo:
            rate = (count(probe) - base) / (probe - lo)
            if rate > 0:
                guess = min(hi, max(lo, lo + int((limit - base) / rate)))
    if count(guess) <= limit:
        good, step = guess, 1
        while good + step <= hi and count(good + step) <= limit:
            good, step = good + step, step * 2
        bad = min(good + step, hi + 1)
    else:
        bad, step = guess, 1
        while bad - step > lo and count(bad - step) > limit:
            bad, step = bad - step, step * 2
        good = max(bad - step, lo)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if count(mid) <= limit else (good, mid)
    return good


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def _vt_example_units(prompt: _Prompt, length: int) -> int:
    """Noise sentences of variable tracking's solved example: as many as fit its token budget (RULER: the
    example alone fits 500 tokens), at least one per chain statement."""
    cfg = TASKS["vt"]
    budget = min(VT_EXAMPLE_TOKENS, int(length * VT_EXAMPLE_SHARE))
    low = cfg.args["num_hops"] + 1

    def count(text: str) -> int:
        return len(prompt.tokenizer.encode(text))

    found = _largest_fitting(lambda m: VariableTracking.example_tokens(cfg, m, count), low, 4 * budget + low, budget)
    return found or low


def _generator(
    task: str, rng: random.Random, length: int, depth: Optional[float], haystack: Haystack, shared: Dict[str, object]
) -> Generator:
    cfg = TASKS[task]
    if cfg.family == "niah":
        return Niah(cfg, rng, depth, haystack)
    if cfg.family == "variable_tracking":
        return VariableTracking(cfg, rng, shared["vt_example_units"])
    if cfg.family == "common_words_extraction":
        return CommonWords(cfg, rng, length)
    return FrequentWords(cfg, rng, length)


def _check(task: str, length: int, samples: int, depths: Sequence[float]) -> None:
    if task not in TASKS:
        raise UserError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    if length < 1:
        raise UserError(f"length {length}: must be >= 1")
    if samples < 1:
        raise UserError(f"samples {samples}: must be >= 1")
    if not depths:
        raise UserError("--depths: need at least one depth")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise UserError(f"--depths: {bad[0]:g} is outside [0, 1]")


def build_samples(
    task: str,
    tokenizer,
    length: int,
    *,
    samples: int = 1,
    seed: int = 0,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    haystack: Optional[Haystack] = None,
    add_bos: bool = False,
    chat_template: bool = False,
) -> List[Sample]:
    """Samples ``0 .. samples - 1`` of ``task`` at ``length`` tokens (see the module docstring).

    Args:
        task: a name of :data:`TASKS`.
        tokenizer: a :class:`~megatron_resonance.data.tokenizer.Tokenizer`.
        length: tokens of every prompt.
        depths: needle depths (0..1) cycled over the samples of a needle task; ignored otherwise.
        haystack: the essay haystack (:func:`load_haystack`); None: the embedded standard-library prose.
        add_bos: start with the tokenizer's BOS (not twice when the chat template writes it).
        chat_template: wrap the task prompt as the user turn of the tokenizer's chat template, the answer
            prefix after the assistant turn's start; otherwise RULER's "base" template (no wrapping).

    Raises:
        UserError: unknown task, bad arguments, a length below the task's fixed text, a haystack too short
            for ``length``, no chat template (one line each).
    """
    _check(task, length, samples, depths)
    prompt = _Prompt(tokenizer, add_bos, chat_template)
    cfg = TASKS[task]
    if cfg.args.get("type_haystack") == "essay" and haystack is None:
        haystack = load_haystack(None)
    shared: Dict[str, object] = {}
    if task == "vt":
        shared["vt_example_units"] = _vt_example_units(prompt, length)
    out = []
    for index in range(samples):
        depth = depths[index % len(depths)] if task in NEEDLE_TASKS else None
        rng = random.Random(f"ruler/{task}/{length}/{seed}/{index}")
        generator = _generator(task, rng, length, depth, haystack, shared)
        essay = isinstance(generator, Niah) and generator.kind == "essay"
        tokens, fill, parts = _fit_sample(task, generator, prompt, length, haystack if essay else None)
        out.append(
            Sample(
                task=task,
                length=length,
                index=index,
                depth=depth,
                tokens=tokens,
                outputs=list(parts.outputs),
                max_new_tokens=cfg.max_new_tokens,
                answer_prefix=parts.answer_prefix,
                fill_tokens=fill,
            )
        )
    return out


def _fit_sample(task: str, generator: Generator, prompt: _Prompt, length: int, haystack: Optional[Haystack]) -> tuple:
    """(tokens, fill tokens, parts) of the largest haystack that fits ``length``, then filled to it exactly."""
    encoded: Dict[int, List[int]] = {}

    def encode(n: int) -> List[int]:
        if n not in encoded:
            encoded[n] = prompt.encode(prompt.text(generator.render(n)))
        return encoded[n]

    lo = generator.min_units
    if haystack is not None:
        hi = haystack.ensure(3 * length + 64)
        if hi < lo:
            raise haystack.too_short(task, length, 0)
    else:
        hi = 8 * length + 64
    n = _largest_fitting(lambda m: len(encode(m)), lo, hi, length)
    if n is None:
        raise UserError(
            f"length {length} is too short for {task}: its prompt with the least haystack is "
            f"{len(encode(lo))} tokens with this tokenizer"
        )
    tokens, parts = encode(n), generator.render(n)
    missing = length - len(tokens)
    if not missing:
        return tokens, 0, parts
    head = prompt.up_to_context_end(parts)
    # tokens[:start] is a prefix of the context; the text after it (a few characters of the context's end,
    # then the question) stays as it was, so the template is intact
    start = _common_prefix(tokens, prompt.encode(head))
    count = missing + 1
    while True:
        if haystack is not None:
            haystack.ensure(n + count)
        extended = prompt.encode(head + generator.continuation(n, count))
        start = min(start, _common_prefix(tokens, extended))
        if len(extended) - start >= missing:
            return tokens[:start] + extended[start : start + missing] + tokens[start:], missing, parts
        if haystack is not None and len(haystack.words) < n + count:
            raise haystack.too_short(task, length, len(tokens))
        count *= 2
