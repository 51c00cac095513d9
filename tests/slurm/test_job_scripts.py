"""The job scripts in slurm/ on the local two-node Slurm (conftest), in CPU mode (GPUS_PER_NODE=0: gloo, no
GPUs).

* pretrain.sbatch makes a tiny checkpoint (module fixture); extend_context.sbatch extends it and leaves a
  checkpoint with the new rotary plan, on one node (TP=2) and on two (PP=2 across them);
* a job sent the preemption signal (what ``#SBATCH --signal=B:USR1@300`` sends before the time limit) saves,
  requeues itself, and the requeued run resumes with every iteration in metrics.jsonl exactly once, on one
  node and on two after a periodic save;
* common.sh's launcher ranks nodes by SLURM_NODEID and meets at node 0's NodeAddr; srun direct launch
  (one trainer per task, no torchrun) trains with TP=2;
* the multi-node GPU command line (srun, torchrun rendezvous, container) as printed by DRY_RUN=1.

What needs GPUs or separate hosts (NCCL, TP/CP at 32K, pyxis) is only checked by the dry run here.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO

pytestmark = pytest.mark.slurm

SLURM = REPO / "slurm"
#: a demo-shaped LLaMA small enough that CPU startup, not compute, is the cost
TINY_MODEL = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --num-query-groups 2 "
    "--vocab-size 256 --max-position-embeddings 32"
)
STEPS = "--micro-batch-size 2 --global-batch-size 4 --log-interval 1 --eval-iters 1"
EXTEND_STEPS = f"--seq-length 64 {STEPS}"  # 32 -> 64: s = 2


def cpu_env(local_slurm, **variables: str) -> dict[str, str]:
    """The cluster's environment plus this interpreter, no preset, and the job's variables; without
    OMP_NUM_THREADS, so the scripts choose the threads as for a user who did not set it."""
    env = {k: v for k, v in local_slurm.env.items() if k != "OMP_NUM_THREADS"}
    return {**env, "PYTHON": sys.executable, "CONFIG": "", **variables}


def submit(local_slurm, script: str, cwd: Path, *sbatch_args: str, **variables: str) -> int:
    """sbatch a script from slurm/ without GPUs (``--gpus-per-node=0`` overrides its header), which alone
    selects CPU mode: GPUS_PER_NODE defaults to the job's --gpus-per-node."""
    proc = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", *sbatch_args, str(SLURM / script)],
        env=cpu_env(local_slurm, **variables),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def job_log(cwd: Path, job_id: int) -> str:
    (log,) = cwd.glob(f"*-{job_id}.out")
    return log.read_text(errors="replace")


def finished_ok(local_slurm, job_id: int, cwd: Path, timeout: float) -> dict[str, str]:
    job = local_slurm.wait(job_id, timeout=timeout)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{job_log(cwd, job_id)[-4000:]}"
    return job


def training_iterations(save: Path) -> list[int]:
    lines = (save / "metrics.jsonl").read_text().split("\n")[:-1]  # the part after the last newline: unfinished
    records = [json.loads(line) for line in lines if line.strip()]
    return [r["iteration"] for r in records if "loss" in r]  # eval records carry eval_loss instead


def latest(save: Path) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


def stored(save: Path) -> dict:
    return json.loads((save / f"iter_{latest(save):07d}" / "megatron_resonance.json").read_text())


@pytest.fixture(scope="module")
def pretrained(local_slurm, tmp_path_factory) -> Path:
    """A 4-iteration tiny checkpoint from slurm/pretrain.sbatch (one CPU process, synthetic tokens)."""
    work = tmp_path_factory.mktemp("pretrain")
    save = work / "checkpoint"
    job_id = submit(
        local_slurm,
        "pretrain.sbatch",
        work,
        NPROC_PER_NODE="1",
        MOCK_DATA="1",
        SAVE=str(save),
        TRAIN_ARGS=f"{TINY_MODEL} --seq-length 32 {STEPS} --train-iters 4 --lr-warmup-iters 1",
    )
    finished_ok(local_slurm, job_id, work, timeout=300)
    assert latest(save) == 4
    return save


def test_pretrain_job_worker_uses_the_cores_of_its_node(local_slurm, pretrained):
    """The pretrained fixture's job (--exclusive, one worker): OMP_NUM_THREADS = the node's CPUs (not
    torchrun's 1), said in the job log, given to the srun step, and what the worker's torch really uses."""
    cpus = int(re.search(r"CPUTot=(\d+)", local_slurm.run("scontrol", "show", "node", "n1").stdout).group(1))
    log_path = next(pretrained.parent.glob("mr-pretrain-*.out"))
    log = log_path.read_text(errors="replace")
    assert f"CPU threads: {cpus} per process ({cpus} cores from SLURM_CPUS_ON_NODE / 1 process)" in log, log
    build = re.search(r"\[build\] world=1 .* threads=(\d+)", log)
    assert build and int(build.group(1)) == cpus >= 2, log
    run_dir = pretrained.parent / "outputs" / "slurm" / log_path.name[: -len(".out")]
    command = (run_dir / "launch.log").read_text()
    assert f"OMP_NUM_THREADS={cpus} " in command and f"--cpus-per-task={cpus} " in command, command


def test_extend_context_cpu_leaves_checkpoint(local_slurm, pretrained, tmp_path):
    save = tmp_path / "extended"
    job_id = submit(
        local_slurm,
        "extend_context.sbatch",
        tmp_path,
        LOAD=str(pretrained),
        SAVE=str(save),
        MOCK_DATA="1",
        TP="2",
        TRAIN_ARGS=f"{EXTEND_STEPS} --train-iters 3",
    )
    finished_ok(local_slurm, job_id, tmp_path, timeout=300)

    assert latest(save) == 3
    assert training_iterations(save) == [1, 2, 3]
    meta = stored(save)
    rope = meta["model"]["rope"]
    assert (rope["kind"], rope["factor"], rope["original_max_position"]) == ("resonance_yarn", 2.0, 32)
    assert meta["run"]["parallel"]["tensor_model_parallel_size"] == 2
    assert meta["run"]["world_size"] == 2  # CPU mode: NPROC_PER_NODE defaults to 2 gloo processes
    run_dir = tmp_path / "outputs" / "slurm" / f"mr-extend-{job_id}"
    launch = (run_dir / "launch.log").read_text()
    assert "--rdzv-backend=static" in launch and "CUDA_VISIBLE_DEVICES=" in launch
    assert "NCCL_DEBUG" not in launch  # no NCCL settings in CPU mode


def preempt_when(local_slurm, job_id: str, tmp_path, what: str, ready) -> tuple:
    """Once ``ready()``, send what ``--signal=B:USR1@<s>`` sends (SIGUSR1 to the batch shell only); the job
    must save, requeue once and resume where it stopped. Returns (the iteration it stopped at, the log)."""
    deadline = time.monotonic() + 300
    while not ready():
        assert time.monotonic() < deadline, f"no {what} after 300 s\n{local_slurm.job(job_id)}"
        assert local_slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), local_slurm.job(job_id)
        time.sleep(0.2)
    local_slurm.run("scancel", "--signal=USR1", "--batch", str(job_id))
    job = local_slurm.wait(job_id, timeout=400)
    log = job_log(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{job}\n{log[-4000:]}"
    stopped = re.findall(r"\[signal\] received at iteration (\d+)", log)
    resumed = re.findall(r"resumed from \S+ at iteration (\d+)", log)
    assert len(stopped) == 1 and resumed == stopped, log[-4000:]
    return int(stopped[0]), log


def test_preemption_signal_saves_requeues_and_resumes_without_gaps(local_slurm, pretrained, tmp_path):
    # 200 steps: ~20 s on a loaded 2-core machine, enough left for the signal's ~0.5 s trip on a fast one.
    save, iters = tmp_path / "extended", 200
    job_id = submit(
        local_slurm,
        "extend_context.sbatch",
        tmp_path,
        LOAD=str(pretrained),
        SAVE=str(save),
        MOCK_DATA="1",
        TRAIN_ARGS=f"{EXTEND_STEPS} --train-iters {iters}",
    )
    # once the trainer is stepping (its signal handler is installed)
    stopped, log = preempt_when(
        local_slurm, job_id, tmp_path, "training",
        lambda: (save / "metrics.jsonl").exists() and len(training_iterations(save)) >= 3,
    )  # fmt: skip
    assert 3 <= stopped < iters
    assert "requeueing; the next run resumes from" in log
    assert log.count("SIGUSR1 again") <= 1, log[-4000:]  # repeats are counted, not logged each
    # the saved step was neither lost nor repeated: every iteration logged once, in order
    assert training_iterations(save) == list(range(1, iters + 1))
    assert latest(save) == iters


def test_repeated_warning_is_logged_once_and_counted(tmp_path):
    """common.sh's flow with a step that ignores SIGUSR1 for 6 s (as a worker still loading does), no Slurm
    needed: the signal is repeated every SIGNAL_REPEAT (1 s; the watcher wakes every 2 s), one log line says
    so, and the step's last line counts the repeats."""
    script = tmp_path / "watch.sh"
    script.write_text(
        textwrap.dedent(f"""\
        set -euo pipefail
        REPO={REPO} SIGNAL_REPEAT=1 REQUEUE_MARGIN=60 MAX_REQUEUES=0
        source "$REPO/slurm/common.sh"
        mr_end_time() {{ echo 0; }}  # no time limit (no job to ask)
        MR_KIND=watch SLURM_JOB_ID=0 RUN_DIR={tmp_path} SAVE={tmp_path}/save MR_ENV=()
        MR_CMD=(bash -c 'trap "" USR1; sleep 6')
        mr_run_training
        """)
    )
    proc = subprocess.Popen(["bash", str(script)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "# command" not in ((tmp_path / "launch.log").read_text() if (tmp_path / "launch.log").exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    time.sleep(0.5)  # past the `trap` that follows the launch.log line
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # MAX_REQUEUES=0: not requeued
    assert err.count("SIGUSR1 again") == 1, err
    assert "training still running: SIGUSR1 again (and every 1s while it runs; not logged)" in err
    repeats = re.search(
        r"training step ended with status 0; checkpoint at iteration none; SIGUSR1 repeated (\d+) "
        r"time\(s\)",
        err,
    )
    assert repeats and int(repeats.group(1)) >= 2, err


def tiny_hf_llama(path: Path) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_dry_run_prints_the_multi_node_launch(local_slurm, tmp_path):
    """What only a real GPU cluster runs: 4 nodes x 8 GPUs, pyxis container, NCCL settings."""
    env = {k: v for k, v in local_slurm.env.items() if k != "OMP_NUM_THREADS"}
    env = {
        **env,
        "DRY_RUN": "1",
        "SLURM_NNODES": "4",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_CPUS_ON_NODE": "96",
        "LOAD": "ckpt/llama2-7b",
        "DATA_PATH": "/data/pg19_text_document",
        "MASTER_PORT": "29500",
        "CONTAINER": "nvcr.io#nvidia/pytorch:24.07-py3",
        "CONTAINER_MOUNTS": "/data:/data",
    }
    proc = subprocess.run(
        ["bash", str(SLURM / "extend_context.sbatch")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout
    for part in (
        "srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --cpus-per-task=96",
        "--container-image=nvcr.io#nvidia/pytorch:24.07-py3",
        "/data:/data",
        "--nnodes=4 --nproc-per-node=8",
        "--rdzv-backend=static",
        "--rdzv-endpoint=gpu07:29500",
        "--node-rank=",
        f"--config {REPO}/configs/llama2_7b_4k_to_32k_resonance_yarn.yaml",
        f"--load {tmp_path}/ckpt/llama2-7b",
        "CUDA_DEVICE_MAX_CONNECTIONS=1",
        "NCCL_DEBUG=WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "OMP_NUM_THREADS=12",  # 96 CPUs / 8 workers
    ):
        assert part in cmd, (part, cmd)
    assert "CUDA_VISIBLE_DEVICES" not in cmd
    assert "CPU threads: 12 per process (96 cores from SLURM_CPUS_ON_NODE / 8 processes)" in proc.stderr


# ---- two nodes ------------------------------------------------------------------------------------------
# The session's cluster has two nodes, n1 and n2, whose names resolve nowhere (NodeAddr=127.0.0.1): a job
# that rendezvouses at the first node's *name* fails to connect.

PROBE = """\
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
keys = ("RANK", "GROUP_RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NODEID", "SLURMD_NODENAME", "MASTER_ADDR")
record = {k: os.environ.get(k) for k in keys}
record["sum"] = total.item()
with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
"""


def slow_first_node_python(path: Path) -> Path:
    """An interpreter for $PYTHON whose torchrun agent on node 0 starts 5 s after node 1's: with c10d's
    arrival-order rendezvous node 1 would take group rank 0."""
    path.write_text(f'#!/bin/bash\nif [[ $SLURM_NODEID == 0 ]]; then sleep 5; fi\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def test_two_node_torchrun_ranks_follow_node_ids_and_meet_at_node_addr(local_slurm, tmp_path):
    """common.sh's launcher on 2 nodes x 2 workers: rendezvous at node 0's NodeAddr (127.0.0.1; its name
    n1 does not resolve), global rank = SLURM_NODEID * 2 + local rank however late node 0 starts, and a
    gloo all-reduce across all four."""
    out = tmp_path / "ranks"
    out.mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    python = slow_first_node_python(tmp_path / "python")
    script = tmp_path / "probe.sbatch"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=probe --nodes=2 --ntasks-per-node=1 --time=5 --output={tmp_path}/%x-%j.out
        set -euo pipefail
        REPO={REPO} PYTHON={python} GPUS_PER_NODE=0 NPROC_PER_NODE=2 OUTPUT_DIR={tmp_path}/outputs
        source "$REPO/slurm/common.sh"
        mr_init probe
        mr_torchrun_command {tmp_path}/probe.py {out}
        mr_run
        """)
    )
    job_id = local_slurm.sbatch(script, cwd=tmp_path)
    finished_ok(local_slurm, job_id, tmp_path, timeout=180)

    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(4)]
    for r, rec in enumerate(ranks):
        assert (rec["sum"], rec["WORLD_SIZE"]) == (0 + 1 + 2 + 3, "4"), rec
        assert int(rec["GROUP_RANK"]) == int(rec["SLURM_NODEID"]) == r // 2, ranks
        assert (int(rec["LOCAL_RANK"]), rec["SLURMD_NODENAME"]) == (r % 2, f"n{r // 2 + 1}"), ranks
        assert rec["MASTER_ADDR"] == "127.0.0.1", rec  # the workers' store: node 0's NodeAddr too


def two_node_extend(local_slurm, pretrained, tmp_path, save: Path, train_args: str) -> int:
    """extend_context.sbatch on both nodes, one torchrun worker per node, the two pipeline stages on
    different nodes."""
    return submit(
        local_slurm,
        "extend_context.sbatch",
        tmp_path,
        "--nodes=2",
        LOAD=str(pretrained),
        SAVE=str(save),
        MOCK_DATA="1",
        NPROC_PER_NODE="1",
        PP="2",
        TRAIN_ARGS=f"{EXTEND_STEPS} {train_args}",
    )


def test_extend_context_on_two_nodes_pipeline_across_them(local_slurm, pretrained, tmp_path):
    save = tmp_path / "extended"
    job_id = two_node_extend(local_slurm, pretrained, tmp_path, save, "--train-iters 3")
    job = finished_ok(local_slurm, job_id, tmp_path, timeout=300)

    assert job["NodeList"] == "n[1-2]"
    assert latest(save) == 3 and training_iterations(save) == [1, 2, 3]
    meta = stored(save)
    assert meta["run"]["world_size"] == 2 and meta["run"]["parallel"]["pipeline_model_parallel_size"] == 2
    assert meta["model"]["rope"]["kind"] == "resonance_yarn"
    launch = (tmp_path / "outputs" / "slurm" / f"mr-extend-{job_id}" / "launch.log").read_text()
    assert "--nnodes=2" in launch and "MASTER_ADDR=127.0.0.1" in launch  # n1's NodeAddr, not the name


def test_two_node_preemption_after_a_periodic_save_saves_requeues_and_resumes(local_slurm, pretrained, tmp_path):
    save, iters, interval = tmp_path / "extended", 30, 5
    job_id = two_node_extend(
        local_slurm, pretrained, tmp_path, save, f"--train-iters {iters} --save-interval {interval}"
    )
    # The warning once a periodic save is complete and training has gone on past it.
    stopped, log = preempt_when(
        local_slurm, job_id, tmp_path, "periodic save",
        lambda: (save / "latest_checkpointed_iteration.txt").exists() and latest(save) >= interval
        and len(training_iterations(save)) > interval + 1,
    )  # fmt: skip
    assert interval < stopped < iters  # saved again at the signal, past the periodic save
    assert re.search(r"start \(restart 1\) on 2 node\(s\) n\[1-2\]", log), log[-4000:]
    assert training_iterations(save) == list(range(1, iters + 1))
    assert latest(save) == iters


def test_srun_direct_launch_two_tasks_tensor_parallel_trains_and_saves(local_slurm, tmp_path):
    """No torchrun: srun starts one trainer per task on each node, and the trainer maps SLURM_PROCID /
    SLURM_STEP_NUM_TASKS onto torchrun's variables, rendezvousing at node 0's NodeAddr. A plain python in
    the batch script itself (SLURM_PROCID=0, SLURM_NTASKS=2, but no step) stays a one-process run."""
    save = tmp_path / "checkpoint"
    script = tmp_path / "direct.sbatch"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=direct --nodes=2 --ntasks-per-node=1 --time=5 --output={tmp_path}/%x-%j.out
        set -euo pipefail
        export PYTHONPATH={REPO} CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1
        {sys.executable} -c 'from megatron_resonance.megatron import distributed as d
        print(d.world_size_from_env())' > batch_world_size.txt
        srun --kill-on-bad-exit=1 {sys.executable} {REPO}/pretrain/pretrain_llama.py --mock-data \\
          --tensor-model-parallel-size 2 {TINY_MODEL} --seq-length 32 {STEPS} --train-iters 3 --save {save}
        """)
    )
    job_id = local_slurm.sbatch(script, cwd=tmp_path)
    finished_ok(local_slurm, job_id, tmp_path, timeout=300)

    assert (tmp_path / "batch_world_size.txt").read_text().split() == ["1"]
    assert latest(save) == 3 and training_iterations(save) == [1, 2, 3]
    meta = stored(save)
    assert meta["run"]["world_size"] == 2 and meta["run"]["parallel"]["tensor_model_parallel_size"] == 2
