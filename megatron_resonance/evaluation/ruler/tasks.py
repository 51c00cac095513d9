"""The RULER synthetic tasks: their configurations, prompt templates and sample generators.

Each task is one entry of RULER's ``scripts/synthetic.yaml`` with the template, answer prefix and
``tokens_to_generate`` of ``scripts/data/synthetic/constants.py`` (wording copied exactly). A generator
draws everything random of one sample when it is made (keys, values, chains, word lists) and then renders
the prompt for any haystack size ``n`` (noise sentences, essay words, distractor needles, list words,
coded words): the builder searches the largest ``n`` that fits the requested length.

Follows NVIDIA/RULER (https://github.com/NVIDIA/RULER, Apache-2.0; Hsieh et al. 2024).
"""

from __future__ import annotations

import functools
import math
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from megatron_resonance.evaluation.ruler.haystack import NOISE, Haystack, common_words, key_words, split_sentences

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
    "{type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
    "list?"
)
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"

#: RULER's needle depths (percent) for the needles it places at random: 40 points over 0..100
RULER_DEPTHS = [round(i * 100 / 39) for i in range(40)]


@dataclass(frozen=True)
class TaskConfig:
    """One task of RULER's ``synthetic.yaml``: its family (RULER's script) and arguments."""

    family: str  # "niah", "variable_tracking", "common_words_extraction", "freq_words_extraction"
    max_new_tokens: int  # RULER's tokens_to_generate
    args: Dict[str, object] = field(default_factory=dict)


def _niah(haystack: str, key: str = "words", value: str = "numbers", k: int = 1, v: int = 1, q: int = 1) -> TaskConfig:
    return TaskConfig(
        "niah",
        128,
        dict(
            type_haystack=haystack,
            type_needle_k=key,
            type_needle_v=value,
            num_needle_k=k,
            num_needle_v=v,
            num_needle_q=q,
        ),
    )


#: RULER's synthetic tasks in its order (qa_1 / qa_2 need SQuAD and HotpotQA: not here)
TASKS: Dict[str, TaskConfig] = {
    "niah_single_1": _niah("noise"),
    "niah_single_2": _niah("essay"),
    "niah_single_3": _niah("essay", value="uuids"),
    "niah_multikey_1": _niah("essay", k=4),
    "niah_multikey_2": _niah("needle"),
    "niah_multikey_3": _niah("needle", key="uuids", value="uuids"),
    "niah_multivalue": _niah("essay", v=4),
    "niah_multiquery": _niah("essay", q=4),
    "vt": TaskConfig("variable_tracking", 30, dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": TaskConfig("common_words_extraction", 120, dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": TaskConfig("freq_words_extraction", 50, dict(alpha=2.0)),
}
#: tasks whose sample has a needle depth: the needle holding the first expected value sits there
NEEDLE_TASKS = tuple(name for name, cfg in TASKS.items() if cfg.family == "niah")
#: needle tasks whose answer is one needle (one key, one value), so the depth says where the whole answer is
SINGLE_NEEDLE_TASKS = tuple(
    name for name in NEEDLE_TASKS if TASKS[name].args["num_needle_v"] * TASKS[name].args["num_needle_q"] == 1
)


@dataclass
class Parts:
    """A rendered prompt: ``head + context + tail + answer_prefix`` is the text the model continues."""

    head: str
    context: str
    tail: str
    answer_prefix: str
    outputs: List[str]


class Generator:
    """One sample of a task, rendered for ``n`` haystack units (``min_units`` <= n <= ``max_units``)."""

    min_units = 1

    def render(self, n: int) -> Parts:
        raise NotImplementedError

    def continuation(self, n: int, count: int) -> str:
        """``count`` more units of haystack after the first ``n``, with the joiner before each: the text of
        the token-level fill that closes the gap to the requested length."""
        raise NotImplementedError


def _number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))  # 7 digits


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _key_word(rng: random.Random) -> str:
    adjectives, nouns = key_words()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


_DRAW = {"numbers": _number, "uuids": _uuid, "words": _key_word}


def _insert(units: List[str], items: List[tuple]) -> List[str]:
    """``units`` with each ``(depth, text)`` of ``items`` before unit ``int(len(units) * depth)``."""
    placed = sorted(((int(len(units) * depth), i, text) for i, (depth, text) in enumerate(items)), reverse=True)
    out = list(units)
    for position, _, text in placed:
        out.insert(position, text)
    return out


class Niah(Generator):
    """Needle in a haystack (RULER ``niah.py``): ``num_needle_k`` keys with ``num_needle_v`` values each,
    ``num_needle_q`` keys queried. The needle of the first queried key's first value sits at ``depth``; the
    other needles at depths drawn from RULER's 40 depths, as RULER places all of them."""

    def __init__(self, cfg: TaskConfig, rng: random.Random, depth: float, haystack: Optional[Haystack]):
        a = cfg.args
        self.kind, value_type = a["type_haystack"], a["type_needle_v"]
        draw_key, draw_value = _DRAW[a["type_needle_k"]], _DRAW[value_type]
        num_keys = max(a["num_needle_k"], a["num_needle_q"])
        keys = [draw_key(rng) for _ in range(num_keys)]
        values = [[draw_value(rng) for _ in range(a["num_needle_v"])] for _ in keys]
        queried = rng.sample(range(num_keys), a["num_needle_q"])
        first = (queried[0], 0)
        others = [(i, j) for i in range(num_keys) for j in range(a["num_needle_v"]) if (i, j) != first]
        depths = [depth] + [d / 100 for d in rng.sample(RULER_DEPTHS, len(others))]
        self.needles = [
            (d, NEEDLE.format(type_needle_v=value_type, key=keys[i], value=values[i][j]))
            for d, (i, j) in zip(depths, [first] + others)
        ]
        self.outputs = [value for i in queried for value in values[i]]
        query = [keys[i] for i in queried]
        query = ", ".join(query[:-1]) + ", and " + query[-1] if len(query) > 1 else query[0]
        template, answer, shown_type = NIAH_TEMPLATE, NIAH_ANSWER, value_type
        if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER's singular wording
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template, answer = template.replace(old, new), answer.replace(old, new)
            shown_type = value_type[:-1]
        head, tail = template.split("{context}")
        fields = dict(type_needle_v=shown_type, query=query)
        self.head, self.tail, self.answer = head.format(**fields), tail.format(**fields), answer.format(**fields)
        self.haystack = haystack
        self.joiner = " " if self.kind == "essay" else "\n"
        if self.kind == "needle":  # distractor needles, drawn in order from their own stream
            self._stream = random.Random(rng.getrandbits(64))
            self._distractors: List[str] = []
            self._draw = lambda: NEEDLE.format(
                type_needle_v=value_type, key=draw_key(self._stream), value=draw_value(self._stream)
            )

    def _units(self, start: int, stop: int) -> List[str]:
        if self.kind == "noise":
            return [NOISE] * (stop - start)
        if self.kind == "needle":
            while len(self._distractors) < stop:
                self._distractors.append(self._draw())
            return self._distractors[start:stop]
        return self.haystack.words[start:stop]

    def render(self, n: int) -> Parts:
        units = self._units(0, n)
        if self.kind == "essay":
            units = split_sentences(" ".join(units))
        context = self.joiner.join(_insert(units, self.needles))
        return Parts(self.head, context, self.tail, self.answer, self.outputs)

    def continuation(self, n: int, count: int) -> str:
        return "".join(self.joiner + unit for unit in self._units(n, n + count))


def _variables(rng: random.Random, count: int, letters: int) -> List[str]:
    names: List[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


class VariableTracking(Generator):
    """Variable tracking (RULER ``variable_tracking.py``, noise haystack): one chain ``VAR A = 12345``,
    ``VAR B = VAR A``, ... of ``num_hops`` hops among noise sentences, after one solved example with
    three-letter names (RULER's in-context example, sized by ``example_units`` noise sentences)."""

    def __init__(self, cfg: TaskConfig, rng: random.Random, example_units: int):
        hops = cfg.args["num_hops"]
        self.min_units = hops + 1  # RULER draws distinct positions among the noise sentences
        self.outputs, chain, value = self._chain(rng, hops, 5)
        self.chain = chain
        self.seed = rng.getrandbits(64)  # chain positions, drawn again for every n
        example_names, example_chain, example_value = self._chain(rng, hops, 3)
        example = self._context(example_chain, example_units, random.Random(rng.getrandbits(64)))
        head, tail = VT_TEMPLATE.split("{context}")
        answer = VT_ANSWER.format(num_v=hops + 1, query=example_value)
        self.example = f"{head}{example}{tail.format(query=example_value)}{answer} {' '.join(example_names)}\n"
        self.head = self.example + "\n" + head
        self.tail, self.answer = tail.format(query=value), VT_ANSWER.format(num_v=hops + 1, query=value)

    @staticmethod
    def _chain(rng: random.Random, hops: int, letters: int):
        names = _variables(rng, hops + 1, letters)
        value = str(rng.randrange(10000, 99999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
        return names, chain, value

    @staticmethod
    def _context(chain: List[str], n: int, rng: random.Random) -> str:
        sentences = [NOISE] * n
        for j, position in enumerate(sorted(rng.sample(range(n), len(chain)))):
            sentences.insert(position + j, chain[j])
        return "\n".join(sentences).replace(". \n", ".\n")

    def render(self, n: int) -> Parts:
        context = self._context(self.chain, n, random.Random(self.seed + n))
        return Parts(self.head, context, self.tail, self.answer, self.outputs)

    def continuation(self, n: int, count: int) -> str:
        return ("\n" + NOISE) * count

    @classmethod
    def example_tokens(cls, cfg: TaskConfig, units: int, count: Callable[[str], int]) -> int:
        """Tokens of the in-context example with ``units`` noise sentences (its names and value drawn from a
        fixed seed: only its size matters here)."""
        return count(cls(cfg, random.Random(0), units).example)


def _numbered(words: List[str], start: int = 1) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, start))


class CommonWords(Generator):
    """Common words extraction (RULER ``common_words_extraction.py``): a numbered list in which
    ``num_cw`` words appear ``freq_cw`` times and ``n - num_cw`` others ``freq_ucw`` times, after one solved
    example. Below 4096 tokens RULER's short setting: 6 and 1 times, the example 20 words 3 and 1 times;
    from 4096 on 30 and 3 times, the example 40 words 10 and 3 times."""

    def __init__(self, cfg: TaskConfig, rng: random.Random, length: int):
        a = cfg.args
        self.num_cw = a["num_cw"]
        self.min_units = self.num_cw + 1
        short = length < 4096
        self.repeats = (6, 1) if short else (a["freq_cw"], a["freq_ucw"])
        chosen = rng.sample(common_words(), 20 if short else 40)
        example = self._words(chosen, (3, 1) if short else (10, 3), rng)
        head, self.tail = CWE_TEMPLATE.split("{context}")
        self.head = f"{head}{_numbered(example)}{self.tail}{CWE_ANSWER} {_numbered(chosen[: self.num_cw])}\n{head}"
        # the sample's distinct words in a fixed order: n of them are its first n, so a larger n adds words
        self.order = rng.sample(common_words(), len(common_words()))
        self.seed = rng.getrandbits(64)

    def _words(self, chosen: List[str], repeats, rng: random.Random) -> List[str]:
        """The shuffled list: the first ``num_cw`` of ``chosen`` ``repeats[0]`` times, the others
        ``repeats[1]`` times."""
        words = chosen[: self.num_cw] * repeats[0] + chosen[self.num_cw :] * repeats[1]
        rng.shuffle(words)
        return words

    def _chosen(self, n: int) -> List[str]:
        if n <= len(self.order):
            return self.order[:n]
        # more distinct words than wonderwords has: adjective-noun pairs (RULER: a word list it ships)
        adjectives, nouns = key_words()
        pairs = random.Random(self.seed).sample(range(len(adjectives) * len(nouns)), n - len(self.order))
        return self.order + [f"{adjectives[i // len(nouns)]}-{nouns[i % len(nouns)]}" for i in pairs]

    def render(self, n: int) -> Parts:
        chosen = self._chosen(n)
        words = self._words(chosen, self.repeats, random.Random(self.seed + n))
        return Parts(self.head, _numbered(words), self.tail, CWE_ANSWER, chosen[: self.num_cw])

    def continuation(self, n: int, count: int) -> str:
        """More entries with the uncommon words, cycling through them (the fill uses a few entries: one
        more occurrence of a few uncommon words, so the common words stay the most common)."""
        uncommon = self._chosen(n)[self.num_cw :]
        entries = self.num_cw * self.repeats[0] + len(uncommon) * self.repeats[1]
        return " " + _numbered([uncommon[i % len(uncommon)] for i in range(count)], entries + 1)


@functools.lru_cache(maxsize=4)
def _zeta(alpha: float) -> float:
    """Riemann zeta (alpha > 1): the sum to 10^5 and the integral of the rest (RULER: scipy.special.zeta)."""
    terms = 100_000
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


class FrequentWords(Generator):
    """Frequent words extraction (RULER ``freq_words_extraction.py``): ``length // 50`` coded words of six
    letters; word ``k`` appears ``int(n * k**-alpha / zeta(alpha))`` times among ``n`` draws; the first
    ranked is the noise word ``...``, the answer the next three."""

    def __init__(self, cfg: TaskConfig, rng: random.Random, length: int):
        self.alpha = cfg.args["alpha"]
        size = max(length // 50, 4)
        vocab = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(vocab)
        rng.shuffle(vocab)
        vocab[0] = "..."
        self.vocab, self.outputs = vocab, vocab[1:4]
        self.zeta = _zeta(self.alpha)
        self.seed = rng.getrandbits(64)
        self.min_units = math.ceil(4**self.alpha * self.zeta)  # the fourth word appears once
        self.head, self.tail = FWE_TEMPLATE.split("{context}")

    def render(self, n: int) -> Parts:
        words = [w for k, w in enumerate(self.vocab, 1) for _ in range(int(n * k**-self.alpha / self.zeta))]
        random.Random(self.seed + n).shuffle(words)
        return Parts(self.head, " ".join(words), self.tail, FWE_ANSWER, self.outputs)

    def continuation(self, n: int, count: int) -> str:
        return " ..." * count
