"""Bad input: one line on stderr and exit status 2, before any model is loaded (so these run in-process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.fake_checkpoint import add_dist_files
from tests.launch import REPO, child_env, load_tool
from tests.tiny_llama import tiny_llama

perplexity = load_tool("eval_perplexity")
passkey = load_tool("eval_passkey")
ruler = load_tool("eval_ruler")


def _fails(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint root with only what resolve() reads: tracker, megatron_resonance.json and the files
    verify_checkpoint checks (no weights)."""
    root = tmp_path_factory.mktemp("bad_inputs") / "ckpt"
    (root / "iter_0000005").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    cfg = tiny_llama(hidden_size=64, ffn_hidden_size=96, vocab_size=400)
    (root / "iter_0000005" / "megatron_resonance.json").write_text(json.dumps({"model": cfg.to_dict(), "run": {}}))
    add_dist_files(root / "iter_0000005")
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--load", "/no/such/ckpt", "--lengths", "16"], "--load /no/such/ckpt: no such file or directory"),
        (["--hf", "/no/such/hf", "--lengths", "16"], "--hf /no/such/hf: no such file or directory"),
        (["LOAD", "--lengths", "16,abc"], "'abc' is not an integer"),
        (["LOAD", "--lengths", "1"], "a length must be >= 2"),
        (["LOAD", "--lengths", ""], "is not an integer"),
        (["LOAD", "--lengths", "16", "--stride", "32"], "--stride 32: must be between 1"),
        (["LOAD", "--lengths", "16", "--max-documents", "0"], "--max-documents 0"),
        (["LOAD", "--lengths", "16", "--data", "/no/such.jsonl"], "--data /no/such.jsonl: file not found"),
        (["LOAD", "--lengths", "16", "--data", "/no/prefix"], "/no/prefix.bin not found"),
        (["LOAD", "--lengths", "16"], "no tokenizer is stored with ckpt: pass --tokenizer"),
        (["LOAD", "--lengths", "16", "--tokenizer", "/no/tok.model"], "--tokenizer /no/tok.model: no such file"),
        (
            ["LOAD", "--lengths", "16", "--tokenizer", "NOT_A_TOKENIZER"],
            "--tokenizer: not a SentencePiece model (nor a Hugging Face tokenizer.json)",
        ),
        (["LOAD", "--lengths", "16", "--tokenizer", "/"], "--tokenizer: no tokenizer in /: expected tokenizer.json"),
        (["LOAD", "--lengths", "16", "--tensor-model-parallel-size", "3"], "world size 1 is not divisible"),
        (
            ["LOAD", "--lengths", "16", "--context-parallel-size", "2"],
            "world size 1 is not divisible by TP x PP x CP = 1 x 1 x 2",
        ),
        (["LOAD", "LOAD", "--lengths", "16"], "two models are named 'ckpt'"),
        (["--lengths", "16"], "no model"),
        (["LOAD", "--lengths", "16", "--name", "a", "--name", "b"], "2 --name for 1 model"),
        (["LOAD", "--lengths", "100000000"], "length 100000000 does not fit for ckpt"),
        (["LOAD", "--lengths", "64", "--max-memory-gb", "0.0001"], "length 64 does not fit for ckpt"),
        (["LOAD", "--lengths", "16", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_perplexity_bad_input(checkpoint, tmp_path, capsys, argv, message):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00 neither SentencePiece nor JSON")
    argv = [a for x in argv for a in (["--load", str(checkpoint)] if x == "LOAD" else [x])]
    argv = [str(junk) if a == "NOT_A_TOKENIZER" else a for a in argv]
    err = _fails(perplexity.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert err.startswith("eval_perplexity.py: error: ") and message in err, err


def test_unreadable_model_config(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "iter_0000005" / "megatron_resonance.json").write_text("{not json")
    err = _fails(perplexity.main, ["--load", str(broken), "--lengths", "16", "--out", str(tmp_path / "o")], capsys)
    assert "cannot read the model config" in err
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"hidden_size": 64}))
    err = _fails(perplexity.main, ["--hf", str(hf), "--lengths", "16", "--out", str(tmp_path / "o")], capsys)
    assert f"--hf {hf}: cannot read the model config" in err


def test_out_is_a_file(checkpoint, tmp_path, capsys, tokenizer_model):
    (tmp_path / "file").write_text("")
    err = _fails(
        perplexity.main,
        [
            "--load",
            str(checkpoint),
            "--tokenizer",
            str(tokenizer_model),
            "--lengths",
            "16",
            "--out",
            str(tmp_path / "file"),
        ],
        capsys,
    )
    assert "exists and is not a directory" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "16", "--trials", "2"], "shorter than the passkey prompt without filler"),
        (["--lengths", "300", "--trials", "0"], "--trials 0: must be >= 1"),
        (["--lengths", "300", "--trials", "1", "--depths", "0,2"], "2 is outside [0, 1]"),
        (["--lengths", "300", "--trials", "1", "--depths", "x"], "'x' is not a number"),
        (["--lengths", "100000000", "--trials", "1"], "does not fit"),
    ],
)
def test_passkey_bad_input(checkpoint, tokenizer_model, tmp_path, capsys, argv, message):
    err = _fails(
        passkey.main,
        ["--load", str(checkpoint), "--tokenizer", str(tokenizer_model), *argv, "--out", str(tmp_path / "out")],
        capsys,
    )
    assert err.startswith("eval_passkey.py: error: ") and message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--lengths", "512", "--samples", "1", "--tasks", "niah_single_1,needle"],
            "--tasks: unknown task needle; the tasks are niah_single_1, ",
        ),
        (["--lengths", "512", "--samples", "0"], "--samples 0: must be >= 1"),
        (["--lengths", "512", "--samples", "1", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
        (["--lengths", "512", "--samples", "1", "--haystack", "SHORT"], "SHORT"),
        (["--lengths", "100000000", "--samples", "1", "--tasks", "niah_single_1"], "does not fit for ckpt"),
        (["--lengths", "512", "--samples", "1", "--tasks", "vt", "--max-memory-gb", "0.00001"], "does not fit"),
        (["--lengths", "512", "--samples", "1", "--chat-template"], "chat template"),
    ],
)
def test_ruler_bad_input(checkpoint, tokenizer_model, tmp_path, capsys, argv, message):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of haystack.\n")
    argv = [str(short) if a == "SHORT" else a for a in argv]
    message = message.replace("SHORT", str(short))
    err = _fails(
        ruler.main,
        ["--load", str(checkpoint), "--tokenizer", str(tokenizer_model), *argv, "--out", str(tmp_path / "out")],
        capsys,
    )
    assert err.startswith("eval_ruler.py: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_ruler_refuses_context_parallelism(checkpoint, tokenizer_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _fails(
        ruler.main,
        [
            "--load",
            str(checkpoint),
            "--tokenizer",
            str(tokenizer_model),
            "--lengths",
            "2048",
            "--samples",
            "1",
            "--context-parallel-size",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert "--context-parallel-size: RULER answers by greedy decoding, which runs without context parallelism" in err


def test_ruler_tokenizer_of_another_model(checkpoint, tokenizer_model, tmp_path, capsys):
    """A tokenizer with more tokens than the model's vocabulary is not its tokenizer."""
    from megatron_resonance.megatron.llama import LlamaConfig

    small = tmp_path / "small"
    shutil.copytree(checkpoint, small)
    config = small / "iter_0000005" / "megatron_resonance.json"
    stored = json.loads(config.read_text())
    stored["model"] = {**stored["model"], "vocab_size": 300}
    LlamaConfig.from_dict(dict(stored["model"]))  # still a valid config
    config.write_text(json.dumps(stored))
    err = _fails(
        ruler.main,
        [
            "--load",
            str(small),
            "--tokenizer",
            str(tokenizer_model),
            "--lengths",
            "512",
            "--samples",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert "has 400 tokens, more than small's vocabulary (300): it is not this model's tokenizer" in err, err


@pytest.mark.parametrize("tool", ["perplexity", "passkey"])
def test_context_parallel_length_not_divisible(checkpoint, tokenizer_model, tmp_path, capsys, monkeypatch, tool):
    """Under a 2-process launch (WORLD_SIZE=2), CP=2 needs every length divisible by 2 x CP; refused before
    any process group exists and before --out is created."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    main = perplexity.main if tool == "perplexity" else passkey.main
    extra = ["--trials", "1"] if tool == "passkey" else []
    err = _fails(
        main,
        [
            "--load",
            str(checkpoint),
            "--tokenizer",
            str(tokenizer_model),
            "--lengths",
            "256,302",
            "--context-parallel-size",
            "2",
            *extra,
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert err == f"eval_{tool}.py: error: --lengths: 302 is not divisible by 2 x context-parallel-size = 4\n"
    assert not (tmp_path / "out").exists()


def test_passkey_needs_one_model_and_a_tokenizer(checkpoint, tmp_path, capsys):
    err = _fails(
        passkey.main,
        [
            "--load",
            str(checkpoint),
            "--load",
            str(checkpoint),
            "--lengths",
            "300",
            "--trials",
            "1",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert "exactly one model" in err
    err = _fails(
        passkey.main, ["--load", str(checkpoint), "--lengths", "300", "--trials", "1", "--out", str(tmp_path)], capsys
    )
    assert "no tokenizer is stored with ckpt" in err


def test_tool_script_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "eval_perplexity.py"),
            "--load",
            "/no/such/ckpt",
            "--lengths",
            "16",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "eval_perplexity.py: error: --load /no/such/ckpt: no such file or directory"
    ]


def test_data_that_is_not_utf8(checkpoint, tokenizer_model, tmp_path, capsys):
    """A JSONL line that is not UTF-8: the file, the line and the byte offset; --out is not created."""
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    err = _fails(
        perplexity.main,
        [
            "--load",
            str(checkpoint),
            "--tokenizer",
            str(tokenizer_model),
            "--lengths",
            "16",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert err.strip() == (
        f"eval_perplexity.py: error: --data {bad}:2: not UTF-8 text (invalid continuation byte at byte 28 of the file)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["empty .bin and .idx", "empty .bin", "corrupt .idx"])
def test_unreadable_indexed_data_is_exactly_one_line(checkpoint, tokenizer_model, tmp_path, case):
    """The script in a process of its own: megatron's half-built IndexedDataset would add its ``__del__``
    errors (12 lines of "Exception ignored in") after the error line when the process ends."""
    prefix = tmp_path / "data"
    (tmp_path / "data.bin").write_bytes(b"" if "empty" in case else b"\0" * 64)
    (tmp_path / "data.idx").write_bytes(
        b""
        if case == "empty .bin and .idx"
        else b"MMIDIDX\0\0" + bytes([1, 0, 0, 0, 0, 0, 0, 0, 8]) + bytes(16)
        if case == "empty .bin"
        else b"not an index" * 8
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "eval_perplexity.py"),
            "--load",
            str(checkpoint),
            "--tokenizer",
            str(tokenizer_model),
            "--lengths",
            "16",
            "--data",
            str(prefix),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    problem = {"corrupt .idx": "unreadable indexed dataset ("}.get(case, f"{prefix}.bin is empty (no documents)")
    assert lines[0].startswith(f"eval_perplexity.py: error: --data {prefix}: {problem}"), lines[0]
    assert not (tmp_path / "out").exists()
