# shellcheck shell=bash
# Sourced by slurm/*.sbatch, never run: the launcher (srun -> one torchrun per node), the rendezvous address,
# container wrapping, GPU/CPU settings, and the preemption flow (forward the warning signal, wait for the
# save, requeue). Each job script keeps its own configuration block; this file only reads those variables.
# Functions and globals are prefixed mr_ / MR_.
#
# Signals, as measured on Slurm 22.05 + torch 2.13 (tests/slurm/test_job_scripts.py checks the flow):
#   * `srun` forwards SIGUSR1 to every task, and Slurm delivers a step signal to every process of the step
#     (torchrun's workers included), not only to the task it started.
#   * torchrun does not handle SIGUSR1: by default it dies of it (exit 138) while its workers are saving.
#     The per-node wrapper below starts torchrun with SIGUSR1 ignored; the workers reinstall a handler
#     (the trainer's), so they save and exit 0, and torchrun then exits 0 like after any successful run.
#   * SIGTERM is the wrong signal to forward: SIGTERM to `srun` makes it cancel the step (SIGKILL after
#     KillWait, no save); SIGTERM to torchrun makes it exit 1 and SIGKILL workers still saving after 30 s.
#     The trainer still saves on SIGTERM, which helps when Slurm itself ends the job (scancel, preemption
#     with GraceTime): every process gets SIGTERM and the batch script waits instead of dying first.

mr_log() { echo "[$(date '+%F %T')] ${MR_KIND:-job} ${SLURM_JOB_ID:-}: $*" >&2; }
mr_die() { mr_log "error: $*"; exit 2; }

# mr_abspath PATH: PATH made absolute against the working directory (the directory sbatch ran in).
mr_abspath() { if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }

# mr_repo_file PATH: PATH as given when it exists there, else the same relative path inside the repository
# (so CONFIG=configs/x.yaml works from any submission directory).
mr_repo_file() {
  if [[ -z $1 || $1 == /* || -e $1 || ! -e $REPO/$1 ]]; then mr_abspath "$1"; else echo "$REPO/$1"; fi
}

mr_is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# mr_node_addr NODE: the node's NodeAddr from `scontrol show node` (how Slurm itself reaches it; a node name
# need not be a resolvable host name), else the name.
mr_node_addr() {
  local addr
  addr=$(scontrol show node --oneliner "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2) || true
  if [[ -z $addr || $addr == '(null)' ]]; then addr=$1; fi
  echo "$addr"
}

# ---- job setup ----------------------------------------------------------------------------------------

# mr_init KIND: run directory, devices, rendezvous address. Outside Slurm only with DRY_RUN=1 (the commands
# are printed with stand-in SLURM_* values).
mr_init() {
  MR_KIND=$1
  MR_SIGNAL=''
  MR_ENV=(MASTER_ADDR MASTER_PORT PYTHONPATH) # exported for the step (listed by mr_print_command)
  # Until mr_run_training takes over: remember an early warning instead of dying of it (bash's default).
  trap 'MR_SIGNAL=USR1' USR1
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    [[ ${DRY_RUN:-0} == 1 ]] || mr_die "submit this script with sbatch (or set DRY_RUN=1 to print its commands)"
    SLURM_JOB_ID=0 SLURM_JOB_NAME=mr-$MR_KIND SLURM_NNODES=${SLURM_NNODES:-1}
    SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-$(hostname -s)}
  fi
  RUN_DIR=$(mr_abspath "${RUN_DIR:-$OUTPUT_DIR/$SLURM_JOB_NAME-$SLURM_JOB_ID}")
  [[ ${DRY_RUN:-0} == 1 ]] || mkdir -p "$RUN_DIR"
  mr_setup_device
  local first
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1) || true
  # A dry run without a Slurm configuration: the nodelist's first name, unexpanded.
  [[ -n $first || ${DRY_RUN:-0} != 1 ]] || first=${SLURM_JOB_NODELIST%%[,[]*}
  [[ -n $first ]] || mr_die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  # The rendezvous host is node 0 (the first of the node list: Slurm numbers SLURM_NODEID in that order).
  MASTER_ADDR=$(mr_node_addr "$first")
  # Per job, so jobs sharing a node (the local cluster, small eval jobs) do not meet in one rendezvous; below
  # Linux's ephemeral range (32768+), so no outgoing connection holds it.
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  export MASTER_ADDR MASTER_PORT
  # The package from this checkout, also inside a container that has only its dependencies installed.
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  mr_log "start (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_NNODES} node(s) $SLURM_JOB_NODELIST," \
    "$MR_DEVICE x $NPROC_PER_NODE per node, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    local out
    out=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o ' StdOut=[^ ]*' | cut -d= -f2) || true
    if [[ -n $out ]]; then ln -sfn "$out" "$RUN_DIR/slurm.out"; fi
    { echo "# $(date '+%F %T') restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"
      env | grep -E '^(SLURM_(JOB_ID|JOB_NAME|NNODES|JOB_NODELIST|RESTART_COUNT|GPUS_PER_NODE)|(MASTER|NCCL|CUDA|TORCH_NCCL|OMP)_[A-Z_]+|PYTHONPATH)=' | sort || true
    } >>"$RUN_DIR/launch.log"
  fi
}

# mr_setup_device: GPU mode (NCCL) when GPUS_PER_NODE > 0, else CPU mode (gloo, no GPUs, no NCCL settings).
mr_setup_device() {
  if [[ -z ${GPUS_PER_NODE:-} ]]; then
    # What the job asked Slurm for (--gpus-per-node=8 or =a100:8), else a full 8-GPU node.
    GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}
  fi
  mr_is_uint "$GPUS_PER_NODE" || mr_die "GPUS_PER_NODE must be a number, got '$GPUS_PER_NODE'"
  if ((GPUS_PER_NODE > 0)); then
    MR_DEVICE=gpu
    MR_ENV+=(CUDA_DEVICE_MAX_CONNECTIONS NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING)
    NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
    # One hardware queue per GPU, so kernels start in launch order: megatron-core's tensor-parallel layers
    # rely on it to have the async TP/sequence-parallel all-gather / reduce-scatter scheduled before the
    # gradient GEMM it overlaps with (megatron/core/tensor_parallel/layers.py).
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # A rank that hits an NCCL error or timeout aborts (so srun --kill-on-bad-exit ends the job) instead of
    # hanging until the time limit. Cluster-specific NCCL_* (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) pass through.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  else
    MR_DEVICE=cpu
    MR_ENV+=(CUDA_VISIBLE_DEVICES)
    NPROC_PER_NODE=${NPROC_PER_NODE:-2}
    export CUDA_VISIBLE_DEVICES=  # gloo even on a GPU node: the trainer picks NCCL whenever CUDA is visible
    unset SLURM_GPUS_PER_NODE     # do not ask srun's step for GPUs the job does not have
  fi
  if ! mr_is_uint "$NPROC_PER_NODE" || ((NPROC_PER_NODE < 1)); then mr_die "NPROC_PER_NODE must be >= 1"; fi
  mr_setup_threads
}

# mr_setup_threads: MR_CPUS = the CPUs the job has on a node (SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE,
# else nproc), which the step gets (mr_srun_command); OMP_NUM_THREADS = MR_CPUS / NPROC_PER_NODE, at least 1,
# unless already set (yours wins). torchrun alone sets 1 when it starts several workers: the other cores idle.
# The same rule as the launcher's --nproc-per-node (megatron_resonance/environment.py threads_per_process).
mr_setup_threads() {
  local source=SLURM_CPUS_PER_TASK why
  MR_CPUS=${SLURM_CPUS_PER_TASK:-}
  [[ -n $MR_CPUS ]] || { source=SLURM_CPUS_ON_NODE MR_CPUS=${SLURM_CPUS_ON_NODE:-}; }
  [[ -n $MR_CPUS ]] || { source=nproc MR_CPUS=$(nproc); }
  mr_is_uint "$MR_CPUS" && ((MR_CPUS > 0)) || mr_die "$source must be a number of CPUs, got '$MR_CPUS'"
  if mr_is_uint "${OMP_NUM_THREADS:-}" && ((OMP_NUM_THREADS > 0)); then
    why="from OMP_NUM_THREADS"
  else
    OMP_NUM_THREADS=$((MR_CPUS / NPROC_PER_NODE > 1 ? MR_CPUS / NPROC_PER_NODE : 1))
    why="$MR_CPUS cores from $source / $NPROC_PER_NODE process$( ((NPROC_PER_NODE == 1)) || echo es)"
  fi
  export OMP_NUM_THREADS
  MR_ENV+=(OMP_NUM_THREADS)
  mr_log "CPU threads: $OMP_NUM_THREADS per process ($why)"
}

# ---- launcher -----------------------------------------------------------------------------------------

# mr_srun_command NODES: MR_SRUN = the srun prefix for a step of one task on each of NODES nodes, holding the
# job's CPUs of each node (MR_CPUS; else Slurm >= 22.05 gives a step's task 1 CPU, and task/affinity binds
# all its workers to that one core), with the pyxis container options when CONTAINER is set (the repository
# and submission directory are mounted at the same paths, so every path means the same inside and out).
mr_srun_command() {
  MR_SRUN=(srun --nodes="$1" --ntasks="$1" --ntasks-per-node=1 --cpus-per-task="$MR_CPUS" --kill-on-bad-exit=1)
  if [[ -n ${CONTAINER:-} ]]; then
    local mounts=$REPO:$REPO
    [[ $PWD == "$REPO" || $PWD == "$REPO"/* ]] || mounts+=",$PWD:$PWD"
    [[ -n ${CONTAINER_MOUNTS:-} ]] && mounts+=",$CONTAINER_MOUNTS"
    MR_SRUN+=(--container-image="$CONTAINER" --container-mounts="$mounts" --container-workdir="$PWD")
  fi
}

# mr_torchrun_command SCRIPT ARGS...: MR_CMD = one task per node running torchrun with NPROC_PER_NODE
# workers, static rendezvous at the first node of the job (MASTER_ADDR), node rank = SLURM_NODEID.
#   * Static, not c10d: c10d numbers the nodes in the order their torchrun agents arrive, so global rank 0
#     (pipeline stage 0, the rank that logs) would land on whichever node starts first. Static rendezvous
#     takes --node-rank: node i runs ranks i*NPROC_PER_NODE .. (i+1)*NPROC_PER_NODE-1, on every run and
#     requeue. What static lacks (elastic membership, agent restarts) these jobs do not use: the node count
#     is fixed and --max-restarts=0 (a failed step ends the job; a requeue resumes from SAVE).
#   * The `bash -c` wrapper runs on each node (so SLURM_NODEID is that node's) and starts torchrun with
#     SIGUSR1 ignored (see the top of this file); workers inherit that and the trainer installs its own
#     handler.
mr_torchrun_command() {
  mr_srun_command "$SLURM_NNODES"
  MR_CMD=("${MR_SRUN[@]}" bash -c \
    'trap "" USR1; python=$1; shift; exec "$python" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"' \
    mr-node "$PYTHON"
    --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE"
    --rdzv-backend=static --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
    --max-restarts=0 --log-dir="$RUN_DIR/torchrun"
    "$@")
}

# mr_python_command ARGS...: MR_CMD = one process on the first node (conversion, Hugging Face evaluation).
mr_python_command() {
  mr_srun_command 1
  MR_CMD=("${MR_SRUN[@]}" "$PYTHON" "$@")
}

# mr_print_command: MR_CMD as one copy-pasteable line, with the variables this file exported for it.
mr_print_command() {
  local name pairs=()
  for name in "${MR_ENV[@]}"; do pairs+=("$name=${!name}"); done
  printf '%q ' env "${pairs[@]}" "${MR_CMD[@]}"
  echo
}

# mr_run: run MR_CMD in the foreground (DRY_RUN=1: print it) and exit with its status.
mr_run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then mr_print_command; exit 0; fi
  { printf '# command: '; mr_print_command; } >>"$RUN_DIR/launch.log"
  local rc=0
  "${MR_CMD[@]}" || rc=$?
  mr_log "done, exit status $rc"
  exit "$rc"
}

# ---- trainer arguments ----------------------------------------------------------------------------------

# mr_trainer_args: MR_ARGS = trainer flags from the configuration block (CONFIG, LOAD, SAVE, data, layout,
# TRAIN_ARGS). Empty variables leave the preset's value.
mr_trainer_args() {
  MR_ARGS=()
  [[ -n ${CONFIG:-} ]] && { CONFIG=$(mr_repo_file "$CONFIG"); MR_ARGS+=(--config "$CONFIG"); }
  [[ -n ${LOAD:-} ]] && MR_ARGS+=(--load "$(mr_abspath "$LOAD")")
  SAVE=$(mr_abspath "${SAVE:-$RUN_DIR/checkpoints}")
  MR_ARGS+=(--save "$SAVE")
  [[ -n ${DATA_PATH:-} ]] && MR_ARGS+=(--data-path "$(mr_abspath "$DATA_PATH")")
  [[ ${MOCK_DATA:-0} == 1 ]] && MR_ARGS+=(--mock-data)
  [[ -n ${TOKENIZER_MODEL:-} ]] && MR_ARGS+=(--tokenizer-model "$(mr_abspath "$TOKENIZER_MODEL")")
  [[ -n ${ROPE_KIND:-} ]] && MR_ARGS+=(--rope-kind "$ROPE_KIND")
  [[ -n ${TP:-} ]] && MR_ARGS+=(--tensor-model-parallel-size "$TP")
  [[ -n ${PP:-} ]] && MR_ARGS+=(--pipeline-model-parallel-size "$PP")
  [[ -n ${CP:-} ]] && MR_ARGS+=(--context-parallel-size "$CP")
  local extra=()
  read -ra extra <<<"${TRAIN_ARGS:-}"
  MR_ARGS+=("${extra[@]}")
}

# ---- preemption -----------------------------------------------------------------------------------------

# mr_training_done: the checkpoint in SAVE has reached the run's train_iters (a requeue would only re-evaluate).
mr_training_done() {
  local it iters
  it=$(cat "$SAVE/latest_checkpointed_iteration.txt" 2>/dev/null) && mr_is_uint "$it" || return 1
  iters=$(grep -o '"train_iters": *[0-9]*' "$(printf '%s/iter_%07d/megatron_resonance.json' "$SAVE" "$it")" \
    2>/dev/null | head -n1 | grep -o '[0-9]*$') || return 1
  ((it >= iters))
}

mr_saved_iteration() { cat "$SAVE/latest_checkpointed_iteration.txt" 2>/dev/null || echo none; }

# The time limit as epoch seconds (0 when unlimited or unknown).
mr_end_time() {
  local end
  end=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o ' EndTime=[^ ]*' | cut -d= -f2)
  date -d "$end" +%s 2>/dev/null || echo 0
}

_mr_on_usr1() {
  if [[ -n ${MR_SIGNAL:-} ]]; then return; fi
  MR_SIGNAL=USR1
  mr_log "SIGUSR1 (time limit or preemption warning): telling the trainer to finish its step, save and exit"
  kill -USR1 "$MR_STEP_PID" 2>/dev/null || true
  _mr_watch "$(mr_end_time)" &
  MR_WATCH_PID=$!
}

_mr_on_term() {
  MR_SIGNAL=${MR_SIGNAL:-TERM}
  # Slurm itself is ending the job and signals every process; the trainer saves on SIGTERM. Waiting (instead
  # of bash's default: exit) keeps the job alive for the save until KillWait / GraceTime runs out.
  mr_log "SIGTERM: Slurm is ending the job; waiting for the trainer's save"
}

# _mr_watch END: background helper after the first USR1. Repeats the signal every SIGNAL_REPEAT seconds
# (a worker still loading the model ignores it: the trainer's handler is not installed yet), logging only the
# first repeat (a long step or save would fill the log) and keeping the count in MR_REPEATS_FILE for
# mr_run_training's last line; and requeues anyway REQUEUE_MARGIN seconds before the time limit if training
# has not stopped by then (the run resumes from the last complete checkpoint: `latest` is only written after
# a save finished).
_mr_watch() {
  local end=$1 next=$((SECONDS + SIGNAL_REPEAT)) repeats=0
  while kill -0 "$MR_STEP_PID" 2>/dev/null; do
    sleep 2
    if ((end > 0 && $(date +%s) >= end - REQUEUE_MARGIN)) && kill -0 "$MR_STEP_PID" 2>/dev/null; then
      mr_log "training still running ${REQUEUE_MARGIN}s before the time limit: requeueing from iteration" \
        "$(mr_saved_iteration)"
      scontrol requeue "$SLURM_JOB_ID"
      return
    fi
    if ((SECONDS >= next)) && kill -0 "$MR_STEP_PID" 2>/dev/null; then
      repeats=$((repeats + 1))
      if ((repeats == 1)); then
        mr_log "training still running: SIGUSR1 again (and every ${SIGNAL_REPEAT}s while it runs; not logged)"
      fi
      echo "$repeats" >"$MR_REPEATS_FILE"
      kill -USR1 "$MR_STEP_PID" 2>/dev/null || true
      next=$((SECONDS + SIGNAL_REPEAT))
    fi
  done
}

# mr_run_training: run MR_CMD (the training step) under the preemption flow, then exit.
#   * SIGUSR1 (`#SBATCH --signal=B:USR1@<s>` before the time limit, or `scancel --signal=USR1 --batch`):
#     forwarded through srun to the trainer, which finishes its step, saves and exits 0; then, unless the
#     run already reached train_iters, the job requeues itself and the next run resumes from SAVE's latest.
#   * SIGTERM (scancel, preemption): waits for the trainer's own save, exits without requeueing (a preempting
#     scheduler with PreemptMode=REQUEUE requeues by itself).
mr_run_training() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then mr_print_command; exit 0; fi
  mr_log "checkpoint $SAVE: latest iteration $(mr_saved_iteration)"
  { printf '# command: '; mr_print_command; } >>"$RUN_DIR/launch.log"
  MR_WATCH_PID='' MR_REPEATS_FILE=$RUN_DIR/.sigusr1-repeats
  rm -f "$MR_REPEATS_FILE"
  trap _mr_on_usr1 USR1
  trap _mr_on_term TERM
  if [[ ${MR_SIGNAL:-} == USR1 ]]; then  # the warning came while the job was still setting up
    mr_log "SIGUSR1 before training started"
    mr_requeue_unless_done
    exit 0
  fi
  # In the background, so that `wait` (which a trapped signal interrupts) is what the shell blocks in:
  # bash runs traps only between commands.
  "${MR_CMD[@]}" &
  MR_STEP_PID=$!
  local rc
  while :; do
    rc=0
    wait "$MR_STEP_PID" || rc=$?
    # > 128: a trapped signal interrupted `wait`; the step may still be running.
    if ((rc > 128)) && kill -0 "$MR_STEP_PID" 2>/dev/null; then continue; fi
    break
  done
  trap - USR1 TERM
  local repeated=''
  if [[ -n $MR_WATCH_PID ]]; then
    kill "$MR_WATCH_PID" 2>/dev/null || true
    wait "$MR_WATCH_PID" 2>/dev/null || true
    repeated=$(cat "$MR_REPEATS_FILE" 2>/dev/null) && repeated="; SIGUSR1 repeated $repeated time(s)"
    rm -f "$MR_REPEATS_FILE"
  fi
  mr_log "training step ended with status $rc; checkpoint at iteration $(mr_saved_iteration)$repeated"
  if [[ $MR_SIGNAL == USR1 ]]; then mr_requeue_unless_done; fi
  exit "$rc"
}

# mr_requeue_unless_done: after SIGUSR1, requeue the job (and exit) unless training already reached its end.
mr_requeue_unless_done() {
  if mr_training_done; then
    mr_log "training had already finished: not requeueing"
    return
  fi
  if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
    mr_log "already requeued $MAX_REQUEUES times (MAX_REQUEUES): not again; resubmit to continue"
    exit 1
  fi
  mr_log "requeueing; the next run resumes from $SAVE"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
