"""Tensor, pipeline and virtual-pipeline parallelism change nothing: same loss, same gradients (gloo, 2 CPUs).

One torchrun job (``workers/parallel_equivalence.py``) runs every layout for ``rope`` and ``resonance_yarn``
on the same initial weights and the same 4-sequence global batch, with megatron's DDP and pipeline
schedules; the tests below check what it measured against the TP=1, PP=1 (DP=2) reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "parallel_equivalence.py"
KINDS = ("rope", "resonance_yarn")
LAYOUTS = ("tp2", "pp2", "pp2_vpp2")
REFERENCE = "tp1_pp1_dp2"
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_equivalence")
    torchrun(WORKER, out, nproc=2, timeout=400)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_loss_matches_reference(results, kind, layout):
    ref = results["layouts"][f"{kind}/{REFERENCE}"]["loss"]
    loss = results["layouts"][f"{kind}/{layout}"]["loss"]
    assert abs(loss - ref) <= RTOL * abs(ref), (loss, ref)
    # the reference ran 2 microbatches per DP rank, the model-parallel layouts 4 on their single DP rank
    assert results["layouts"][f"{kind}/{REFERENCE}"]["num_microbatches"] == 2
    assert results["layouts"][f"{kind}/{layout}"]["num_microbatches"] == 4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_reference(results, kind, layout):
    per_param = results["grads"][f"{kind}/{layout}"]
    # every parameter of the full model: embedding, 4 layers x 6 tensors, final norm, output layer
    assert len(per_param) == 2 + 4 * 6 + 1
    for name, d in per_param.items():
        assert d["max_abs_ref"] > 0, f"{name}: zero reference gradient proves nothing"
        assert d["rel"] <= RTOL, f"{name}: max |grad - ref| / max |ref| = {d['rel']:.3g}"


def test_rope_kinds_give_different_losses(results):
    """The resonance_yarn plan reached the model in every layout (same weights, same data)."""
    for layout in (REFERENCE,) + LAYOUTS:
        rope = results["layouts"][f"rope/{layout}"]["loss"]
        yarn = results["layouts"][f"resonance_yarn/{layout}"]["loss"]
        assert abs(rope - yarn) > 1e-3 * abs(rope), (layout, rope, yarn)


@pytest.mark.parametrize("layout", (REFERENCE,) + LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_rotary_installed_on_every_chunk(results, kind, layout):
    record = results["layouts"][f"{kind}/{layout}"]
    chunks = record["rotary"]
    expected_chunks = {REFERENCE: 2, "tp2": 2, "pp2": 2, "pp2_vpp2": 4}[layout]  # over both ranks
    assert len(chunks) == expected_chunks
    for chunk in chunks:
        assert chunk["is_resonance_module"], chunk
        assert chunk["kind"] == kind
        assert chunk["angles_match"], chunk
        assert chunk["core_attention_scales"] == [pytest.approx(chunk["expected_scale"], rel=1e-12)]
    # the layout really was what it claims: layers per rank, and TP-split QKV rows (4 heads + 2x2 kv) x 32
    layers = sorted(n for chunk in chunks for n in chunk["layers"])
    if layout in (REFERENCE, "tp2"):
        assert layers == [1, 1, 2, 2, 3, 3, 4, 4]
    else:
        assert layers == [1, 2, 3, 4]
    qkv_rows = 8 * 32 // (2 if layout == "tp2" else 1)
    assert all(chunk["qkv_rows"] == qkv_rows for chunk in chunks)
    if layout == "pp2_vpp2":
        by_rank = {r: sorted(n for c in chunks if c["rank"] == r for n in c["layers"]) for r in (0, 1)}
        assert by_rank == {0: [1, 3], 1: [2, 4]}  # interleaved: one layer per virtual chunk


def test_builder_refuses_indivisible_tensor_parallel(results):
    refusals = results["refusals"]
    assert refusals["heads"] == "tensor-model-parallel-size 2 does not divide num_attention_heads 3"
    assert refusals["query_groups"] == "tensor-model-parallel-size 2 does not divide num_query_groups 3"
