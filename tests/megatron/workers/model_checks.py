"""Worker: the single-process checks of the Megatron integration that need megatron's global state, run
once for all the tests that read them (the ``model_checks`` fixture of ``tests/megatron/conftest.py``).

``cpu_compat`` (a process-wide TorchFunctionMode and patched ``torch.cuda``), ``cpu_speed``'s patches of
megatron and ``parallel_state`` must not leak into the pytest process, so these checks run here, under
``torchrun --nproc-per-node 1`` with ``cpu_speed`` on::

    torchrun --nproc-per-node 1 tests/megatron/workers/model_checks.py OUT_DIR

Each check lives next to the tests that assert it: ``<area>_checks.py`` here holds the checks (its ``check_*``
functions, run in the order they are defined) of ``tests/megatron/test_<area>.py``, and each check's docstring
names its tests. Each check returns a dict of measurements, or is recorded as ``{"error": traceback}``
(``tests.worker_checks``); the records go to ``OUT_DIR/results.json``, by check name.
"""

from __future__ import annotations

import json
import os
import sys

import cpu_compat_checks
import cpu_speed_checks
import llama_checks
import rotary_checks
import sdpa_attention_checks
import torch

from tests.worker_checks import run_check

CHECK_MODULES = [sdpa_attention_checks, rotary_checks, llama_checks, cpu_speed_checks, cpu_compat_checks]


def main(out_dir: str) -> None:
    from megatron_resonance.megatron import cpu_speed, distributed

    distributed.initialize(1, 1)
    cpu_speed.set_enabled(True)  # whatever MEGATRON_RESONANCE_CPU_SPEED says: these checks are of its measures
    results = {"cuda_available": torch.cuda.is_available()}
    for module in CHECK_MODULES:
        for name, check in vars(module).items():
            if name.startswith("check_"):
                results[name] = run_check(check)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
