"""The layout matrix: the real entry points at six 2-process layouts (gloo), as one chain of runs.

Every run starts with ``python <entry point> --nproc-per-node 2`` (``tests.training.conftest.run``), each
once per module and only when a test asks for it:

1. ``reference``: ``pretrain/pretrain_llama.py`` at ``REFERENCE`` (TP=2), ``ITERS`` iterations
   uninterrupted, saving every ``SAVE_INTERVAL`` and at the end;
2. ``hop(i)``: the same command at ``HOPS[i]``, resumed (``--load``: optimizer, scheduler, data position)
   from the first periodic checkpoint after the start of the run before it, trained to the end with
   its own periodic saves and a fresh ``--save``. ``HOPS`` visits every layout, each saving the
   checkpoint the next resumes at another layout, and ends back at the reference's: every layout is saved
   from and resumed into. Each is a continuation of the reference run, so each logs the reference's
   losses (a broken save or load fails its hop and every hop after it);
3. ``extended(layout)``: ``finetune/extend_context.py`` at the layout, from the final checkpoint of the
   hop ``EXTEND_FROM`` names (saved at another layout), to twice the length (``resonance_yarn``, s = 2);
4. ``evaluated``: ``tools/convert_megatron_to_hf.py`` exports each extended checkpoint (all in one
   process, ``tests/conversion/workers/convert_all.py``), then one ``tools/eval_perplexity.py`` run scores
   every Megatron checkpoint (``--load``) and its export (``--hf``, stock transformers) on the same
   token documents;
5. ``megatron(layout)``: the reference's command at one of ``MEGATRON_LAYOUTS``, uninterrupted, with
   ``cpu_speed`` off (``MEGATRON_RESONANCE_CPU_SPEED=0``): megatron-core's own code on CPU.
6. ``compiled``: the reference's command with ``--transformer-impl local_compiled`` (every transformer
   layer under ``torch.compile``), uninterrupted.

A run that fails fails the tests that need it, with its output, and only those.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest

from tests.training.conftest import EXTEND, PRETRAIN, REPO, TINY_RUN, env, run

CONVERT_ALL = REPO / "tests" / "conversion" / "workers" / "convert_all.py"
EVAL = REPO / "tools" / "eval_perplexity.py"

#: 2 processes each; the distributed optimizer is the default everywhere (it shards over DP=2 only)
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2_vpp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
    "dp2": ["--use-distributed-optimizer"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "cp2": ["--context-parallel-size", "2"],
}
REFERENCE = "tp2"
#: the layouts also run with cpu_speed off: the distributed optimizer over DP=2, and sequence parallelism
MEGATRON_LAYOUTS = ("dp2", "tp2_sp")
#: the layouts the resumed runs take, in order; each resumes the run before it (the first: the reference)
HOPS = ["pp2_vpp2", "dp2", "cp2", "tp2_sp", "pp2", "tp2"]
#: extended at layout <- from the checkpoint of the hop at layout
EXTEND_FROM = {"pp2_vpp2": "tp2_sp", "tp2_sp": "pp2_vpp2", "cp2": "pp2"}
SAVE_INTERVAL = 2
ITERS = SAVE_INTERVAL * (len(HOPS) + 1)
#: the training tests' tiny run with 4 layers (PP x VPP = 4 stages) and one validation batch at the end
RUN = [*TINY_RUN, "--num-layers", "4", "--eval-interval", "0", "--eval-iters", "1", "--train-iters", ITERS,
       "--save-interval", SAVE_INTERVAL]  # fmt: skip
EXTENDED_SEQ = 64  # TINY_RUN's 32, doubled
EVAL_LENGTHS = [32, EXTENDED_SEQ]
VOCAB = 256  # TINY_RUN's vocabulary (no tokenizer: mock data's token ids)


def start_iteration(hop: int) -> int:
    """The iteration hop ``hop`` resumes at: the first periodic save of the run before it."""
    return SAVE_INTERVAL * (hop + 1)


def checkpoints(save: Path) -> List[str]:
    return sorted(p.name for p in Path(save).glob("iter_*"))


class Runs:
    """Runs each step once, keeps its result or its failure."""

    def __init__(self, root: Path):
        self.root = root
        self._done: Dict[tuple, object] = {}

    def once(self, key: tuple, make: Callable[[], object]):
        if key not in self._done:
            try:
                self._done[key] = make()
            except Exception as e:  # every test that needs this run fails with its output, not only the first
                self._done[key] = e
        result = self._done[key]
        if isinstance(result, Exception):
            pytest.fail(f"{' '.join(map(str, key))} failed:\n{result}", pytrace=False)
        return result

    def reference(self) -> dict:
        def make():
            save = self.root / f"reference_{REFERENCE}"
            proc = run(PRETRAIN, *RUN, *LAYOUTS[REFERENCE], "--save", save)
            return {"save": save, "stdout": proc.stdout, "layout": REFERENCE}

        return self.once(("reference",), make)

    def hop(self, i: int) -> dict:
        def make():
            before = self.reference() if i == 0 else self.hop(i - 1)
            load = before["save"] / f"iter_{start_iteration(i):07d}"
            save = self.root / f"hop{i}_{HOPS[i]}"
            proc = run(PRETRAIN, *RUN, *LAYOUTS[HOPS[i]], "--load", load, "--save", save)
            return {"save": save, "stdout": proc.stdout, "load": load, "layout": HOPS[i], "from": before["layout"]}

        return self.once(("hop", i, HOPS[i]), make)

    def megatron(self, layout: str) -> dict:
        def make():
            save = self.root / f"megatron_{layout}"
            proc = run(
                PRETRAIN, *RUN, *LAYOUTS[layout], "--save", save, extra_env={"MEGATRON_RESONANCE_CPU_SPEED": "0"}
            )
            return {"save": save, "stdout": proc.stdout, "layout": layout}

        return self.once(("megatron", layout), make)

    def compiled(self) -> dict:
        def make():
            save = self.root / "compiled"
            proc = run(PRETRAIN, *RUN, *LAYOUTS[REFERENCE], "--transformer-impl", "local_compiled", "--save", save)
            return {"save": save, "stdout": proc.stdout, "layout": REFERENCE}

        return self.once(("compiled",), make)

    def extended(self, layout: str) -> dict:
        def make():
            source = self.hop(HOPS.index(EXTEND_FROM[layout]))
            save = self.root / f"extended_{layout}"
            proc = run(
                EXTEND, "--load", source["save"], "--save", save, "--seq-length", EXTENDED_SEQ,
                "--rope-kind", "resonance_yarn", "--mock-data", "--micro-batch-size", 2, "--global-batch-size", 8,
                "--train-iters", 2, "--log-interval", 1, "--eval-iters", 1, *LAYOUTS[layout],
            )  # fmt: skip
            return {"save": save, "stdout": proc.stdout, "source": source}

        return self.once(("extended", layout), make)

    def evaluated(self) -> dict:
        """Export every extended checkpoint that exists, then one perplexity run over all of them."""

        def make():
            root = self.root / "evaluation"
            root.mkdir()
            extended = {}
            for layout in EXTEND_FROM:
                try:
                    extended[layout] = self.extended(layout)["save"]
                except pytest.fail.Exception:
                    pass  # that layout's test reports it
            exports = {layout: root / f"hf_{layout}" for layout in extended}
            plan, results = root / "convert_plan.json", root / "convert_results.json"
            plan.write_text(json.dumps({"commands": [
                ["megatron_to_hf", ["--load", str(extended[k]), "--save", str(exports[k]), "--no-progress"]]
                for k in extended
            ]}))  # fmt: skip
            proc = subprocess.run(
                [sys.executable, CONVERT_ALL, plan, results],
                cwd=REPO,
                env=env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, f"{CONVERT_ALL} exited {proc.returncode}\n{proc.stderr[-6000:]}"
            conversions = dict(zip(extended, json.loads(results.read_text())))

            rng = np.random.default_rng(0)
            data = root / "tokens.jsonl"
            data.write_text(
                "".join(
                    json.dumps({"tokens": rng.integers(0, VOCAB, n).tolist()}) + "\n" for n in (40, 64, 70, 100, 130)
                )
            )
            models = []
            for k in extended:
                models += ["--load", extended[k], "--name", f"megatron_{k}"]
                if conversions[k]["status"] == 0:
                    models += ["--hf", exports[k], "--name", f"hf_{k}"]
            out = root / "perplexity"
            run(
                EVAL,
                *models,
                "--data",
                data,
                "--lengths",
                ",".join(map(str, EVAL_LENGTHS)),
                "--out",
                out,
                "--no-progress",
                nproc=0,
            )
            report = json.loads((out / "report.json").read_text())
            return {"conversions": conversions, "report": report, "exports": exports}

        return self.once(("evaluated",), make)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("layouts"))
