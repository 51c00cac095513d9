"""Extend a model's context by continued pretraining with a new rotary plan (Resonance YaRN by default).

    python finetune/extend_context.py --nproc-per-node 2 --load outputs/demo/ckpt/pretrain \
        --seq-length 512 --rope-kind resonance_yarn --save outputs/demo/ckpt/resonance_yarn \
        --data-path outputs/demo/data/train_text_document --tokenizer-model outputs/demo/tokenizer.model

    # the paper's LLaMA-2 7B 4K -> 32K run, one torchrun per node:
    torchrun ... finetune/extend_context.py --config configs/llama2_7b_4k_to_32k_resonance_yarn.yaml ...

The model comes from `--load` (a pretrained checkpoint or one converted from Hugging Face). Its stored
length becomes the original length L (override: --original-max-position); the target length L' is
--seq-length; the factor s = L'/L (override: --rope-factor). A source that already carries scaling (a
Llama-3.1 `llama3` checkpoint, a YaRN model) keeps its plan and original length, and its factor grows
with the length; switching it to another kind is refused, since that would drop the scaling.
Optimizer, scheduler and iteration count start fresh (paper recipe: AdamW, lr 2e-5, weight decay 0.01,
5 % warm-up). A requeued job resumes from --save.
"""

import sys

from megatron_resonance.training import preemption

if __name__ == "__main__":  # first: a preemption signal during the seconds of imports is recorded, not fatal
    preemption.install()

from megatron_resonance.training import launch  # noqa: E402
from megatron_resonance.training.extension import PAPER_DEFAULTS, make_config  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(
        launch.main(
            __file__,
            "extend_context.py",
            "Extend a model's context with a new rotary plan (continued pretraining).",
            make_config,
        )
    )
