"""Worker: logits of Hugging Face model directories computed by transformers alone.

    python tests/conversion/workers/hf_logits.py PLAN.json OUT.json [--register]

Without ``--register`` this process never imports ``megatron_resonance`` (checked and reported): it is the
"colleague's notebook" that only has stock transformers. With ``--register`` it first calls
``megatron_resonance.hf.register()`` (for ``--rope-format custom`` exports; the tests do that one in-process).
PLAN.json:
``{"jobs": [{"name": ..., "model": DIR, "tokens": FILE.pt, "out": FILE.pt}, ...]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(plan_path: str, out_path: str, register: bool) -> None:
    if register:
        import megatron_resonance.hf

        megatron_resonance.hf.register()
    import transformers

    report = {"transformers": transformers.__version__, "jobs": {}}
    for job in json.loads(Path(plan_path).read_text())["jobs"]:
        model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
        rotary = model.model.rotary_emb
        with torch.no_grad():
            logits = model(torch.load(job["tokens"])).logits.float()
        torch.save(logits, job["out"])
        report["jobs"][job["name"]] = {
            "rope_type": rotary.rope_type,
            "attention_scaling": float(rotary.attention_scaling),
            "inv_freq": rotary.inv_freq.double().tolist(),
            "max_position_embeddings": model.config.max_position_embeddings,
        }
    report["imported_megatron_resonance"] = any(m.startswith("megatron_resonance") for m in sys.modules)
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--register" in sys.argv[3:])
