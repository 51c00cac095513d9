"""The benchmark's model-only step and its megatron trainer step on one tiny model: prints their losses.

torchrun --nproc-per-node 1 model_only_step.py
"""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from tests.tiny_llama import tiny_llama

    bench._initialize()
    cfg = tiny_llama(hidden_size=64, ffn_hidden_size=176)
    rope = bench._rope(cfg, "rope", 16, 4.0)
    trainer = bench._megatron_trainer(cfg, rope, 32, 2)
    model_only = bench._model_only_trainer(cfg, rope, 32, 2)
    losses = {"trainer": [float(trainer()) for _ in range(3)], "model_only": [float(model_only()) for _ in range(3)]}
    print(json.dumps(losses))
