"""Pretrain a LLaMA-style model with Megatron-Core (TP/PP/VPP/CP/DP, distributed optimizer, dist checkpoints).

    # the embedded default, 2 CPU processes, tensor parallel:
    python pretrain/pretrain_llama.py --nproc-per-node 2 --config configs/demo.yaml \
        --tensor-model-parallel-size 2 --data-path outputs/demo/data/train_text_document \
        --tokenizer-model outputs/demo/tokenizer.model --save outputs/demo/ckpt/pretrain

    # on a GPU node (under Slurm: slurm/pretrain.sbatch runs one torchrun per node):
    torchrun --nproc-per-node 8 pretrain/pretrain_llama.py --config MY_PRESET.yaml --data-path ...

Every YAML field is a flag under its Megatron-LM name (`--help` lists them). Resumes from `--save` when it
holds a checkpoint; SIGTERM/SIGUSR1 save and exit 0.
"""

import sys

from megatron_resonance.training import preemption

if __name__ == "__main__":  # first: a preemption signal during the seconds of imports is recorded, not fatal
    preemption.install()

from megatron_resonance.training import launch  # noqa: E402
from megatron_resonance.training.config import config_from_args  # noqa: E402

if __name__ == "__main__":
    sys.exit(
        launch.main(
            __file__,
            "pretrain_llama.py",
            "Pretrain a LLaMA-style model on Megatron-Core.",
            config_from_args,
        )
    )
