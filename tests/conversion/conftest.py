"""One conversion pipeline shared by the round-trip tests, run once per session in its own processes.

1. Tiny random Hugging Face sources (``tiny_models.SOURCES``) and their logits (this process).
2. ``workers/convert_all.py``: every import and export through the tools' ``main``, in one process (the
   CPU compatibility layer and megatron's parallel state are process-wide and must not leak into pytest).
3. ``workers/megatron_logits.py`` under torchrun (2 processes): each Megatron checkpoint at TP=2 and PP=2.
4. ``workers/hf_logits.py``: the portable export loaded by stock transformers in a process that never
   imports megatron_resonance; the custom-format export here, after ``megatron_resonance.hf.register()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conversion import tiny_models
from tests.launch import python, torchrun

WORKERS = Path(__file__).parent / "workers"
EXTENDED = "gqa_resonance_yarn"  # gqa with a recorded resonance_yarn plan, factor 4: 64 -> 256 positions
EXTENDED_SEQ = 256


class Pipeline:
    def __init__(self, root: Path):
        self.root = root
        self.src = {name: root / "hf" / name for name in tiny_models.SOURCES}
        self.megatron = {name: root / "megatron" / name for name in [*tiny_models.SOURCES, EXTENDED]}
        self.export = {name: root / "export" / name for name in tiny_models.SOURCES}
        self.export_longrope = root / "export" / f"{EXTENDED}_longrope"
        self.export_custom = root / "export" / f"{EXTENDED}_custom"
        self.reimported = root / "megatron" / f"{EXTENDED}_reimported"
        self.tampered = root / "megatron" / "tampered"
        self.tampered_export = root / "export" / "tampered"
        self.tokens = root / "tokens.pt"
        self.tokens_extended = root / "tokens_extended.pt"
        self.hf_logits = {}
        self.conversions = []
        self.hf_stock = {}
        self.hf_custom = {}

    def megatron_logits(self, name: str, layout: str) -> torch.Tensor:
        return torch.load(self.root / "megatron_logits" / f"{name}.{layout}.pt")


def _custom_format_logits(directory: Path, tokens: Path) -> dict:
    """``--rope-format custom`` needs ``megatron_resonance.hf.register()`` first (idempotent, process-wide)."""
    import transformers

    import megatron_resonance.hf

    megatron_resonance.hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.load(tokens)).logits.float()
    return {"rope_type": model.model.rotary_emb.rope_type, "logits": logits}


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    p = Pipeline(tmp_path_factory.mktemp("conversion"))

    # 1. sources and their logits
    tokens = tiny_models.tokens(tiny_models.SEQ)
    torch.save(tokens, p.tokens)
    torch.save(tiny_models.tokens(EXTENDED_SEQ, seed=2), p.tokens_extended)
    for i, name in enumerate(tiny_models.SOURCES):
        model = tiny_models.write_source(name, p.src[name], seed=i)
        with torch.no_grad():
            p.hf_logits[name] = model(tokens).logits.float()

    # 2. conversions, through the tools
    commands = []
    for name in tiny_models.SOURCES:
        commands.append(
            ["hf_to_megatron", ["--load", str(p.src[name]), "--save", str(p.megatron[name]), "--no-progress"]]
        )
        commands.append(
            [
                "megatron_to_hf",
                [
                    "--load",
                    str(p.megatron[name]),
                    "--save",
                    str(p.export[name]),
                    "--max-shard-size",
                    "100KB",
                    "--no-progress",
                ],
            ]
        )
    commands += [
        [
            "hf_to_megatron",
            [
                "--load",
                str(p.src["gqa"]),
                "--save",
                str(p.megatron[EXTENDED]),
                "--rope-kind",
                "resonance_yarn",
                "--rope-factor",
                "4",
                "--no-progress",
            ],
        ],
        ["megatron_to_hf", ["--load", str(p.megatron[EXTENDED]), "--save", str(p.export_longrope), "--no-progress"]],
        [
            "megatron_to_hf",
            [
                "--load",
                str(p.megatron[EXTENDED] / "iter_0000000"),
                "--save",
                str(p.export_custom),
                "--rope-format",
                "custom",
                "--no-progress",
            ],
        ],
        # an exported resonance model comes back with its plan (read from the recorded keys)
        ["hf_to_megatron", ["--load", str(p.export_longrope), "--save", str(p.reimported), "--no-progress"]],
        # a checkpoint that lacks a tensor its config implies (untied config, tied weights): refused
        ["tamper", [str(p.megatron["tied_llama3_bin"]), str(p.tampered), "tie_word_embeddings", "false"]],
        ["megatron_to_hf", ["--load", str(p.tampered), "--save", str(p.tampered_export), "--no-progress"]],
    ]
    plan, results = p.root / "convert_plan.json", p.root / "convert_results.json"
    plan.write_text(json.dumps({"commands": commands}))
    python(WORKERS / "convert_all.py", plan, results)
    p.conversions = json.loads(results.read_text())

    # 3. Megatron logits at TP=2 and PP=2
    jobs = [{"name": n, "checkpoint": str(p.megatron[n]), "tokens": str(p.tokens)} for n in tiny_models.SOURCES]
    jobs.append({"name": EXTENDED, "checkpoint": str(p.megatron[EXTENDED]), "tokens": str(p.tokens_extended)})
    (p.root / "megatron_logits").mkdir()
    plan = p.root / "megatron_plan.json"
    plan.write_text(json.dumps({"jobs": jobs}))
    if all(r["status"] == 0 for r in p.conversions if r["argv"][3] != str(p.tampered_export)):
        torchrun(WORKERS / "megatron_logits.py", plan, p.root / "megatron_logits", nproc=2, timeout=600)

        # 4. the resonance export in a process with transformers alone; the custom-format export here
        plan, out = p.root / "hf_plan_stock.json", p.root / "hf_stock.json"
        plan.write_text(
            json.dumps(
                {
                    "jobs": [
                        {
                            "name": EXTENDED,
                            "model": str(p.export_longrope),
                            "tokens": str(p.tokens_extended),
                            "out": str(p.root / "hf_stock_logits.pt"),
                        }
                    ]
                }
            )
        )
        python(WORKERS / "hf_logits.py", plan, out)
        p.hf_stock = json.loads(out.read_text())
        p.hf_stock["logits"] = torch.load(p.root / "hf_stock_logits.pt")
        p.hf_custom = _custom_format_logits(p.export_custom, p.tokens_extended)
    return p
