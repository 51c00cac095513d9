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
# Before anything is submitted, every stage is checked here (tools/check_pipeline.py, with PYTHON): the
# source converts, the extension's configuration is valid at its world size (NODES x NPROC_PER_NODE) with
# its data and tokenizer, its training step and the evaluation's longest length fit the memory (the layout
# planner's estimate; GPU_MEMORY_GB, or on CPU the nodes' memory). A problem is one line, nothing submitted.
#
# Rerunning: submit again with the same variables and WORK_DIR (after a failure, a cancel, a fix). Stages
# whose output is complete are skipped (a verified checkpoint; an export that reads back; a report with
# every length and the same evaluation flags), the first incomplete one and every later one run: the
# extension resumes from its last checkpoint, a conversion or export left incomplete is replaced. Refused while the last submission's jobs
# are still queued or running. OVERWRITE=1 runs every stage again (old extension checkpoints are moved to
# WORK_DIR/extended.old-<time>, never deleted).
#
# Run it where you run sbatch (a login node); it prints what each stage does and the job ids, and exits.
# Logs go to WORK_DIR/logs/<job name>-<job id>.out. Everything the job scripts read that is not set here
# (CONTAINER, CONTAINER_MOUNTS, MAX_REQUEUES, SIGNAL_REPEAT, NCCL_*, OMP_NUM_THREADS, ...) passes through
# from your environment, as do sbatch's SBATCH_ACCOUNT / SBATCH_PARTITION / SBATCH_TIMELIMIT. A job script
# variable the pipeline sets per stage (LOAD, SAVE, CONFIG, DTYPE, ...) is refused: use the one below.
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
NODES=${NODES:-1}                # nodes for the extension
GPUS_PER_NODE=${GPUS_PER_NODE:-8} # GPUs per node. 0 = CPU mode for every stage (gloo; asks sbatch for
#                                  --gpus-per-node=0)
NPROC_PER_NODE=${NPROC_PER_NODE:-} # extension processes per node (default GPUS_PER_NODE; CPU mode 2)
GPU_MEMORY_GB=${GPU_MEMORY_GB:-80} # GiB per GPU, for the memory checks (GPU mode)
# --- 3. export
EXPORT_DTYPE=${EXPORT_DTYPE:-}   # dtype of the exported weights (default: the checkpoint's)
ROPE_FORMAT=${ROPE_FORMAT:-}     # longrope (portable, default) or custom
# --- 4. eval
EVAL_LENGTHS=${EVAL_LENGTHS:-4096,8192,16384,32768} # context lengths, comma-separated
EVAL_DATA=${EVAL_DATA:-}         # JSONL or indexed-dataset prefix (default: held-out standard-library text)
EVAL_BASELINE=${EVAL_BASELINE:-1} # 1: evaluate HF_MODEL too, in the same report
EVAL_ARGS=${EVAL_ARGS:-}         # more flags of tools/eval_perplexity.py (whitespace-split), e.g. "--stride 1024"
# --- every stage
OVERWRITE=${OVERWRITE:-0}        # 1: run every stage again, even those whose output is complete
PYTHON=${PYTHON:-python3}        # interpreter with torch + megatron-core, for the check here and the jobs
# --- sbatch options (whitespace-split), for every job and per stage
SBATCH_ARGS=${SBATCH_ARGS:-}     # e.g. "--account=proj --partition=gpu --qos=normal"
CONVERT_SBATCH_ARGS=${CONVERT_SBATCH_ARGS:-} # convert and export, e.g. "--mem=64G"
EXTEND_SBATCH_ARGS=${EXTEND_SBATCH_ARGS:-}   # e.g. "--time=08:00:00"
EVAL_SBATCH_ARGS=${EVAL_SBATCH_ARGS:-}       # CPU mode: --mem=... is the memory the check counts (default:
#                                              the whole node, --mem=0 --exclusive: its memory and cores)
JOB_PREFIX=${JOB_PREFIX:-mr}     # job names: <prefix>-convert, -extend, -export, -eval
DRY_RUN=${DRY_RUN:-0}            # 1: check, then print each sbatch command and the command its job would
#                                  run; submit nothing
# ==========================================================================================================

die() { echo "submit_pipeline.sh: error: $*" >&2; exit 2; }
say() { echo "submit_pipeline.sh: $*"; }
source "$REPO/slurm/common.sh" # mr_trainer_args: the extension's flags, exactly as its job builds them

# Job script variables the pipeline sets per stage, and what to set instead.
declare -A INSTEAD=(
  [DIRECTION]="nothing (the pipeline converts in both directions)" [LOAD]="HF_MODEL and WORK_DIR"
  [SAVE]="WORK_DIR" [HF]="HF_MODEL and WORK_DIR" [OUT]="WORK_DIR" [RUN_DIR]="OUTPUT_DIR"
  [DATA]="EVAL_DATA" [TOKENIZER]="EVAL_ARGS=\"--tokenizer ...\"" [LENGTHS]="EVAL_LENGTHS"
  [CONFIG]="EXTEND_CONFIG" [DTYPE]="CONVERT_DTYPE or EXPORT_DTYPE" [HF_REFERENCE]="nothing (HF_MODEL is used)"
  [ROPE_FACTOR]="TRAIN_ARGS=\"--rope-factor ...\"" [CONVERT_ARGS]="CONVERT_DTYPE, EXPORT_DTYPE, ROPE_FORMAT"
  [STRIDE]="EVAL_ARGS=\"--stride ...\"" [MAX_DOCUMENTS]="EVAL_ARGS=\"--max-documents ...\""
)
for v in "${!INSTEAD[@]}"; do
  [[ -z ${!v:-} ]] || die "$v=${!v} is a job script's variable that the pipeline sets per stage; set ${INSTEAD[$v]} instead (or unset $v)"
done
for v in NODES GPUS_PER_NODE; do mr_is_uint "${!v}" || die "$v must be a number, got '${!v}'"; done
((GPUS_PER_NODE > 0)) || NPROC_PER_NODE=${NPROC_PER_NODE:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
mr_is_uint "$NPROC_PER_NODE" && ((NPROC_PER_NODE > 0)) || die "NPROC_PER_NODE must be >= 1, got '$NPROC_PER_NODE'"
[[ $OVERWRITE == 0 || $OVERWRITE == 1 ]] || die "OVERWRITE must be 0 or 1, got '$OVERWRITE'"
[[ -n $HF_MODEL ]] || die "set HF_MODEL to the Hugging Face model directory to extend"
[[ -f $HF_MODEL/config.json ]] || die "HF_MODEL=$HF_MODEL: no config.json there"
HF_MODEL=$(mr_abspath "$HF_MODEL")
WORK_DIR=$(mr_abspath "${WORK_DIR:-outputs/pipeline/$(basename "$HF_MODEL")}")
EXTEND_CONFIG=$(mr_repo_file "$EXTEND_CONFIG") # as given, else inside the repository
[[ -z $EXTEND_CONFIG || -f $EXTEND_CONFIG ]] || die "EXTEND_CONFIG=$EXTEND_CONFIG not found"
export OUTPUT_DIR=${OUTPUT_DIR:-$WORK_DIR/runs}

# ---- the last submission's jobs must have ended ------------------------------------------------------------
if [[ -s $WORK_DIR/jobs.txt ]]; then
  ids=$(tail -n1 "$WORK_DIR/jobs.txt" | grep -o '=[0-9]*' | tr -d = | paste -sd, -) || true
  if [[ -n $ids ]]; then
    live=$(squeue -h -j "$ids" -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING,REQUEUED -o %i 2>/dev/null |
      paste -sd, -) || true
    [[ -z $live ]] || die "jobs $live of this WORK_DIR's last submission are still queued or running" \
      "(squeue -j $live): wait for them, or scancel them, then submit again"
  fi
fi

# ---- check every stage; which ones run ----------------------------------------------------------------
memory_gb() { # sbatch --mem value (MB default; K/M/G/T) in GiB; empty for none or 0
  local v=${1^^} unit=M
  [[ $v =~ ^([0-9]+)([KMGT]?)B?$ ]] || return 0
  ((BASH_REMATCH[1] > 0)) || return 0
  [[ -n ${BASH_REMATCH[2]} ]] && unit=${BASH_REMATCH[2]}
  awk -v n="${BASH_REMATCH[1]}" -v u="$unit" 'BEGIN { f = (u=="K") ? 1/1048576 : (u=="M") ? 1/1024 : (u=="G") ? 1 : 1024; printf "%.3f", n * f }'
}
check=(--hf-model "$HF_MODEL" --work-dir "$WORK_DIR" --nodes "$NODES" --nproc-per-node "$NPROC_PER_NODE"
  --gpus-per-node "$GPUS_PER_NODE" --gpu-memory-gb "$GPU_MEMORY_GB" --eval-lengths "$EVAL_LENGTHS")
[[ -n $CONVERT_DTYPE ]] && check+=(--convert-dtype "$CONVERT_DTYPE")
[[ -n $EXPORT_DTYPE ]] && check+=(--export-dtype "$EXPORT_DTYPE")
[[ -n $ROPE_FORMAT ]] && check+=(--rope-format "$ROPE_FORMAT")
[[ -n $EVAL_DATA ]] && check+=(--eval-data "$(mr_abspath "$EVAL_DATA")")
check+=(--eval-args="$EVAL_ARGS")
[[ $OVERWRITE == 1 ]] && check+=(--overwrite)
models=$WORK_DIR/hf names="--name extended"
check+=(--eval-model extended)
if [[ $EVAL_BASELINE == 1 ]]; then models=$HF_MODEL,$models names="--name original $names" check+=(--eval-model original); fi
eval_opts_given="$SBATCH_ARGS $EVAL_SBATCH_ARGS"
eval_mem=()
if ((GPUS_PER_NODE == 0)); then
  # CPU mode: the nodes' memory (the smallest, from sinfo), and the eval job's --mem (default the whole node,
  # whose cores its forward passes then use too)
  node_mb=$(sinfo -h -N -o %m 2>/dev/null | tr -d + | sort -n | head -n1) || true
  if [[ -n $node_mb ]]; then
    check+=(--node-memory-gb "$(memory_gb "$node_mb")")
  else
    say "memory not checked: sinfo shows no node memory (no Slurm reachable)"
  fi
  mem=$(grep -o -- '--mem=[^ ]*' <<<"$eval_opts_given" | tail -n1 | cut -d= -f2) || true
  mem_gb=$(memory_gb "$mem")
  if [[ -z $mem ]]; then eval_mem=(--mem=0 --exclusive); elif [[ -n $mem_gb ]]; then check+=(--eval-memory-gb "$mem_gb"); fi
fi
# The extension's trainer flags, built as its job builds them.
mapfile -d '' -t MR_ARGS < <(
  CONFIG=$EXTEND_CONFIG LOAD=$WORK_DIR/megatron SAVE=$WORK_DIR/extended RUN_DIR=$WORK_DIR
  mr_trainer_args
  printf '%s\0' "${MR_ARGS[@]}"
)
plan=$(PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" "$REPO/tools/check_pipeline.py" "${check[@]}" -- \
  "${MR_ARGS[@]}") || exit 2 # its one error line is on stderr
declare -A ACTION
while read -r stage action detail; do
  ACTION[$stage]=$action
  say "$stage: $action $detail"
done <<<"$plan"

# ---- submit ---------------------------------------------------------------------------------------------
[[ $DRY_RUN == 1 ]] || mkdir -p "$WORK_DIR/logs"
# Variables that mean something different in each job script: cleared, then set per stage.
STAGE_VARS=("${!INSTEAD[@]}" ROPE_KIND ROPE_FORMAT OVERWRITE DATA_PATH MOCK_DATA TOKENIZER_MODEL TRAIN_ARGS
  EVAL_ARGS TP PP CP GPUS_PER_NODE NPROC_PER_NODE)
read -ra common <<<"$SBATCH_ARGS"
common+=(--output="$WORK_DIR/logs/%x-%j.out")
gpus=(--gpus-per-node="$GPUS_PER_NODE")
cpu=()
((GPUS_PER_NODE > 0)) || cpu=(GPUS_PER_NODE=0)

# submit NAME SCRIPT SBATCH_OPTIONS... -- VAR=VALUE...: JOB = the job id ("" when the stage is skipped);
# it depends on the previous submitted stage (DEP).
DEP=''
submit() {
  local name=$1 script=$2 opts=() vars=() clear=() v
  shift 2
  JOB=''
  if [[ ${ACTION[$name]} == skip ]]; then return; fi
  while (($#)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
  (($#)) && shift
  vars=("$@" OUTPUT_DIR="$OUTPUT_DIR" PYTHON="$PYTHON")
  for v in "${STAGE_VARS[@]}"; do clear+=(-u "$v"); done
  local cmd=(sbatch --parsable --job-name="$JOB_PREFIX-$name" "${common[@]}")
  [[ -n $DEP ]] && cmd+=(--dependency="afterok:$DEP" --kill-on-invalid-dep=yes)
  cmd+=("${opts[@]}" "$REPO/slurm/$script")
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' env "${vars[@]}" "${cmd[@]}"
    echo
    # what the job would run: the job script's own dry run, with the job's variables
    env "${clear[@]}" "${vars[@]}" DRY_RUN=1 SLURM_NNODES="${NODES_OF_JOB:-1}" bash "$REPO/slurm/$script" 2>&1 |
      sed 's/^/    /'
    JOB="<$name>" DEP=$JOB
    return
  fi
  local out
  # WORK_DIR/jobs.txt: a line per submission, "<stage>=<job id> ..." (skipped stages are not listed); each id
  # is written at once, so that a resubmission sees it even when a later sbatch fails
  [[ -n $DEP ]] || trap 'echo >>"$WORK_DIR/jobs.txt"' EXIT
  out=$(env "${clear[@]}" "${vars[@]}" "${cmd[@]}") || die "sbatch of the $name job failed"
  JOB=${out%%;*} DEP=$JOB
  printf '%s=%s ' "$name" "$JOB" >>"$WORK_DIR/jobs.txt"
}

read -ra convert_opts <<<"$CONVERT_SBATCH_ARGS"
read -ra extend_opts <<<"$EXTEND_SBATCH_ARGS"
read -ra eval_opts <<<"$EVAL_SBATCH_ARGS"
overwrite() { [[ ${ACTION[$1]} == replace ]] && echo 1 || echo 0; }

if [[ ${ACTION[extend]} == replace && $DRY_RUN != 1 ]]; then
  aside=$WORK_DIR/extended.old-$(date +%Y%m%d-%H%M%S)
  mv "$WORK_DIR/extended" "$aside" || die "cannot move $WORK_DIR/extended aside"
  say "extend: moved the earlier checkpoints to $aside"
fi
submit convert convert.sbatch "${convert_opts[@]}" -- \
  DIRECTION=hf_to_megatron LOAD="$HF_MODEL" SAVE="$WORK_DIR/megatron" DTYPE="$CONVERT_DTYPE" \
  OVERWRITE="$(overwrite convert)"
convert=$JOB
NODES_OF_JOB=$NODES submit extend extend_context.sbatch --nodes="$NODES" "${gpus[@]}" "${extend_opts[@]}" -- \
  GPUS_PER_NODE="$GPUS_PER_NODE" NPROC_PER_NODE="$NPROC_PER_NODE" CONFIG="$EXTEND_CONFIG" \
  LOAD="$WORK_DIR/megatron" SAVE="$WORK_DIR/extended" ROPE_KIND="$ROPE_KIND" DATA_PATH="$DATA_PATH" \
  MOCK_DATA="$MOCK_DATA" TOKENIZER_MODEL="$TOKENIZER_MODEL" TRAIN_ARGS="$TRAIN_ARGS" TP="$TP" PP="$PP" CP="$CP"
extend=$JOB
submit export convert.sbatch "${convert_opts[@]}" -- \
  DIRECTION=megatron_to_hf LOAD="$WORK_DIR/extended" SAVE="$WORK_DIR/hf" HF_REFERENCE="$HF_MODEL" \
  DTYPE="$EXPORT_DTYPE" ROPE_FORMAT="$ROPE_FORMAT" OVERWRITE="$(overwrite export)"
export_=$JOB
eval_gpus=()
((GPUS_PER_NODE > 0)) || eval_gpus=(--gpus-per-node=0)
submit eval eval.sbatch "${eval_gpus[@]}" "${eval_mem[@]}" "${eval_opts[@]}" -- "${cpu[@]}" \
  HF="$models" LENGTHS="$EVAL_LENGTHS" DATA="$(mr_abspath "$EVAL_DATA")" OUT="$WORK_DIR/eval" EVAL_ARGS="$names $EVAL_ARGS"
eval_=$JOB

if [[ -z $convert$extend$export_$eval_ ]]; then
  say "nothing to submit: every stage is complete (OVERWRITE=1 runs them again); results: $WORK_DIR/eval/report.md"
  exit 0
fi
echo "convert=${convert:-skipped} extend=${extend:-skipped} export=${export_:-skipped} eval=${eval_:-skipped}"
say "results: $WORK_DIR/eval/report.md; logs: $WORK_DIR/logs"
