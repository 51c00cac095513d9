"""Document masking (``--reset-attention-mask``, ``--reset-position-ids``): every document of a packed sample
gets the logits it gets alone, through the trainer's ``forward_step`` (worker ``workers/documents.py``, one
torchrun process: cpu_speed and megatron's state stay out of pytest); the attention function against
megatron's own dense document mask, and under a context-parallel layout (queries of one rank, keys of all)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_resonance.megatron.documents import (
    DocumentLayout,
    cp_query_index,
    document_attention,
    document_ids_from_tokens,
)
from tests.launch import torchrun
from tests.megatron.conftest import WORKERS
from tests.worker_checks import CheckResults


@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("documents")


@pytest.fixture(scope="module")
def checks(worker_dir) -> CheckResults:
    torchrun(WORKERS / "documents.py", worker_dir, nproc=1, timeout=300)
    return CheckResults.read(worker_dir / "results.json")


@pytest.fixture(scope="module")
def checks_cp2(checks, worker_dir) -> CheckResults:
    torchrun(WORKERS / "documents.py", worker_dir, "cp2", nproc=2, timeout=300)
    return CheckResults.read(worker_dir / "results_cp2.json")


@pytest.mark.parametrize("speed", ["on", "off"])
@pytest.mark.parametrize("kind", ["rope", "resonance_yarn"])
def test_each_document_has_its_logits_alone(checks, kind, speed):
    record = checks["check_parity"][f"{kind}/cpu_speed={speed}"]
    assert record["max_diff"] <= 1e-5, record
    assert record["logit_scale"] > 0.1  # logits of a size where 1e-5 means something
    # without the flags attention crosses documents: every document after the first sees its predecessors
    first = {0, 3}
    assert all(d < 1e-5 for i, d in enumerate(record["flags_off_diff"]) if i in first), record
    assert all(d > 1e-2 for i, d in enumerate(record["flags_off_diff"]) if i not in first), record


@pytest.mark.parametrize("speed", ["on", "off"])
@pytest.mark.parametrize("kind", ["rope", "resonance_yarn"])
def test_each_document_has_its_logits_alone_at_cp2(checks_cp2, kind, speed):
    """CP = 2: documents cross the load-balanced chunks (boundaries at 20 and 50 of 64, chunks of 16)."""
    record = checks_cp2["check_parity_cp2"][f"{kind}/cpu_speed={speed}"]
    assert record["max_diff"] <= 1e-5, record


def test_gradient_of_the_pack_is_the_sum_over_documents(checks):
    record = checks["check_gradients"]
    assert record["loss_packed"] == pytest.approx(record["loss_alone"], rel=1e-6)
    assert record["max_rel_grad_diff"] < 1e-5, record


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("kind", ["rope", "resonance_yarn"])
def test_rotary_angles_restart_at_each_document(checks, kind, mask):
    """The angles the first layer receives are the exact table's rows at megatron's reset positions
    ([s, b, 1, d]: each sample its own), with or without attention masking."""
    record = checks["check_rotary_positions"][f"{kind}/mask={mask}"]
    assert record["exact"], record
    assert record["shape"] == [64, 2, 1, 32]
    assert record["positions"] == [*range(20), *range(30), *range(14)]


def test_reset_position_ids_alone(checks):
    record = checks["check_positions_only"]
    assert record["reset_vs_plain"] > 1e-3  # attention crosses documents, at other relative positions
    assert record["arange_vs_plain"] == 0.0  # positions 0..s-1 through the layout: megatron's own forward


# ---------------------------------------------------------------- the attention function, in this process --


def _packed(seed: int = 0, b: int = 2, s: int = 48, eod: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 8, (b, s), generator=g)  # eod = 0: about one token in 8 ends a document
    tokens[0, :2] = eod  # empty documents and an EOD first
    return tokens, eod


def test_document_ids_match_megatrons_reset_attention_mask():
    """The documents we derive from EODs are exactly megatron-core's ``reset_attention_mask`` (its dense
    mask, ``create_attention_mask=True``), sample by sample."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens, eod = _packed()
    ids = document_ids_from_tokens(tokens, eod)
    s = tokens.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for row, doc in zip(tokens, ids):
        masked, _, _ = _get_ltor_masks_and_position_ids(row, eod, False, True, False, True)
        ours = (doc[:, None] == doc[None, :]) & causal
        assert torch.equal(~masked[0], ours)


def _reference(q, k, v, ids):
    s = ids.shape[1]
    i = torch.arange(s)
    mask = (ids[:, :, None] == ids[:, None, :]) & (i[:, None] >= i[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=k.shape[1] != q.shape[1])


def test_document_attention_equals_the_dense_mask():
    tokens, eod = _packed()
    ids = document_ids_from_tokens(tokens, eod)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 48, 16, generator=g)
    k, v = (torch.randn(2, 2, 48, 16, generator=g) for _ in "kv")
    out = document_attention(q, k, v, DocumentLayout(document_ids=ids))
    assert (out - _reference(q, k, v, ids)).abs().max() < 1e-6


@pytest.mark.parametrize("cp", [2, 4])
def test_document_attention_under_context_parallel_layout(cp):
    """A CP rank holds chunks r and 2cp-1-r of the sequence (megatron's get_batch_on_this_cp_rank) and, after
    a K/V all-gather, every key in global order: its queries' outputs are the CP=1 rows, for documents that
    cross chunk boundaries (runs that start mid-document take the masked path)."""
    tokens, eod = _packed(seed=3)
    ids = document_ids_from_tokens(tokens, eod)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 48, 16, generator=g)
    k, v = (torch.randn(2, 2, 48, 16, generator=g) for _ in "kv")
    reference = _reference(q, k, v, ids)
    crossing = 0
    for rank in range(cp):
        index = cp_query_index(48, cp, rank)
        layout = DocumentLayout(document_ids=ids, query_index=index)
        out = document_attention(q[:, :, index], k, v, layout)
        assert (out - reference[:, :, index]).abs().max() < 1e-6, rank
        crossing += sum(key_lo < int(index[lo]) for runs in layout.runs() for lo, _, key_lo, _ in runs)
    assert crossing > 0  # some run started inside its document


def test_layout_is_not_thd():
    """megatron's THD branches (squeezed q/k/v, cu_seqlens rotary) stay off for our layout."""
    layout = DocumentLayout(document_ids=torch.zeros(1, 8, dtype=torch.int64))
    assert layout.qkv_format == "sbhd" and layout.max_seqlen_q == layout.max_seqlen_kv == 8
    assert layout.masks_documents and not DocumentLayout(position_ids=torch.zeros(1, 8)).masks_documents
