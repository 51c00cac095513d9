"""With Transformer Engine: TE's context parallelism and ours (SDPA over all-gathered K/V, the CP path of
machines without TE) give the same logits on the same batch, CP=2 on two GPUs, bf16. Worker:
``workers/context_parallel_te.py``. The CPU side of our CP is tested in the normal tier
(``tests/megatron/test_context_parallel.py``, ``tests/training/test_context_parallel.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import torchrun

WORKER = Path(__file__).parent / "workers" / "context_parallel_te.py"
#: bf16 logits of two attention implementations (different kernels, different summation orders); a wrong
#: chunk order, mask or rotary position is off by O(1)
RTOL = 3e-2


@pytest.mark.gpu
def test_te_context_parallel_equals_ours(tmp_path):
    from megatron_resonance.megatron.llama import te_available

    if not te_available():
        pytest.skip("needs Transformer Engine")
    if torch.cuda.device_count() < 2:
        pytest.skip("CP=2 needs two GPUs")
    out = tmp_path / "cp_te.json"
    torchrun(WORKER, out, nproc=2, timeout=600)
    result = json.loads(out.read_text())
    assert result["shape"][1] == 1024 // 2
    assert result["te_vs_ours"] <= RTOL, result
    assert result["ours_vs_cp1"] <= RTOL, result
    assert result["te_vs_cp1"] <= RTOL, result
