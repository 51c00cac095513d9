"""One tiny model pair and one batch of tool runs, shared by the evaluation tests (built once per session).

1. In this process: a SentencePiece tokenizer (vocabulary 400) and the data: ``tokens.jsonl`` (random ids,
   documents of 10..130 tokens) and ``text.jsonl`` (standard-library text of various sizes).
2. ``workers/run_tools.py`` (one process): a tiny random Megatron checkpoint (YaRN x2 over 32 positions,
   vocabulary 400 padded to 512), its direct-forward reference perplexity, its Hugging Face export through
   ``tools/convert_megatron_to_hf.py``, an indexed dataset of ``text.jsonl``; then the tools' ``main`` for
   every single-process run below.
3. ``workers/run_tools.py`` under torchrun (2 processes): the same evaluations at TP=2, PP=2, DP=2 and CP=2
   (RULER at PP=2 and DP=2: greedy decoding runs without CP).

Both worker runs also generate greedily from ``GENERATION_PROMPTS`` through ``scorer.generate``: the
checkpoint and its export in the one process, TP=2, PP=2 and CP=2 (refused) under torchrun
(``Session.generation``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_resonance.evaluation.passkey import FILLER, INTRO, NEEDLE, QUESTION
from tests.launch import REPO, torchrun

WORKER = Path(__file__).parent / "workers" / "run_tools.py"
VOCAB = 400
LENGTHS = [16, 32, 64, 96]
DOC_LENGTHS = [10, 20, 40, 70, 100, 130]
PASSKEY_LENGTHS = "200,256"
RULER_LENGTHS = "1800,2600"
RULER_PARALLEL_TASKS = "niah_single_1,niah_multikey_2,vt,cwe,fwe"
STDLIB_FILES = ["textwrap.py", "bisect.py", "colorsys.py", "string.py", "fnmatch.py"]
#: greedy generation: two prompts of one length (decoded as one batch) and a shorter one, continued past
#: the rope's original 32 positions up to the model's 64
GENERATION_PROMPT_LENGTHS = [40, 23, 40]
GENERATION_NEW_TOKENS = 20


def stdlib_text(name: str) -> str:
    import sysconfig

    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


def train_test_tokenizer(directory: Path) -> Path:
    from megatron_resonance.data.tokenizer import train_tokenizer

    corpus = directory / "tokenizer_corpus.jsonl"
    texts = [INTRO + FILLER * 3 + NEEDLE.format(key="12345") + QUESTION + " 67890"] * 5
    texts += [stdlib_text(n) for n in STDLIB_FILES]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return train_tokenizer([corpus], directory / "tokenizer", vocab_size=VOCAB, num_threads=1)


class Session:
    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = root / "tokenizer.model"
        self.tokens = root / "tokens.jsonl"
        self.text = root / "text.jsonl"
        self.indexed = root / "indexed" / "text_document"
        self.ckpt = root / "ckpt"
        self.hf = root / "hf_export"
        self.out = {}
        self.commands = {}
        self.reference = {}
        self.generation = {}
        """run key -> ``run_tools.generate_run``'s record (tokens, full_forward, stop, stopped, ranks_agree;
        or error / exception)."""

    def result(self, key: str) -> dict:
        """The report of run ``key``; fails with the run's stderr when it did not exit 0."""
        record = self.commands[key]
        if record["status"] not in (0, None):
            pytest.fail(
                f"run {key} ({record['tool']} {' '.join(record['argv'])}) exited {record['status']}:\n"
                f"{record['stderr']}",
                pytrace=False,
            )
        return json.loads((self.out[key] / "report.json").read_text())


def _plan_commands(s: Session, runs: dict) -> list:
    out = []
    for key, (tool, argv) in runs.items():
        s.out[key] = s.root / "out" / key
        out.append([tool, [*map(str, argv), "--out", str(s.out[key]), "--no-progress"]])
    return out


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> Path:
    """A SentencePiece model (vocabulary 400) trained on passkey text and a few standard-library files."""
    return train_test_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def session(tmp_path_factory, tokenizer_model) -> Session:
    s = Session(tmp_path_factory.mktemp("evaluation"))
    s.tokenizer = tokenizer_model
    rng = np.random.default_rng(0)
    s.tokens.write_text("".join(json.dumps({"tokens": rng.integers(0, VOCAB, n).tolist()}) + "\n" for n in DOC_LENGTHS))
    texts = [stdlib_text(n)[:chars] for n, chars in zip(STDLIB_FILES, [150, 600, 1500, 3000, 5000])]
    s.text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    common = ["--data", s.tokens, "--lengths", ",".join(map(str, LENGTHS))]
    passkey = ["--lengths", PASSKEY_LENGTHS, "--trials", "2", "--depths", "0,0.5,1"]
    ruler = [
        "--tokenizer",
        s.tokenizer,
        "--lengths",
        RULER_LENGTHS,
        "--samples",
        "2",
        "--depths",
        "0,1",
        "--max-new-tokens",
        "8",
        "--perplexity-documents",
        "2",
    ]
    ruler_subset = ["--tasks", RULER_PARALLEL_TASKS]  # the parallel layouts answer a few tasks of each family
    single = {
        "both": ("perplexity", ["--load", s.ckpt, "--hf", s.hf, *common]),
        "stride": (
            "perplexity",
            [
                "--load",
                s.ckpt,
                "--hf",
                s.hf,
                "--name",
                "meg",
                "--name",
                "hf",
                "--data",
                s.tokens,
                "--lengths",
                "32,64",
                "--stride",
                "8",
                "--micro-batch-size",
                "3",
            ],
        ),
        "text": ("perplexity", ["--load", s.ckpt, "--data", s.text, "--lengths", "16,64"]),
        "indexed": ("perplexity", ["--load", s.ckpt, "--data", s.indexed, "--lengths", "16,64"]),
        "default": ("perplexity", ["--load", s.ckpt, "--lengths", "32", "--max-documents", "2", "--seed", "3"]),
        "passkey_hf": ("passkey", ["--hf", s.hf, "--tokenizer", s.tokenizer, *passkey]),
        "passkey": ("passkey", ["--load", s.ckpt, *passkey]),
        "ruler": ("ruler", ["--load", s.ckpt, "--hf", s.hf, "--name", "meg", "--name", "hf", *ruler]),
    }
    parallel = {
        "tp2": ("perplexity", ["--load", s.ckpt, *common, "--tensor-model-parallel-size", "2"]),
        "pp2": (
            "perplexity",
            ["--load", s.ckpt, *common, "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"],
        ),
        "dp2": ("perplexity", ["--load", s.ckpt, *common]),
        "cp2": ("perplexity", ["--load", s.ckpt, *common, "--context-parallel-size", "2"]),
        "passkey_pp2": ("passkey", ["--load", s.ckpt, *passkey, "--pipeline-model-parallel-size", "2"]),
        "passkey_cp2": ("passkey", ["--load", s.ckpt, *passkey, "--context-parallel-size", "2"]),
        "ruler_pp2": (
            "ruler",
            ["--load", s.ckpt, "--name", "meg", *ruler, *ruler_subset, "--pipeline-model-parallel-size", "2"],
        ),
        "ruler_dp2": ("ruler", ["--load", s.ckpt, "--name", "meg", *ruler, *ruler_subset, "--micro-batch-size", "2"]),
    }
    generation_prompts = [rng.integers(0, VOCAB, n).tolist() for n in GENERATION_PROMPT_LENGTHS]
    generation = {
        "single": {"megatron": {"kind": "megatron", "path": str(s.ckpt)}, "hf": {"kind": "hf", "path": str(s.hf)}},
        "parallel": {
            "tp2": {"kind": "megatron", "path": str(s.ckpt), "tp": 2},
            "pp2": {"kind": "megatron", "path": str(s.ckpt), "pp": 2},
            "cp2": {"kind": "megatron", "path": str(s.ckpt), "cp": 2},
        },
    }
    setup = {
        "root": str(s.ckpt),
        "hf": str(s.hf),
        "tokenizer": str(s.tokenizer),
        "vocab_size": VOCAB,
        "rope": {"kind": "yarn", "factor": 2.0, "original_max_position": 32},
        "tokens": str(s.tokens),
        "lengths": LENGTHS,
        "text": str(s.text),
        "indexed": str(s.indexed),
    }
    for name, runs, extra in (("single", single, {"setup": setup}), ("parallel", parallel, {})):
        plan, results = s.root / f"plan_{name}.json", s.root / f"results_{name}.json"
        plan.write_text(
            json.dumps(
                {
                    **extra,
                    "commands": _plan_commands(s, runs),
                    "generation": {
                        "prompts": generation_prompts,
                        "max_new_tokens": GENERATION_NEW_TOKENS,
                        "runs": generation[name],
                    },
                }
            )
        )
        if name == "single":
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
            proc = subprocess.run(
                [sys.executable, WORKER, plan, results], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
            )
            if proc.returncode != 0:
                raise AssertionError(f"{WORKER} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
        else:
            torchrun(WORKER, plan, results, nproc=2, timeout=600)
        record = json.loads(results.read_text())
        s.reference.update(record.get("reference", {}))
        s.generation.update(record.get("generation", {}))
        s.commands.update({key: r for key, r in zip(runs, record["commands"])})
    return s
