"""The local Slurm does what the job scripts rely on: multi-task srun, afterok chains, and preemption by
``--signal=B:USR1@<s>`` + ``--requeue`` with the batch script requeueing itself."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def batch_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    return path


def test_two_task_job_runs_both_tasks(local_slurm, tmp_path):
    script = batch_script(
        tmp_path / "two_tasks.sbatch",
        f"""
        #SBATCH --job-name=two-tasks --ntasks=2 --time=1 --output={tmp_path}/%x-%j.out
        srun bash -c 'echo "$SLURM_PROCID $SLURM_NTASKS $SLURM_JOB_ID" > task-$SLURM_PROCID.txt'
        """,
    )
    job_id = local_slurm.sbatch(script)
    job = local_slurm.wait(job_id, timeout=60)

    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job
    tasks = sorted(p.read_text().split() for p in tmp_path.glob("task-*.txt"))
    assert tasks == [["0", "2", str(job_id)], ["1", "2", str(job_id)]]


def test_afterok_dependency_runs_after_first_job(local_slurm, tmp_path):
    first = batch_script(
        tmp_path / "first.sbatch",
        f"""
        #SBATCH --job-name=first --time=1 --output={tmp_path}/%x-%j.out
        sleep 3
        date +%s.%N > first_end.txt
        """,
    )
    second = batch_script(
        tmp_path / "second.sbatch",
        f"""
        #SBATCH --job-name=second --time=1 --output={tmp_path}/%x-%j.out
        date +%s.%N > second_start.txt
        """,
    )
    first_id = local_slurm.sbatch(first)
    second_id = local_slurm.sbatch(second, f"--dependency=afterok:{first_id}")

    waiting = local_slurm.job(second_id)
    assert (waiting["JobState"], waiting["Reason"]) == ("PENDING", "Dependency"), waiting
    assert local_slurm.wait(first_id, timeout=60)["JobState"] == "COMPLETED"
    assert local_slurm.wait(second_id, timeout=60)["JobState"] == "COMPLETED"
    assert float((tmp_path / "second_start.txt").read_text()) > float((tmp_path / "first_end.txt").read_text())


def test_afterok_dependent_is_cancelled_when_first_job_fails(local_slurm, tmp_path):
    # Without --kill-on-invalid-dep the dependent would pend forever (Reason=DependencyNeverSatisfied).
    failing = batch_script(tmp_path / "failing.sbatch", f"#SBATCH --time=1 --output={tmp_path}/%j.out\nexit 3\n")
    never = batch_script(tmp_path / "never.sbatch", f"#SBATCH --time=1 --output={tmp_path}/%j.out\ntouch ran\n")
    failing_id = local_slurm.sbatch(failing)
    never_id = local_slurm.sbatch(never, f"--dependency=afterok:{failing_id}", "--kill-on-invalid-dep=yes")

    assert local_slurm.wait(failing_id, timeout=60)["JobState"] == "FAILED"
    assert local_slurm.wait(never_id, timeout=60)["JobState"] == "CANCELLED"
    assert not (tmp_path / "ran").exists()


def test_warning_signal_requeues_job_which_reruns_with_restart_count(local_slurm, tmp_path):
    # Slurm checks time limits every 30 s and sends the --signal warning at the first check that finds at
    # most <s> + 30 s left. With --time=1 and @50 that is the first check after the job starts: 0-30 s
    # in, 30-60 s before the limit. The requeued run may start after AuthInfo=cred_expire (10 s here).
    script = batch_script(
        tmp_path / "preempted.sbatch",
        f"""
        #SBATCH --job-name=preempted --time=1 --signal=B:USR1@50 --requeue
        #SBATCH --open-mode=append --output={tmp_path}/%x-%j.out
        echo "start restart_count=${{SLURM_RESTART_COUNT:-unset}}" >> runs.txt
        if [[ -n ${{SLURM_RESTART_COUNT:-}} ]]; then exit 0; fi
        on_usr1() {{
          echo "$SECONDS" > usr1_after_seconds.txt
          scontrol requeue "$SLURM_JOB_ID"
          exit 0
        }}
        trap on_usr1 USR1
        # In the background: bash runs a trap only between commands, so `wait` must be what it blocks in.
        sleep 120 &
        wait $!
        echo "no signal before the time limit" >> runs.txt
        """,
    )
    job_id = local_slurm.sbatch(script)
    job = local_slurm.wait(job_id, timeout=150)  # REQUEUED and PENDING in between are not final

    runs = (tmp_path / "runs.txt").read_text().splitlines()
    assert runs == ["start restart_count=unset", "start restart_count=1"], runs
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0"), job
    signalled_after = int((tmp_path / "usr1_after_seconds.txt").read_text())
    assert signalled_after <= 45, f"USR1 came {signalled_after}s into a 60s job, less than 15s before the limit"


def test_memory_is_consumable_and_each_node_has_its_share(local_slurm, tmp_path):
    """Nodes share the host: each offers MemTotal less 5 %, divided by the nodes, and memory is scheduled
    (CR_CPU_Memory). A job asking for more than a node has is refused at submission; two jobs whose --mem
    together exceed a node do not run on it at the same time; a job without --mem gets its CPUs' share."""
    from tests.slurm.conftest import NODES

    with open("/proc/meminfo") as f:
        host_mb = next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal:"))
    node = dict(re.findall(r"(\w+)=(\S*)", local_slurm.run("scontrol", "show", "node", "--oneliner", "n1").stdout))
    real = int(node["RealMemory"])
    assert real == pytest.approx(host_mb * 0.95 / NODES, abs=2), (host_mb, node)
    config = local_slurm.run("scontrol", "show", "config").stdout
    assert re.search(r"SelectTypeParameters\s*=\s*CR_CPU_MEMORY", config), config
    assert re.search(rf"DefMemPerCPU\s*=\s*{real // int(node['CPUTot'])}\b", config), config

    def wrap(command: str, *args: str, check: bool = True):
        return local_slurm.run("sbatch", "--parsable", "--time=1", *args, "--wrap", command, check=check, cwd=tmp_path)

    too_big = wrap("true", f"--mem={real + 1}", check=False)
    assert too_big.returncode != 0, too_big.stdout
    assert re.search(
        r"node configuration is not available|Memory specification can not be satisfied", too_big.stderr
    ), too_big.stderr

    big = f"--mem={real * 6 // 10}"  # two of these overcommit the node
    first, second = (int(wrap(command, "--nodelist=n1", big).stdout.split(";")[0]) for command in ("sleep 4", "true"))
    running = local_slurm.wait(first, timeout=60, until=lambda job: job["JobState"] != "PENDING")
    waiting = local_slurm.job(second)  # CPUs alone would run it beside the first (1 of n1's 2+ CPUs each)
    assert (running["JobState"], waiting["JobState"]) == ("RUNNING", "PENDING"), (running, waiting)
    done = [local_slurm.wait(job_id, timeout=60) for job_id in (first, second)]
    assert [job["JobState"] for job in done] == ["COMPLETED", "COMPLETED"], done
    assert done[1]["StartTime"] >= done[0]["EndTime"], done
