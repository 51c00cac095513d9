#!/usr/bin/env bash
# Submit the whole context extension of a Hugging Face LLaMA as four Slurm jobs, each starting only after
# the previous one succeeded (--dependency=afterok; --kill-on-invalid-dep=yes cancels the rest after a
# failure instead of leaving them pending forever):
#
#   1. convert  HF_MODEL          -> WORK_DIR/megatron   slurm/convert.sbatch (hf_to_megatron)
#   2. extend   WORK_DIR/megatron -> WORK_DIR/extended   slurm/extend_context.sbatch (requeues itself on
#                                                        time limits; dependents wait through requeues)
#   3. export   WORK_DIR/extended -> WORK_DIR/hf         slurm/convert.sbatch (megatron_to_hf)
#   4. eval     WORK_DIR/hf (and HF_MODEL)  -> WORK_DIR/eval   slurm/eval.sbatch
#
#   HF_MODEL=hf/Llama-2-7b-hf WORK_DIR=runs/llama2-7b-32k DATA_PATH=data/pg19_text_document \
#     TOKENIZER_MODEL=hf/Llama-2-7b-hf/tokenizer.model EVAL_DATA=data/pg19_valid.jsonl slurm/submit_pipeline.sh
#
#   # 13B, 4K -> 16K on two nodes
#   HF_MODEL=hf/Llama-2-13b-hf EXTEND_CONFIG=configs/llama2_13b_4k_to_16k_resonance_yarn.yaml NODES=2 \
#     EVAL_LENGTHS=4096,8192,16384 ... slurm/submit_pipeline.sh
#
# Run it where you run sbatch (a login node); it prints the four job ids and exits. Logs go to
# WORK_DIR/logs/<job name>-<job id>.out. Everything the job scripts read that is not set here (CONTAINER,
# CONTAINER_MOUNTS, PYTHON, NCCL_*, MAX_REQUEUES, ...) passes through from your environment, as do sbatch's
# SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_TIMELIMIT.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ==========================================================================================================
# Configuration: environment variables. Relative paths are relative to the current directory.
# ==========================================================================================================
HF_MODEL=${HF_MODEL:-}           # the Hugging Face LLaMA to extend (config.json + weights + tokenizer files)
WORK_DIR=${WORK_DIR:-}           # where every stage writes (default outputs/pipeline/<HF_MODEL name>)
# --- 1. convert
CONVERT_DTYPE=${CONVERT_DTYPE:-} # dtype of the Megatron checkpoint (default: the source's)
# --- 2. extend
EXTEND_CONFIG=${EXTEND_CONFIG-configs/llama2_7b_4k_to_32k_resonance_yarn.yaml} # preset; empty for none
ROPE_KIND=${ROPE_KIND:-}         # rotary kind (default: the preset's, resonance_yarn)
DATA_PATH=${DATA_PATH:-}         # indexed dataset prefix for continued pretraining
MOCK_DATA=${MOCK_DATA:-0}        # 1: synthetic tokens instead of DATA_PATH (smoke tests)
TOKENIZER_MODEL=${TOKENIZER_MODEL:-} # SentencePiece model of DATA_PATH
TRAIN_ARGS=${TRAIN_ARGS:-}       # more trainer flags (whitespace-split), e.g. "--train-iters 100"
TP=${TP:-}                       # parallel layout of the extension (empty: the preset's)
PP=${PP:-}
CP=${CP:-}
NODES=${NODES:-}                 # nodes for the extension (default: the script's, 1)
GPUS_PER_NODE=${GPUS_PER_NODE:-} # GPUs per node (default: the scripts' --gpus-per-node). 0 = CPU mode for
#                                  every stage (gloo; also asks sbatch for --gpus-per-node=0)
# --- 3. export
EXPORT_DTYPE=${EXPORT_DTYPE:-}   # dtype of the exported weights (default: the checkpoint's)
ROPE_FORMAT=${ROPE_FORMAT:-}     # longrope (portable, default) or custom
# --- 4. eval
EVAL_LENGTHS=${EVAL_LENGTHS:-4096,8192,16384,32768} # context lengths, comma-separated
EVAL_DATA=${EVAL_DATA:-}         # JSONL or indexed-dataset prefix (default: held-out standard-library text)
EVAL_BASELINE=${EVAL_BASELINE:-1} # 1: evaluate HF_MODEL too, in the same report
EVAL_ARGS=${EVAL_ARGS:-}         # more flags of tools/eval_perplexity.py (whitespace-split)
# --- sbatch options (whitespace-split), for every job and per stage
SBATCH_ARGS=${SBATCH_ARGS:-}     # e.g. "--account=proj --partition=gpu --qos=normal"
CONVERT_SBATCH_ARGS=${CONVERT_SBATCH_ARGS:-} # convert and export, e.g. "--mem=64G"
EXTEND_SBATCH_ARGS=${EXTEND_SBATCH_ARGS:-}   # e.g. "--time=08:00:00"
EVAL_SBATCH_ARGS=${EVAL_SBATCH_ARGS:-}
JOB_PREFIX=${JOB_PREFIX:-mr}     # job names: <prefix>-convert, -extend, -export, -eval
DRY_RUN=${DRY_RUN:-0}            # 1: print the sbatch commands, submit nothing
# ==========================================================================================================

die() { echo "submit_pipeline.sh: error: $*" >&2; exit 2; }
abspath() { if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }

[[ -n $HF_MODEL ]] || die "set HF_MODEL to the Hugging Face model directory to extend"
[[ $DRY_RUN == 1 || -f $HF_MODEL/config.json ]] || die "HF_MODEL=$HF_MODEL: no config.json there"
HF_MODEL=$(abspath "$HF_MODEL")
WORK_DIR=$(abspath "${WORK_DIR:-outputs/pipeline/$(basename "$HF_MODEL")}")
if [[ -n $EXTEND_CONFIG && ! -f $EXTEND_CONFIG ]]; then
  [[ -f $REPO/$EXTEND_CONFIG ]] || die "EXTEND_CONFIG=$EXTEND_CONFIG not found"
  EXTEND_CONFIG=$REPO/$EXTEND_CONFIG
fi
[[ -z $EXTEND_CONFIG ]] || EXTEND_CONFIG=$(abspath "$EXTEND_CONFIG")
[[ $DRY_RUN == 1 ]] || mkdir -p "$WORK_DIR/logs"

# Variables that mean something different in each job script: cleared, then set per stage.
STAGE_VARS=(DIRECTION LOAD SAVE HF OUT DATA TOKENIZER LENGTHS ROPE_KIND ROPE_FACTOR ROPE_FORMAT HF_REFERENCE
  DTYPE OVERWRITE CONFIG DATA_PATH MOCK_DATA TOKENIZER_MODEL TRAIN_ARGS CONVERT_ARGS EVAL_ARGS TP PP CP
  GPUS_PER_NODE NPROC_PER_NODE STRIDE MAX_DOCUMENTS RUN_DIR)
read -ra common <<<"$SBATCH_ARGS"
common+=(--output="$WORK_DIR/logs/%x-%j.out")
gpus=()
[[ -n $GPUS_PER_NODE ]] && gpus=(--gpus-per-node="$GPUS_PER_NODE")

# submit NAME DEPENDENCY SCRIPT SBATCH_OPTIONS... -- VAR=VALUE...: prints the job id.
submit() {
  local name=$1 dep=$2 script=$3 opts=() vars=() clear=() v
  shift 3
  while (($#)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
  (($#)) && shift
  vars=("$@" OUTPUT_DIR="${OUTPUT_DIR:-$WORK_DIR/runs}")
  for v in "${STAGE_VARS[@]}"; do clear+=(-u "$v"); done
  local cmd=(sbatch --parsable --job-name="$JOB_PREFIX-$name" "${common[@]}")
  [[ -n $dep ]] && cmd+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
  cmd+=("${opts[@]}" "$REPO/slurm/$script")
  if [[ $DRY_RUN == 1 ]]; then
    { printf '%q ' env "${vars[@]}" "${cmd[@]}"; echo; } >&2
    echo "<$name>"
    return
  fi
  local out
  out=$(env "${clear[@]}" "${vars[@]}" "${cmd[@]}") || die "sbatch of the $name job failed"
  echo "${out%%;*}"
}

read -ra convert_opts <<<"$CONVERT_SBATCH_ARGS"
read -ra extend_opts <<<"$EXTEND_SBATCH_ARGS"
read -ra eval_opts <<<"$EVAL_SBATCH_ARGS"
[[ -z $NODES ]] || extend_opts=(--nodes="$NODES" "${extend_opts[@]}")
cpu=()
[[ $GPUS_PER_NODE == 0 ]] && cpu=(GPUS_PER_NODE=0)

convert=$(submit convert "" convert.sbatch "${convert_opts[@]}" -- \
  DIRECTION=hf_to_megatron LOAD="$HF_MODEL" SAVE="$WORK_DIR/megatron" DTYPE="$CONVERT_DTYPE")
extend=$(submit extend "$convert" extend_context.sbatch "${gpus[@]}" "${extend_opts[@]}" -- \
  GPUS_PER_NODE="$GPUS_PER_NODE" CONFIG="$EXTEND_CONFIG" LOAD="$WORK_DIR/megatron" \
  SAVE="$WORK_DIR/extended" ROPE_KIND="$ROPE_KIND" DATA_PATH="$DATA_PATH" MOCK_DATA="$MOCK_DATA" \
  TOKENIZER_MODEL="$TOKENIZER_MODEL" TRAIN_ARGS="$TRAIN_ARGS" TP="$TP" PP="$PP" CP="$CP")
export_=$(submit export "$extend" convert.sbatch "${convert_opts[@]}" -- \
  DIRECTION=megatron_to_hf LOAD="$WORK_DIR/extended" SAVE="$WORK_DIR/hf" HF_REFERENCE="$HF_MODEL" \
  DTYPE="$EXPORT_DTYPE" ROPE_FORMAT="$ROPE_FORMAT")
models=$WORK_DIR/hf
names="--name extended"
if [[ $EVAL_BASELINE == 1 ]]; then models=$HF_MODEL,$models names="--name original $names"; fi
eval_gpus=()
[[ $GPUS_PER_NODE == 0 ]] && eval_gpus=(--gpus-per-node=0)
eval_=$(submit eval "$export_" eval.sbatch "${eval_gpus[@]}" "${eval_opts[@]}" -- "${cpu[@]}" \
  HF="$models" LENGTHS="$EVAL_LENGTHS" DATA="$EVAL_DATA" OUT="$WORK_DIR/eval" EVAL_ARGS="$names $EVAL_ARGS")

echo "convert=$convert extend=$extend export=$export_ eval=$eval_"
[[ $DRY_RUN == 1 ]] || echo "convert=$convert extend=$extend export=$export_ eval=$eval_" >>"$WORK_DIR/jobs.txt"
echo "results: $WORK_DIR/eval/report.md; logs: $WORK_DIR/logs" >&2
