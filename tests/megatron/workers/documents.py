"""Worker: document masking through the trainer's ``forward_step`` on a tiny LLaMA.

    torchrun --nproc-per-node 1 tests/megatron/workers/documents.py OUT_DIR        # CP = 1 checks
    torchrun --nproc-per-node 2 tests/megatron/workers/documents.py OUT_DIR cp2    # CP = 2 parity (after them)

The CP = 1 run also saves each model's weights and every document's logits alone (``OUT_DIR/*.pt``); the
CP = 2 run loads those weights, runs the pack with megatron's load-balanced CP layout and compares the
gathered logits of each document with them (``OUT_DIR/results_cp2.json``).

Batches are built as the trainer builds them: megatron's own ``_get_ltor_masks_and_position_ids`` (what its
GPTDataset runs with ``reset_position_ids``) for the positions, ``documents.document_ids_from_tokens`` for
the documents (``micro_batches``), then ``training.step.forward_step``. Each check returns measurements; an
exception is recorded as ``{"error": traceback}`` (``tests.worker_checks``). Results go to
``OUT_DIR/results.json``; the assertions are in ``tests/megatron/test_documents.py``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from tests.tiny_llama import TINY, tiny_llama
from tests.worker_checks import run_check

#: the models: ``tiny_llama(kind)``; kinds other than rope trained at 16 positions, extended x4 (positions
#: past 16 use the scaled, rounded angles)
SEQ = TINY["max_position_embeddings"]
EOD = 255
#: two packed samples of three documents each, filling SEQ (the last one cut by the sample's end, no EOD);
#: lengths include each document's EOD
PACKINGS = ((20, 30, 14), (9, 40, 15))


def packed_batch(reset_position_ids: bool = True, reset_attention_mask: bool = True):
    """tokens, labels, loss_mask, position_ids (megatron's function) and document_ids of PACKINGS; the
    documents' tokens."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron_resonance.megatron.documents import document_ids_from_tokens

    g = torch.Generator().manual_seed(7)
    rows, docs = [], []
    for lengths in PACKINGS:
        row = []
        for i, n in enumerate(lengths):
            doc = torch.randint(0, EOD, (n,), generator=g)
            if i < len(lengths) - 1:
                doc[-1] = EOD
            row.append(doc)
        rows.append(torch.cat(row))
        docs.append(row)
    tokens = torch.stack(rows)
    positions = torch.stack(
        [
            _get_ltor_masks_and_position_ids(t, EOD, reset_position_ids, reset_attention_mask, True, False)[2]
            for t in tokens
        ]
    )
    batch = {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": torch.ones(tokens.shape),
        "position_ids": positions,
    }
    if reset_attention_mask:
        batch["document_ids"] = document_ids_from_tokens(tokens, EOD)
    return batch, docs


def logits_of(model, batch, reset_position_ids: bool) -> torch.Tensor:
    from megatron_resonance.training.step import forward_step

    with torch.no_grad():  # forward_step's evaluation path: the logits (padded vocabulary)
        logits, _ = forward_step(iter([dict(batch)]), model, score_vocab=256, reset_position_ids=reset_position_ids)
    return logits.float()


def alone(model, doc: torch.Tensor) -> torch.Tensor:
    """The document run by itself: positions 0..n-1, plain causal attention, no layout."""
    batch = {
        "tokens": doc[None],
        "labels": doc[None],
        "loss_mask": torch.ones(1, len(doc)),
        "position_ids": torch.arange(len(doc))[None],
    }
    return logits_of(model, batch, reset_position_ids=False)[0]


def check_parity():
    """Per rope kind and cpu_speed setting: max |logits(document in the pack) - logits(document alone)|."""
    from megatron_resonance.megatron import cpu_speed, llama

    out = {}
    for speed in (True, False):
        cpu_speed.set_enabled(speed)
        for kind in ("rope", "resonance_yarn"):
            torch.manual_seed(0)
            model = llama.for_inference(llama.build_model(tiny_llama(kind), seq_length=SEQ))[0]
            batch, docs = packed_batch()
            packed = logits_of(model, batch, reset_position_ids=True)
            unmasked = logits_of(model, {k: v for k, v in batch.items() if k != "document_ids"}, False)
            diffs, crossing, refs = [], [], []
            for b, row in enumerate(docs):
                start = 0
                for doc in row:
                    ref = alone(model, doc)
                    refs.append(ref)
                    diffs.append((packed[b, start : start + len(doc)] - ref).abs().max().item())
                    crossing.append((unmasked[b, start : start + len(doc)] - ref).abs().max().item())
                    start += len(doc)
            tag = f"{kind}/cpu_speed={'on' if speed else 'off'}"
            torch.save({"weights": model.state_dict(), "alone": refs}, _saved(tag))
            out[tag] = {
                "max_diff": max(diffs),
                "per_document": diffs,
                "flags_off_diff": crossing,
                "logit_scale": packed.abs().max().item(),
            }
    cpu_speed.set_enabled(True)
    return out


def check_gradients():
    """The loss of the pack (EOD tokens out of the loss, as --eod-mask-loss makes it) and its gradient
    against the sum over the documents alone (cpu_speed on: local_ops' rotary backward with [s, b, 1, d]
    angles)."""
    from megatron_resonance.megatron import llama
    from megatron_resonance.training.step import forward_step

    torch.manual_seed(0)
    model = llama.for_training(llama.build_model(tiny_llama("resonance_yarn"), seq_length=SEQ))[0]
    params = list(model.parameters())

    def grads():  # megatron DDP accumulates into main_grad (cpu_speed's fused weight-gradient accumulation)
        return [(p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).clone() for p in params]

    batch, docs = packed_batch()
    batch["loss_mask"] = (batch["tokens"] != EOD).float()
    # a document's labels inside the pack are its own next tokens, except its last one (the next document's
    # first token, or past the sample): out of both losses
    for b, row in enumerate(docs):
        start = 0
        for doc in row:
            batch["loss_mask"][b, start + len(doc) - 1] = 0
            start += len(doc)
    output, loss_fn = forward_step(iter([dict(batch)]), model, reset_position_ids=True)
    loss, _, _ = loss_fn(output)
    loss.backward()
    packed_grads = grads()
    model.zero_grad_buffer()
    total = 0.0
    for b, row in enumerate(docs):
        start = 0
        for doc in row:
            n = len(doc)
            single = {
                "tokens": doc[None],
                "labels": batch["labels"][b, start : start + n][None],
                "loss_mask": batch["loss_mask"][b, start : start + n][None],
                "position_ids": torch.arange(n)[None],
            }
            output, loss_fn = forward_step(iter([single]), model)
            part, _, _ = loss_fn(output)
            part.backward()
            total += part.item()
            start += n
    rel = [((a - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for a, g in zip(grads(), packed_grads)]
    return {"loss_packed": loss.item(), "loss_alone": total, "max_rel_grad_diff": max(rel)}


def check_rotary_positions():
    """The angles reaching the first layer: rows of the exact table at the per-document positions."""
    from megatron_resonance.megatron import llama
    from megatron_resonance.rope import compute_frequencies, rotary_angle_table

    out = {}
    for kind in ("rope", "resonance_yarn"):
        cfg = tiny_llama(kind)
        model = llama.for_inference(llama.build_model(cfg, seq_length=SEQ))[0]
        seen = {}

        def grab(module, args, kwargs):
            seen["emb"] = kwargs["rotary_pos_emb"]

        handle = model.decoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        for reset_attention_mask in (True, False):
            batch, _ = packed_batch(reset_attention_mask=reset_attention_mask)
            logits_of(model, batch, reset_position_ids=True)
            emb = seen["emb"]
            table = rotary_angle_table(compute_frequencies(cfg.rope), SEQ, 0)
            expected = torch.cat([table, table], dim=-1)[batch["position_ids"].t()].unsqueeze(2)
            out[f"{kind}/mask={reset_attention_mask}"] = {
                "shape": list(emb.shape),
                "exact": bool(torch.equal(emb, expected)),
                "positions": batch["position_ids"][0].tolist(),
            }
        handle.remove()
    return out


def check_positions_only():
    """--reset-position-ids alone (attention crosses documents): different logits from no reset, and
    equal to megatron's own forward when the positions are 0..s-1 (nothing to reset)."""
    from megatron_resonance.megatron import llama

    torch.manual_seed(0)
    model = llama.for_inference(llama.build_model(tiny_llama("resonance_yarn"), seq_length=SEQ))[0]
    batch, _ = packed_batch(reset_attention_mask=False)
    reset = logits_of(model, batch, reset_position_ids=True)
    plain = logits_of(model, dict(batch, position_ids=torch.arange(SEQ).expand(2, SEQ)), False)
    same = logits_of(model, dict(batch, position_ids=torch.arange(SEQ).expand(2, SEQ)), True)
    return {"reset_vs_plain": (reset - plain).abs().max().item(), "arange_vs_plain": (same - plain).abs().max().item()}


def check_parity_cp2():
    """At CP = 2 (2 ranks, megatron's load-balanced chunks, documents crossing chunk boundaries), from the
    CP = 1 run's weights: max |logits(document in the pack, gathered) - logits(document alone at CP = 1)|."""
    import torch.distributed as dist

    from megatron_resonance.megatron import cpu_speed, llama
    from megatron_resonance.megatron.documents import cp_query_index
    from megatron_resonance.training.step import forward_step

    out = {}
    for speed in (True, False):
        cpu_speed.set_enabled(speed)
        for kind in ("rope", "resonance_yarn"):
            tag = f"{kind}/cpu_speed={'on' if speed else 'off'}"
            saved = torch.load(_saved(tag))
            model = llama.for_inference(llama.build_model(tiny_llama(kind), seq_length=SEQ))[0]
            model.load_state_dict(saved["weights"])
            batch, docs = packed_batch()
            with torch.no_grad():
                local, _ = forward_step(iter([dict(batch)]), model, cp_size=2, score_vocab=256, reset_position_ids=True)
            parts = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(parts, local.contiguous())
            packed = torch.empty(local.shape[0], SEQ, local.shape[2])
            for rank, part in enumerate(parts):
                packed[:, cp_query_index(SEQ, 2, rank)] = part.float()
            diffs, refs = [], iter(saved["alone"])
            for b, row in enumerate(docs):
                start = 0
                for doc in row:
                    diffs.append((packed[b, start : start + len(doc)] - next(refs)).abs().max().item())
                    start += len(doc)
            out[tag] = {"max_diff": max(diffs), "per_document": diffs}
    cpu_speed.set_enabled(True)
    return out


CHECKS = [check_parity, check_gradients, check_rotary_positions, check_positions_only]
OUT_DIR = "."


def _saved(tag: str) -> str:
    return os.path.join(OUT_DIR, tag.replace("/", "_") + ".pt")


def main(out_dir: str, mode: str = "cp1") -> None:
    global OUT_DIR
    from megatron_resonance.megatron import distributed

    OUT_DIR = out_dir
    cp = 2 if mode == "cp2" else 1
    distributed.initialize(1, 1, None, cp)
    results = {}
    for check in [check_parity_cp2] if cp == 2 else CHECKS:
        results[check.__name__] = run_check(check)
    name = "results_cp2.json" if cp == 2 else "results.json"
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(results, f, indent=1, default=float)
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
