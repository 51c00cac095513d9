"""The ``local_compiled`` layer spec (the local spec's layers under ``torch.compile``) against the eager local
spec: same loss, logits and gradients from the same weights, same checkpoint keys, no graph breaks. Worker:
``workers/local_compiled.py``; comparison: ``checks.py``. On a GPU in bf16 (the gpu tier), and on CPU in fp32."""

from __future__ import annotations

import json

import pytest
import torch

from tests.gpu import checks
from tests.gpu.conftest import DEVICE_ENV, WORKERS
from tests.launch import python


def _compare(device: str, tmp_path) -> dict:
    out = tmp_path / "local_compiled.json"
    python(WORKERS / "local_compiled.py", out, env=DEVICE_ENV[device], timeout=600)
    results = json.loads(out.read_text())
    print(
        json.dumps(
            {
                spec: {k: v for k, v in results[spec].items() if not k.endswith("_keys")}
                for spec in ("local", "local_compiled")
            }
        )
    )
    checks.assert_compiled_matches_eager(results, torch.load(out.with_suffix(".pt")))
    return results


@pytest.mark.gpu
def test_compiled_layers_match_eager_on_the_gpu(tmp_path):
    results = _compare("cuda", tmp_path)
    assert results["device"].startswith("cuda") and results["dtype"] == "bf16"


@pytest.mark.slow
def test_compiled_layers_match_eager_on_cpu(tmp_path):
    results = _compare("cpu", tmp_path)
    assert results["device"] == "cpu" and results["dtype"] == "fp32"


def test_compiled_check_fails_on_what_it_guards():
    keys = {"state_dict_keys": ["a"], "sharded_state_dict_keys": ["a"]}
    run = {"loss": 5.0, **keys, "dynamo": {"graph_breaks": 0, "unique_graphs": 2}}
    results = {
        "dtype": "fp32",
        "local": {**run, "compiled_layers": [False]},
        "local_compiled": {**run, "compiled_layers": [True]},
    }
    grads = {"grad/w": torch.tensor([1.0, -2.0])}
    checks.assert_compiled_matches_eager(results, {"local": grads, "local_compiled": grads})
    with pytest.raises(AssertionError, match="grad/w: compiled vs eager off"):  # a sign flipped
        checks.assert_compiled_matches_eager(results, {"local": grads, "local_compiled": {"grad/w": -grads["grad/w"]}})
    prefixed = {**results["local_compiled"], "state_dict_keys": ["_orig_mod.a"]}
    with pytest.raises(AssertionError, match="state_dict_keys differ"):  # torch.compile's wrapper leaked in
        checks.assert_compiled_matches_eager(
            {**results, "local_compiled": prefixed}, {"local": grads, "local_compiled": grads}
        )
    broken = {**results["local_compiled"], "dynamo": {"graph_breaks": 3, "unique_graphs": 8}}
    with pytest.raises(AssertionError, match="break into pieces"):
        checks.assert_compiled_matches_eager(
            {**results, "local_compiled": broken}, {"local": grads, "local_compiled": grads}
        )
