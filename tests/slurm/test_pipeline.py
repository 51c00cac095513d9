"""slurm/submit_pipeline.sh on the local Slurm, as users run and rerun it (CPU mode, a tiny Hugging Face LLaMA).

* A pipeline whose export fails (a node failure, simulated by the interpreter once) cancels the evaluation;
  resubmitted into the same WORK_DIR it skips the complete conversion and extension and runs the rest:
  every earlier stage ran once. While its jobs are queued a resubmission is refused; once everything is
  complete a resubmission submits nothing, and OVERWRITE=1 runs every stage again.
* Rerun rules on copies of the finished WORK_DIR: other evaluation flags redo the evaluation, a damaged
  export is replaced, a longer --train-iters resumes the extension and redoes what follows it.
* Every stage's inputs and fit are checked before the first job: refusals are one line, nothing submitted.
* Every variable in the script's configuration block reaches the job it configures (DRY_RUN=1 prints each
  job's own command).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_data import documents, write_dataset
from tests.slurm.conftest import REPO
from tests.slurm.test_job_scripts import cpu_env, job_log, latest, tiny_hf_llama, training_iterations

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "slurm" / "submit_pipeline.sh"
STAGES = ("convert", "extend", "export", "eval")
TRAIN = "--seq-length 64 --micro-batch-size 1 --global-batch-size 2 --train-iters 2 --log-interval 1 --eval-iters 1"


def pipeline_env(local_slurm, hf: Path, work: Path, **variables: str) -> dict:
    return cpu_env(
        local_slurm,
        GPUS_PER_NODE="0",
        NPROC_PER_NODE="1",
        HF_MODEL=str(hf),
        WORK_DIR=str(work),
        EXTEND_CONFIG="",
        MOCK_DATA="1",
        TRAIN_ARGS=TRAIN,
        EVAL_LENGTHS="32,64",
        **variables,
    )


def submit_pipeline(env: dict, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT)], env={**env, **variables}, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def stage_lines(stdout: str) -> dict:
    """``{stage: action}`` from the script's ``submit_pipeline.sh: <stage>: <action> ...`` lines."""
    return dict(re.findall(r"^submit_pipeline\.sh: (convert|extend|export|eval): (\w+)", stdout, re.M))


def job_ids(stdout: str) -> dict:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", stdout.strip().splitlines()[-2])}


def failing_once_python(path: Path, marker: Path) -> Path:
    """An interpreter that fails the export (tools/convert_megatron_to_hf.py) once, as a node failure would."""
    path.write_text(
        "#!/bin/bash\n"
        f'if [[ " $* " == *convert_megatron_to_hf.py* && ! -e {marker} ]]; then\n'
        f"  touch {marker}; echo 'simulated node failure' >&2; exit 1\nfi\n"
        f'exec {sys.executable} "$@"\n'
    )
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def finished(local_slurm, tmp_path_factory):
    """A pipeline whose export failed once, resubmitted into the same WORK_DIR and run to the end."""
    root = tmp_path_factory.mktemp("pipeline")
    hf, work = root / "hf_tiny", root / "work"
    tiny_hf_llama(hf)
    data = root / "tokens.jsonl"
    data.write_text(
        "".join(json.dumps({"tokens": [(7 * d + 3 * i) % 256 for i in range(80)]}) + "\n" for d in range(3))
    )
    python = failing_once_python(root / "python", root / "failed-once")
    env = pipeline_env(local_slurm, hf, work, EVAL_DATA=str(data), PYTHON=str(python))

    first = submit_pipeline(env, root)
    assert first.returncode == 0, first.stderr
    assert stage_lines(first.stdout) == dict.fromkeys(STAGES, "run")
    ids = job_ids(first.stdout)
    again = submit_pipeline(env, root)  # the first submission's jobs are still queued or running
    local_slurm.wait(ids["eval"], timeout=600)
    states = {stage: local_slurm.job(ids[stage]) for stage in STAGES}

    second = submit_pipeline(env, root)
    assert second.returncode == 0, second.stderr
    resubmitted = job_ids(second.stdout)
    if "eval" in resubmitted:
        local_slurm.wait(resubmitted["eval"], timeout=600)
    return dict(
        root=root,
        hf=hf,
        work=work,
        env=env,
        first=first,
        again=again,
        states=states,
        second=second,
        resubmitted=resubmitted,
        local_slurm=local_slurm,
    )


def test_failed_pipeline_resubmitted_completes_running_each_earlier_stage_once(finished):
    states, local_slurm, work = finished["states"], finished["local_slurm"], finished["work"]
    assert (states["convert"]["JobState"], states["extend"]["JobState"]) == ("COMPLETED", "COMPLETED")
    assert states["export"]["JobState"] == "FAILED"
    assert states["eval"]["JobState"] == "CANCELLED"  # --kill-on-invalid-dep: not left pending forever

    again = finished["again"]
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "still queued or running" in again.stderr

    second = finished["second"]
    assert stage_lines(second.stdout) == {"convert": "skip", "extend": "skip", "export": "run", "eval": "run"}
    resubmitted = finished["resubmitted"]
    assert set(resubmitted) == {"export", "eval"}
    assert "convert=skipped extend=skipped" in second.stdout
    for stage, job_id in resubmitted.items():
        job = local_slurm.job(job_id)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{job_log(work / 'logs', job_id)}"
    assert local_slurm.job(resubmitted["export"]).get("Dependency") in (None, "(null)")  # its inputs are there

    logs = sorted(p.name for p in (work / "logs").iterdir())
    runs = {stage: sum(name.startswith(f"mr-{stage}-") for name in logs) for stage in STAGES}
    assert runs == {"convert": 1, "extend": 1, "export": 2, "eval": 1}, logs
    assert latest(work / "extended") == 2 and training_iterations(work / "extended") == [1, 2]
    report = json.loads((work / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"original", "extended"} and report["settings"]["lengths"] == [32, 64]
    assert json.loads((work / "hf" / "config.json").read_text())["max_position_embeddings"] == 64


def test_complete_pipeline_resubmits_nothing_and_overwrite_reruns_every_stage(finished):
    env, root = finished["env"], finished["root"]
    done = submit_pipeline(env, root)
    assert done.returncode == 0, done.stderr
    assert stage_lines(done.stdout) == dict.fromkeys(STAGES, "skip")
    assert "nothing to submit" in done.stdout

    overwrite = submit_pipeline(env, root, OVERWRITE="1", DRY_RUN="1")
    assert overwrite.returncode == 0, overwrite.stderr
    assert stage_lines(overwrite.stdout) == dict.fromkeys(STAGES, "replace")
    commands = dry_run_jobs(overwrite.stdout)
    assert "--overwrite" in commands["mr-convert"] and "--overwrite" in commands["mr-export"]


def copy_work(finished, tmp_path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(finished["work"], work, ignore=shutil.ignore_patterns("jobs.txt"))
    return work


def test_rerun_redoes_changed_evaluation_a_damaged_export_and_a_longer_extension(finished, tmp_path):
    env = finished["env"]
    work = copy_work(finished, tmp_path)
    fewer = submit_pipeline({**env, "WORK_DIR": str(work)}, tmp_path, DRY_RUN="1", EVAL_ARGS="--max-documents 2")
    assert fewer.returncode == 0, fewer.stderr
    assert stage_lines(fewer.stdout) == {"convert": "skip", "extend": "skip", "export": "skip", "eval": "replace"}
    assert "max_documents None, EVAL_ARGS asks for 2" in fewer.stdout

    (shard,) = (work / "hf").glob("*.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    damaged = submit_pipeline({**env, "WORK_DIR": str(work)}, tmp_path, DRY_RUN="1")
    assert damaged.returncode == 0, damaged.stderr
    assert stage_lines(damaged.stdout) == {"convert": "skip", "extend": "skip", "export": "replace", "eval": "replace"}
    assert "unreadable safetensors" in damaged.stdout

    longer = submit_pipeline(
        {**env, "WORK_DIR": str(work)},
        tmp_path,
        DRY_RUN="1",
        TRAIN_ARGS=TRAIN.replace("--train-iters 2", "--train-iters 3"),
    )
    assert longer.returncode == 0, longer.stderr
    assert stage_lines(longer.stdout) == {"convert": "skip", "extend": "resume", "export": "replace", "eval": "replace"}
    assert "from iteration 2 of 3" in longer.stdout


def test_pipeline_that_cannot_finish_is_refused_before_any_job(local_slurm, finished, tmp_path):
    """One line on stderr, exit 2, no job, nothing written: the evaluation does not fit the node; the batch
    does not divide at the extension's world size; a training step does not fit the GPUs (GPU mode, checked
    from this CPU machine); a job script's variable the pipeline sets per stage; an unknown export format."""
    env = {**finished["env"], "WORK_DIR": str(tmp_path / "work")}
    queued = local_slurm.run("squeue", "-h", "-o", "%i").stdout.split()
    for variables, expected in (
        ({"EVAL_LENGTHS": "32,64,50000000"}, "eval: length 50000000 does not fit"),
        ({"NPROC_PER_NODE": "4"}, "extend: --global-batch-size 2 is not a multiple of micro-batch-size x DP = 1 x 4"),
        ({"GPUS_PER_NODE": "8", "GPU_MEMORY_GB": "0.0001"}, "extend: a training step at --seq-length 64 needs about"),
        ({"LOAD": "ckpt"}, "LOAD=ckpt is a job script's variable"),
        ({"ROPE_FORMAT": "hf"}, "export: unknown ROPE_FORMAT 'hf'"),
    ):
        proc = submit_pipeline(env, tmp_path, **variables)
        assert proc.returncode == 2, (variables, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, (variables, proc.stderr)
        assert "sbatch" not in proc.stdout
    assert local_slurm.run("squeue", "-h", "-o", "%i").stdout.split() == queued
    assert not (tmp_path / "work").exists()


def dry_run_jobs(stdout: str) -> dict:
    """``{job name: the sbatch line and the job's own command}`` from DRY_RUN=1's output."""
    jobs, name = {}, None
    for line in stdout.splitlines():
        if line.startswith("env "):
            name = re.search(r"--job-name=(\S+)", line).group(1)
            jobs[name] = line
        elif line.startswith("    ") and name:
            jobs[name] += "\n" + line
    return jobs


def documented_variables() -> list:
    text = SCRIPT.read_text()
    block = text.split("# Configuration:", 1)[1].split("# ====", 2)[1]
    return re.findall(r"^([A-Z_]+)=\$\{", block, re.M)


def test_every_documented_variable_reaches_the_job_it_configures(local_slurm, tmp_path):
    from tests.hf_tokenizers import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(tmp_path / "tokenizer", bpe_vocab=300)
    vocab = 300 + 256
    hf = tmp_path / "hf"
    import torch
    import transformers

    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            torch_dtype=torch.float32,
        )
    ).save_pretrained(hf)
    data = write_dataset(tmp_path / "train", documents(40, 100, vocab_size=vocab))
    config = tmp_path / "extend.yaml"
    config.write_text("training:\n  eval_iters: 1\n")
    work, w = tmp_path / "work", str(tmp_path / "work")
    values = {
        "HF_MODEL": str(hf),
        "WORK_DIR": w,
        "CONVERT_DTYPE": "bfloat16",
        "EXTEND_CONFIG": str(config),
        "ROPE_KIND": "yarn",
        "DATA_PATH": str(data),
        "MOCK_DATA": "1",
        "TOKENIZER_MODEL": str(tokenizer),
        "TRAIN_ARGS": "--seq-length 64 --micro-batch-size 1 --global-batch-size 2 --train-iters 7",
        "TP": "1",
        "PP": "2",
        "CP": "1",
        "NODES": "2",
        "GPUS_PER_NODE": "0",
        "NPROC_PER_NODE": "1",
        "GPU_MEMORY_GB": "80",
        "EXPORT_DTYPE": "float16",
        "ROPE_FORMAT": "custom",
        "EVAL_LENGTHS": "32,64",
        "EVAL_DATA": f"{data}",
        "EVAL_BASELINE": "1",
        "EVAL_ARGS": "--max-documents 3",
        "OVERWRITE": "1",
        "PYTHON": sys.executable,
        "SBATCH_ARGS": "--comment=every",
        "CONVERT_SBATCH_ARGS": "--comment=conv",
        "EXTEND_SBATCH_ARGS": "--time=00:30:00",
        "EVAL_SBATCH_ARGS": "--mem=4G",
        "JOB_PREFIX": "tst",
        "DRY_RUN": "1",
    }
    # where each variable must show (job: text); GPU_MEMORY_GB: GPU mode's memory check (not a job's)
    expected = {
        "HF_MODEL": [("convert", f"--load {hf}"), ("export", f"--hf-reference {hf}"), ("eval", f"--hf {hf} ")],
        "WORK_DIR": [
            ("convert", f"--save {w}/megatron"),
            ("extend", f"--load {w}/megatron --save {w}/extended"),
            ("export", f"--load {w}/extended --save {w}/hf"),
            ("eval", f"--out {w}/eval"),
            ("eval", f"--output={w}/logs/"),
        ],
        "CONVERT_DTYPE": [("convert", "--dtype bfloat16")],
        "EXTEND_CONFIG": [("extend", f"--config {config}")],
        "ROPE_KIND": [("extend", "--rope-kind yarn")],
        "DATA_PATH": [("extend", f"--data-path {data}")],
        "MOCK_DATA": [("extend", "--mock-data")],
        "TOKENIZER_MODEL": [("extend", f"--tokenizer-model {tokenizer}")],
        "TRAIN_ARGS": [("extend", "--train-iters 7")],
        "TP": [("extend", "--tensor-model-parallel-size 1")],
        "PP": [("extend", "--pipeline-model-parallel-size 2")],
        "CP": [("extend", "--context-parallel-size 1")],
        "NODES": [("extend", "--nodes=2"), ("extend", "--nnodes=2")],
        "GPUS_PER_NODE": [(job, "--gpus-per-node=0") for job in ("extend", "eval")] + [("extend", "cpu x 1")],
        "NPROC_PER_NODE": [("extend", "--nproc-per-node=1")],
        "GPU_MEMORY_GB": [],
        "EXPORT_DTYPE": [("export", "--dtype float16")],
        "ROPE_FORMAT": [("export", "--rope-format custom")],
        "EVAL_LENGTHS": [("eval", "--lengths 32\\,64")],
        "EVAL_DATA": [("eval", f"--data {data}")],
        "EVAL_BASELINE": [("eval", "--name original --name extended")],
        "EVAL_ARGS": [("eval", "--max-documents 3")],
        "OVERWRITE": [("convert", "--overwrite"), ("export", "--overwrite")],
        "PYTHON": [(job, f"{sys.executable} {REPO}/") for job in ("convert", "export", "eval")]
        + [("extend", f"mr-node {sys.executable}")],
        "SBATCH_ARGS": [(job, "--comment=every") for job in STAGES],
        "CONVERT_SBATCH_ARGS": [("convert", "--comment=conv"), ("export", "--comment=conv")],
        "EXTEND_SBATCH_ARGS": [("extend", "--time=00:30:00")],
        "EVAL_SBATCH_ARGS": [("eval", "--mem=4G")],
        "JOB_PREFIX": [(job, f"--job-name=tst-{job}") for job in STAGES],
        "DRY_RUN": [],
    }
    assert sorted(documented_variables()) == sorted(values) == sorted(expected)
    work.mkdir()
    (work / "megatron").mkdir()  # something there: OVERWRITE=1 passes --overwrite to the conversions
    (work / "megatron" / "old").write_text("")
    (work / "hf").mkdir()
    (work / "hf" / "old").write_text("")
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**local_slurm.env, **values},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    jobs = {name.split("-", 1)[1]: text for name, text in dry_run_jobs(proc.stdout).items()}
    assert sorted(jobs) == sorted(STAGES), proc.stdout
    for variable, places in expected.items():
        for job, text in places:
            assert text in jobs[job], (variable, job, text, jobs[job])
    assert "--comment=conv" not in jobs["extend"] + jobs["eval"]
    assert not any(line.startswith("submit_pipeline.sh: error") for line in proc.stdout.splitlines())
    assert os.listdir(work / "megatron") == ["old"]  # a dry run changes nothing
