"""torchrun worker for test_datasets.py: build GPT datasets under gloo and report what every rank sees.

torchrun --nproc-per-node 2 tests/data/datasets_worker.py OUT_DIR DATA_DIR SEQ_LENGTH
"""

from __future__ import annotations


def describe(dataset, n=6):
    samples = [dataset[i] for i in range(n)]
    return dict(
        length=len(dataset),
        keys=sorted(samples[0]),
        shapes=sorted({tuple(v.shape) for s in samples for v in s.values()}),
        dtypes={k: str(v.dtype) for k, v in samples[0].items()},
        tokens=[s["tokens"].tolist() for s in samples],
        labels_are_shifted=all(bool((s["tokens"][1:] == s["labels"][:-1]).all()) for s in samples),
        positions_are_arange=all(s["position_ids"].tolist() == list(range(len(s["tokens"]))) for s in samples),
        loss_mask_sum=[float(s["loss_mask"].sum()) for s in samples],
    )


if __name__ == "__main__":
    import json
    import os
    import sys

    import torch.distributed as dist

    from megatron_resonance.data import Tokenizer, build_gpt_datasets
    from megatron_resonance.megatron.distributed import init_process_group

    out_dir, data_dir, seq_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    init_process_group()
    rank = dist.get_rank()
    tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))
    common = dict(
        seq_length=seq_length,
        seed=1234,
        train_samples=40,
        valid_samples=8,
        vocab_size=tok.vocab_size,
        eod_id=tok.eos_id,
    )
    report = {}

    train, valid = build_gpt_datasets(
        **common,
        tokenizer_name="tokenizer.model",
        train_data_prefix=os.path.join(data_dir, "train"),
        valid_data_prefix=os.path.join(data_dir, "valid"),
        cache_dir=os.path.join(out_dir, "cache"),
    )
    report["per_split"] = dict(train=describe(train), valid=describe(valid))

    train, valid = build_gpt_datasets(
        **common,
        tokenizer_name="tokenizer.model",
        data_prefix=[os.path.join(data_dir, "train")],
        split="90,10,0",
        cache_dir=os.path.join(out_dir, "cache"),
    )
    report["blend_split"] = dict(train=describe(train), valid=describe(valid))

    train, valid = build_gpt_datasets(**common, mock=True)
    report["mock"] = dict(train=describe(train), valid=describe(valid), type=type(train).__name__)

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
