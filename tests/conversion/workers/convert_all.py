"""Worker: run the converter tools' ``main(argv)`` over a list of commands, in one process.

    python tests/conversion/workers/convert_all.py PLAN.json RESULTS.json

PLAN.json: ``{"commands": [["hf_to_megatron" | "megatron_to_hf", [argv...]], ...]}``. One process for all
conversions saves the megatron import per command; the tools themselves are what runs. RESULTS.json:
exit status and printed summary of each command. A ``["tamper", [SRC, DST, KEY, JSON_VALUE]]`` command
copies checkpoint root SRC to DST and sets ``model.KEY`` in its ``megatron_resonance.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import sys
import traceback
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[3] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"convert_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(plan_path: str, results_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    tools = {name: load_tool(name) for name in ("hf_to_megatron", "megatron_to_hf")}
    results = []
    for tool, argv in plan["commands"]:
        if tool == "tamper":
            src, dst, key, value = argv
            shutil.copytree(src, dst)
            meta_path = Path(dst) / "iter_0000000" / "megatron_resonance.json"
            meta = json.loads(meta_path.read_text())
            meta["model"][key] = json.loads(value)
            meta_path.write_text(json.dumps(meta))
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = tools[tool].main(argv)
            except SystemExit as e:
                status = e.code
            except Exception:
                status = "exception"
                err.write(traceback.format_exc())
        results.append(
            {"tool": tool, "argv": argv, "status": status, "stdout": out.getvalue(), "stderr": err.getvalue()[-4000:]}
        )
        print(tool, " ".join(argv), "->", status, out.getvalue().strip().splitlines()[-1:], flush=True)
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
