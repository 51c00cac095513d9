"""Passkey retrieval accuracy by length and depth for a Megatron checkpoint or a Hugging Face model.

    python tools/eval_passkey.py --load outputs/demo/ckpt/resonance_yarn --lengths 128,256,512 --trials 10 \
        --out outputs/demo/eval/passkey
    torchrun --nproc-per-node 2 tools/eval_passkey.py --load CKPT --tensor-model-parallel-size 2 \
        --lengths 4096,8192 --trials 20 --depths 0,0.25,0.5,0.75,1 --out eval/passkey
    python tools/eval_passkey.py --hf HF_DIR --add-bos --lengths 4096,8192 --trials 20 --out eval/passkey

Writes OUT/report.json, OUT/report.md and OUT/passkey.png; see megatron_resonance/evaluation/passkey.py.
Bad input is one error line and exit status 2.
"""

import sys

from megatron_resonance.evaluation.passkey import main

if __name__ == "__main__":
    sys.exit(main())
