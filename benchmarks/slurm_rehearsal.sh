#!/usr/bin/env bash
# A CPU rehearsal of slurm/submit_pipeline.sh end to end on the local Slurm (docs/slurm.md, "A CPU
# rehearsal"): a LLaMA of SmolLM-135M's shape (30 layers, 9 heads / 3 KV heads, vocabulary 49152; random
# weights: no model hub here) extended 1024 -> 2048 with the paper's 7B preset and the one override a CPU
# needs (TP=1 CP=1), then exported and evaluated at 1024 and 2048; prints each stage's wall time.
#
#   sudo slurm/local_cluster.sh install && sudo slurm/local_cluster.sh start   # once, as root
#   benchmarks/slurm_rehearsal.sh [WORK]       # default runs/slurm_rehearsal; the pipeline's variables pass
#   OMP_NUM_THREADS=1 benchmarks/slurm_rehearsal.sh runs/rehearsal_1thread     # the old one-thread setting
#
# ITERS (default 4) extension steps of one 2048-token sequence. Takes ~10 min on 2 cores.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(realpath -m "${1:-runs/slurm_rehearsal}")
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ITERS=${ITERS:-4}
eval "$("$REPO/slurm/local_cluster.sh" env)"
mkdir -p "$WORK"

if [[ ! -f $WORK/model/config.json ]]; then
  "$PYTHON" - "$WORK" <<'EOF'
import json, random, sys
import torch, transformers
work = sys.argv[1]
config = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(f"{work}/model")
random.seed(0)
with open(f"{work}/eval.jsonl", "w") as f:  # 4 documents of token ids, longer than every length
    for _ in range(4):
        f.write(json.dumps({"tokens": [random.randrange(49152) for _ in range(2100)]}) + "\n")
EOF
fi

start=$(date +%s)
HF_MODEL=$WORK/model WORK_DIR=$WORK/pipeline GPUS_PER_NODE=0 NPROC_PER_NODE=1 TP=1 CP=1 PYTHON=$PYTHON \
  MOCK_DATA=1 TRAIN_ARGS="--seq-length 2048 --global-batch-size 1 --train-iters $ITERS --save-interval 2" \
  EVAL_LENGTHS=1024,2048 EVAL_DATA=$WORK/eval.jsonl "$REPO/slurm/submit_pipeline.sh" | tee "$WORK/submit.log"
eval_job=$(tail -n2 "$WORK/submit.log" | grep -o 'eval=[0-9]*' | cut -d= -f2) || true
[[ -n $eval_job ]] || exit 0
while squeue -h -j "$eval_job" 2>/dev/null | grep -q .; do sleep 5; done

# each stage's wall time from its log's first and last time stamps (mr_log lines)
echo "stage wall times (s):"
for log in "$WORK"/pipeline/logs/*.out; do
  first=$(grep -o '^\[[0-9-]* [0-9:]*\]' "$log" | head -n1 | tr -d '[]')
  last=$(grep -o '^\[[0-9-]* [0-9:]*\]' "$log" | tail -n1 | tr -d '[]')
  printf '  %-28s %5d  %s\n' "$(basename "$log" .out)" $(($(date -d "$last" +%s) - $(date -d "$first" +%s))) \
    "$(grep -o 'done, exit status [0-9]*\|training step ended with status [0-9]*' "$log" | tail -n1)"
done
grep -h 'CPU threads' "$WORK"/pipeline/logs/*extend*.out | head -n1
grep -h '^ *iteration\|\[train\]' "$WORK"/pipeline/logs/*extend*.out | tail -n "$ITERS" || true
echo "pipeline: $(($(date +%s) - start)) s from submission; report: $WORK/pipeline/eval/report.md"
cat "$WORK/pipeline/eval/report.md" 2>/dev/null | head -n 12 || true
