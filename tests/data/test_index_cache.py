"""The dataset index cache as clusters hold data: read-only data, jobs that share one cache, damaged files.

Every case runs ``pretrain_llama.py`` as a user does, on a tiny model and a small real indexed dataset (random
token ids, written here in a moment). megatron caches the document / sample / shuffle indices as ``.npy``
files, by default in ``index-cache`` beside the data.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.faults.harness import Job
from tests.training.conftest import PRETRAIN, TINY_MODEL, run

DOCUMENTS = 200
RUN = [
    *TINY_MODEL, "--no-mock-data", "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2",
    "--lr", "1e-3", "--eval-interval", "0", "--eval-iters", "1",
]  # fmt: skip


def write_dataset(prefix: Path) -> None:
    """``prefix.bin/.idx``: DOCUMENTS documents of 10-80 random ids below 255, each ended by EOS 255 (the
    trainer's end-of-document id without a tokenizer: vocab size - 1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(DOCUMENTS):
        n = int(rng.integers(10, 80))
        builder.add_document(np.append(rng.integers(0, 255, n), 255).astype(np.uint16), [n + 1])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture
def read_only(tmp_path):
    """A directory holding the dataset, then bind-mounted read-only on itself (root ignores permission bits,
    not a read-only mount); unmounted in teardown."""
    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data / "train")
    mounted = False
    for step in (["mount", "--bind", str(data), str(data)], ["mount", "-o", "remount,bind,ro", str(data)]):
        proc = subprocess.run(step, capture_output=True)
        if proc.returncode:
            if mounted:
                subprocess.run(["umount", "-l", str(data)], check=False)
            pytest.skip(f"cannot mount a read-only directory here: {proc.stderr.decode().strip()}")
        mounted = True
    yield data
    subprocess.run(["umount", "-l", str(data)], check=False)


def _cached(cache: Path, affix: str):
    return sorted(cache.glob(f"*/*-{affix}"))


def test_read_only_data_trains_with_the_cache_under_save(read_only, tmp_path):
    save = tmp_path / "ckpt"
    proc = run(PRETRAIN, *RUN, "--data-path", read_only / "train", "--train-iters", 2, "--save", save, nproc=1)
    line = (
        f"[data] {read_only} is not writable: the dataset index cache goes to {save / 'index-cache'} "
        "(--data-cache-path sets it)"
    )
    assert proc.stdout.splitlines().count(line) == 1, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (save / "iter_0000002").is_dir()
    assert len(_cached(save / "index-cache", "GPTDataset-train-shuffle_index.npy")) == 1
    assert not (read_only / "index-cache").exists()


def test_jobs_that_start_together_share_one_cache(tmp_path):
    """Three jobs (one of two ranks) build the same fresh cache at once. Large indices (a million iterations,
    stopped after one by --exit-interval) make the write long enough for the others to meet it."""
    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data / "train")
    args = [*RUN, "--data-path", data / "train", "--train-iters", 1_000_000, "--exit-interval", 1]
    jobs = [
        Job([*args, "--save", tmp_path / f"ckpt{i}"], tmp_path / f"job{i}.log", nproc=nproc)
        for i, nproc in enumerate((2, 1, 1))
    ]
    codes = [job.finish(timeout=240) for job in jobs]
    assert codes == [0, 0, 0], "\n\n".join(f"exit {c}:\n{j.output[-3000:]}" for c, j in zip(codes, jobs))
    assert len(_cached(data / "index-cache", "GPTDataset-train-shuffle_index.npy")) == 1


def test_a_truncated_cache_file_is_built_again_and_a_cache_being_written_is_waited_for(tmp_path):
    """A job killed while megatron wrote the shuffle index leaves it truncated: the next job builds it again
    (megatron alone counts it as a cache hit and fails to map it). A job that finds another one writing the
    cache (here the test, holding the lock as a job's rank 0 does) waits for it and reads the whole files."""
    import fcntl

    from megatron_resonance.data.datasets import INDEX_CACHE_LOCK

    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data / "train")
    args = [*RUN, "--data-path", data / "train", "--train-iters", 2]
    run(PRETRAIN, *args, "--save", tmp_path / "first", nproc=1)
    (shuffle,) = _cached(data / "index-cache", "GPTDataset-train-shuffle_index.npy")
    whole = shuffle.read_bytes()
    shuffle.write_bytes(whole[: len(whole) // 2])
    proc = run(PRETRAIN, *args, "--save", tmp_path / "second", nproc=1)
    damaged = [line for line in proc.stdout.splitlines() if line.startswith(f"[data] {shuffle} is damaged (")]
    assert len(damaged) == 1 and damaged[0].endswith("): building its indices again"), proc.stdout
    assert shuffle.read_bytes() == whole  # the same indices again
    assert (tmp_path / "second" / "iter_0000002").is_dir()

    # another job is writing the shuffle index: half of it is there, under the lock
    shuffle.write_bytes(whole[: len(whole) // 2])
    with open(shuffle.parent / INDEX_CACHE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        job = Job([*args, "--save", tmp_path / "third"], tmp_path / "third.log", nproc=1)
        job.wait_for(
            lambda: "[data] waiting for another job building the dataset index cache" in job.output, "the waiting line"
        )
        shuffle.write_bytes(whole)
    assert job.finish() == 0, job.output[-3000:]
    assert f"[data] waiting for another job building the dataset index cache in {shuffle.parent}\n" in job.output
    assert "damaged" not in job.output and (tmp_path / "third" / "iter_0000002").is_dir()
