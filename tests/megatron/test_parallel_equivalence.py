"""Tensor (with and without sequence parallelism), pipeline and virtual-pipeline parallelism change nothing:
same loss, same gradients (gloo, 2 CPUs), through megatron's own code and through ``cpu_speed``'s.

One torchrun job (``workers/parallel_equivalence.py``) runs every layout for ``rope`` and ``resonance_yarn``
on the same initial weights and the same 4-sequence global batch, with megatron's DDP and pipeline
schedules; the tests below check what it measured against the TP=1, PP=1 (DP=2) reference. The job runs
twice: with ``cpu_speed`` off (``megatron``: megatron-core's own code under ``cpu_compat``) and on
(``speed``, the default), and the two give the same losses and gradients at every layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "parallel_equivalence.py"
KINDS = ("rope", "resonance_yarn")
LAYOUTS = ("tp2", "tp2_sp", "pp2", "pp2_vpp2")
REFERENCE = "tp1_pp1_dp2"
RTOL = 1e-5
#: MEGATRON_RESONANCE_CPU_SPEED of each run
MODES = {"megatron": "0", "speed": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mode -> (the job's output directory, its results), each job run once, when first asked for."""
    done = {}

    def get(mode: str):
        if mode not in done:
            out = tmp_path_factory.mktemp(f"parallel_equivalence_{mode}")
            torchrun(WORKER, out, nproc=2, timeout=400, env={"MEGATRON_RESONANCE_CPU_SPEED": MODES[mode]})
            done[mode] = out, json.loads((out / "results.json").read_text())
        return done[mode]

    return get


@pytest.fixture(scope="module", params=MODES)
def results(runs, request):
    return runs(request.param)[1]


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
    expected_chunks = {REFERENCE: 2, "tp2": 2, "tp2_sp": 2, "pp2": 2, "pp2_vpp2": 4}[layout]  # over both ranks
    assert len(chunks) == expected_chunks
    for chunk in chunks:
        assert chunk["is_resonance_module"], chunk
        assert chunk["kind"] == kind
        assert chunk["angles_match"], chunk
        assert chunk["core_attention_scales"] == [pytest.approx(chunk["expected_scale"], rel=1e-12)]
    # the layout really was what it claims: layers per rank, and TP-split QKV rows (4 heads + 2x2 kv) x 32
    layers = sorted(n for chunk in chunks for n in chunk["layers"])
    if layout in (REFERENCE, "tp2", "tp2_sp"):
        assert layers == [1, 1, 2, 2, 3, 3, 4, 4]
    else:
        assert layers == [1, 2, 3, 4]
    assert record["sequence_parallel"] is (layout == "tp2_sp")
    qkv_rows = 8 * 32 // (2 if layout.startswith("tp2") else 1)
    assert all(chunk["qkv_rows"] == qkv_rows for chunk in chunks)
    if layout == "pp2_vpp2":
        by_rank = {r: sorted(n for c in chunks if c["rank"] == r for n in c["layers"]) for r in (0, 1)}
        assert by_rank == {0: [1, 3], 1: [2, 4]}  # interleaved: one layer per virtual chunk


def test_builder_refuses_indivisible_tensor_parallel(results):
    refusals = results["refusals"]
    assert refusals["heads"] == "tensor-model-parallel-size 2 does not divide num_attention_heads 3"
    assert refusals["query_groups"] == "tensor-model-parallel-size 2 does not divide num_query_groups 3"


OURS = "megatron_resonance.megatron"
#: what each run's model and step ran: megatron-core's and torch's own code, or cpu_speed's
CODE_PATHS = {
    "megatron": {
        "cpu_speed": False,
        "linear_function": "megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication",
        "mlp_activation": "torch.nn.functional.silu",
        "norm": "torch.nn.modules.normalization.RMSNorm",
        "final_norm": "torch.nn.modules.normalization.RMSNorm",
        "logits_max": "megatron.core.tensor_parallel.cross_entropy.VocabParallelCrossEntropy.calculate_logits_max",
        "l2_norm": "megatron.core.utils.local_multi_tensor_l2_norm",
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
    },
    "speed": {
        "cpu_speed": True,
        "linear_function": f"{OURS}.cpu_speed._lean_linear.<locals>._LeanLinearWithGradAccumulation",
        "mlp_activation": f"{OURS}.local_ops.SwiGLU",
        "norm": f"{OURS}.local_ops.RMSNorm",
        "final_norm": f"{OURS}.local_ops.RMSNorm",
        "logits_max": f"{OURS}.cpu_speed._logits_max",
        "l2_norm": f"{OURS}.cpu_speed._multi_tensor_l2norm",
        "gradient_accumulation_fusion": True,
        "apply_rope_fusion": True,
    },
}


@pytest.mark.parametrize("mode", MODES)
def test_each_run_takes_the_code_paths_it_claims(runs, mode):
    for name, record in runs(mode)[1]["layouts"].items():
        paths = record["code_paths"]
        if paths["final_norm"] is None:  # rank 0 of a pipeline holds no final norm
            paths = dict(paths, final_norm=CODE_PATHS[mode]["final_norm"])
        assert paths == CODE_PATHS[mode], name
    assert runs(mode)[1]["layouts"][f"rope/{REFERENCE}"]["code_paths"]["final_norm"] is not None


@pytest.mark.parametrize("layout", (REFERENCE,) + LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_speed_measures_give_megatron_s_losses_and_gradients(runs, kind, layout):
    """cpu_speed's replacements against megatron's own code at every layout: the same loss (relative
    1e-6; float rounding in a different order) and every parameter's gradient (RTOL of its largest entry)."""
    (megatron_dir, megatron), (speed_dir, speed) = runs("megatron"), runs("speed")
    ref = megatron["layouts"][f"{kind}/{layout}"]["loss"]
    assert speed["layouts"][f"{kind}/{layout}"]["loss"] == pytest.approx(ref, rel=1e-6)
    theirs = torch.load(megatron_dir / f"grads_{kind}_{layout}.pt")
    ours = torch.load(speed_dir / f"grads_{kind}_{layout}.pt")
    assert sorted(ours) == sorted(theirs) and len(theirs) == 2 + 4 * 6 + 1
    for name, grad in theirs.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (ours[name] - grad).abs().max().item() <= RTOL * scale, name
