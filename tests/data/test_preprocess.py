"""tools/preprocess_data.py and megatron_resonance.data.preprocess: round trip, EOS, workers, bad input."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from megatron_resonance.data.preprocess import preprocess, token_dtype
from megatron_resonance.errors import UserError
from tests.launch import REPO

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

TOOL = REPO / "tools" / "preprocess_data.py"


@pytest.fixture(scope="module")
def inputs(small_corpus, tmp_path_factory):
    """A JSONL file (stdlib documents, an empty one, tricky whitespace) and a plain text document."""
    d = tmp_path_factory.mktemp("inputs")
    with open(small_corpus.train.path, encoding="utf-8") as f:
        stdlib = [json.loads(line)["text"] for line in f][:6]
    docs = stdlib[:3] + ["", "\tindented\r\n  trailing  \n", "é😀"] + stdlib[3:]
    jsonl = d / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text, "other": 1}) + "\n")
        f.write("\n")  # a blank line is not a document
    txt = d / "single.py"
    txt.write_text(stdlib[0][:500] + "\n# the end\n", encoding="utf-8")
    expected = [t for t in docs if t] + [txt.read_text(encoding="utf-8")]
    return dict(jsonl=jsonl, txt=txt, expected=expected, empty=1)


def _read(prefix):
    return IndexedDataset(str(prefix))


def test_round_trip_and_eos_after_every_document(inputs, tiny_tokenizer, tmp_path):
    prefix = tmp_path / "out" / "ds"
    stats = preprocess([inputs["jsonl"], inputs["txt"]], prefix, tiny_tokenizer.path, progress=False, log=None)
    ds = _read(prefix)
    assert len(ds) == stats.documents == len(inputs["expected"])
    assert stats.empty_skipped == inputs["empty"]
    assert ds.index.dtype == np.uint16 == token_dtype(tiny_tokenizer.vocab_size)
    assert list(ds.document_indices) == list(range(len(ds) + 1))  # one sequence per document
    eos = tiny_tokenizer.eos_id
    for i, text in enumerate(inputs["expected"]):
        ids = ds[i]
        assert ids[-1] == eos and eos not in ids[:-1]
        assert tiny_tokenizer.decode(ids[:-1]) == text
        assert list(ids[:-1]) == tiny_tokenizer.encode(text)
    assert stats.tokens == int(ds.sequence_lengths.sum())


def test_token_dtype_matches_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (512, 32000, 65499, 65500, 128256):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab)


def test_no_eod(inputs, tiny_tokenizer, tmp_path):
    preprocess([inputs["jsonl"]], tmp_path / "ds", tiny_tokenizer.path, append_eod=False, progress=False, log=None)
    ds = _read(tmp_path / "ds")
    assert [list(ds[i]) for i in range(len(ds))] == [tiny_tokenizer.encode(t) for t in inputs["expected"][:-1]]


def test_worker_count_does_not_change_the_output(small_corpus, tiny_tokenizer, tmp_path):
    out = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        preprocess(
            [small_corpus.train.path],
            prefix,
            tiny_tokenizer.path,
            workers=workers,
            chunksize=2,
            progress=False,
            log=None,
        )
        out[workers] = [(prefix.parent / (prefix.name + ext)).read_bytes() for ext in (".bin", ".idx")]
    assert out[1] == out[2]


def test_existing_output_is_refused_unless_overwrite(inputs, tiny_tokenizer, tmp_path):
    prefix = tmp_path / "ds"
    preprocess([inputs["txt"]], prefix, tiny_tokenizer.path, progress=False, log=None)
    before = (tmp_path / "ds.bin").read_bytes()
    with pytest.raises(UserError, match="output exists"):
        preprocess([inputs["jsonl"]], prefix, tiny_tokenizer.path, progress=False, log=None)
    assert (tmp_path / "ds.bin").read_bytes() == before
    preprocess([inputs["jsonl"]], prefix, tiny_tokenizer.path, overwrite=True, progress=False, log=None)
    assert len(_read(prefix)) == len(inputs["expected"]) - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temporary files left


# ---------------------------------------------------------------- the command line -------------------------


def _run(*args):
    """The tool as a subprocess (used where it exits before megatron.core's slow import)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def _main(*args):
    """The tool's ``main`` in this process: (exit status, stdout, stderr) via capsys-free redirection."""
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = tool.main([str(a) for a in args])
        except SystemExit as exit_:
            status = exit_.code
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def test_cli_writes_and_reports_throughput(inputs, tiny_tokenizer, tmp_path):
    proc = _main(
        "--input",
        f"{inputs['jsonl']},{inputs['txt']}",
        "--output-prefix",
        tmp_path / "ds",
        "--tokenizer-model",
        tiny_tokenizer.path,
        "--workers",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    assert "documents" in proc.stdout and "tokens/s" in proc.stdout
    assert len(_read(tmp_path / "ds")) == len(inputs["expected"])


def test_cli_bad_input_is_one_line_and_nothing_is_overwritten(inputs, tiny_tokenizer, tmp_path):
    """Checked before any work (and before megatron.core is imported, so each run is quick)."""
    prefix = tmp_path / "existing"
    preprocess([inputs["txt"]], prefix, tiny_tokenizer.path, progress=False, log=None)
    files = [tmp_path / "existing.bin", tmp_path / "existing.idx"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    model = tiny_tokenizer.path
    cases = {
        "missing input": (["--input", tmp_path / "nope.jsonl", "--tokenizer-model", model], "input not found"),
        "empty input": (["--input", f"{inputs['jsonl']},{empty}", "--tokenizer-model", model], "input is empty"),
        "missing tokenizer": (
            ["--input", inputs["jsonl"], "--tokenizer-model", tmp_path / "no.model"],
            "tokenizer model not found",
        ),
        "existing output": (["--input", inputs["jsonl"], "--tokenizer-model", model], "output exists"),
        "no workers": (
            ["--input", inputs["jsonl"], "--tokenizer-model", model, "--workers", "0"],
            "--workers must be >= 1",
        ),
        "missing argument": (["--input", inputs["jsonl"]], "required"),
    }
    for i, (name, (args, message)) in enumerate(cases.items()):
        # the first case as a real subprocess (the script runs standalone), the rest in this process
        proc = (_run if i == 0 else _main)(*args, "--output-prefix", prefix)
        _assert_one_error_line(proc, message, name)
        assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before, name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("existing")) == [
        "existing.bin",
        "existing.idx",
    ]


def _assert_one_error_line(proc, message, name=""):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (name, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("preprocess_data.py: error: "), (name, proc.stderr)
    assert message in lines[0], (name, lines[0])


@pytest.mark.parametrize(
    "content, key, message",
    [
        ('{"text": "ok"}\n{not json\n', "text", "bad.jsonl:2: not a JSON line"),
        ('{"text": "ok"}\n{"body": "x"}\n', "text", "bad.jsonl:2: no key 'text'"),
        ('{"text": "ok"}\n', "body", "docs.jsonl:1: no key 'body'"),
        ('{"text": 3}\n', "text", "'text' is int, not a string"),
        (
            '{"text": "ok"}\n{"text": "a\\ud800b"}\n',
            "text",
            r"bad.jsonl:2: 'text' is not Unicode text \(a lone surrogate '\\ud800' at character 1\)",
        ),
    ],
)
def test_bad_content_found_while_reading_replaces_nothing(inputs, tiny_tokenizer, tmp_path, content, key, message):
    """Even with overwrite=True and worker processes, the old dataset survives a failed run."""
    prefix = tmp_path / "existing"
    preprocess([inputs["txt"]], prefix, tiny_tokenizer.path, progress=False, log=None)
    before = [(tmp_path / f"existing{ext}").read_bytes() for ext in (".bin", ".idx")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(UserError, match=message):
        preprocess(
            [inputs["jsonl"], bad] if key == "text" else [inputs["jsonl"]],
            prefix,
            tiny_tokenizer.path,
            json_key=key,
            overwrite=True,
            workers=2,
            progress=False,
            log=None,
        )
    assert [(tmp_path / f"existing{ext}").read_bytes() for ext in (".bin", ".idx")] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "existing.bin", "existing.idx"]


def test_only_empty_documents(tiny_tokenizer, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n\n{"text": ""}\n')
    with pytest.raises(UserError, match="no non-empty documents"):
        preprocess([blank], tmp_path / "ds", tiny_tokenizer.path, progress=False, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl"]


def test_cli_bad_content_is_one_line(inputs, tiny_tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n{not json\n')
    proc = _main("--input", bad, "--output-prefix", tmp_path / "ds", "--tokenizer-model", tiny_tokenizer.path)
    _assert_one_error_line(proc, "bad.jsonl:2: not a JSON line")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_lone_surrogate_is_one_line(inputs, tiny_tokenizer, tmp_path):
    """JSON's escape ``\\ud800`` (half of a UTF-16 pair) decodes to a string no tokenizer can encode."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "\\ud800"}\n')
    proc = _main("--input", bad, "--output-prefix", tmp_path / "ds", "--tokenizer-model", tiny_tokenizer.path)
    _assert_one_error_line(proc, f"{bad}:2: 'text' is not Unicode text (a lone surrogate '\\ud800' at character 0)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_output_prefix_under_a_file_or_unwritable(inputs, tiny_tokenizer, tmp_path):
    """Checked before anything is written: a prefix under a file, and one under a directory that refuses
    writes even to root (``/proc/self``; the permission bits of a chmod-ed directory do not stop root)."""
    (tmp_path / "somefile.txt").write_text("a file\n")
    under_file = tmp_path / "somefile.txt" / "out"
    proc = _main("--input", inputs["jsonl"], "--output-prefix", under_file, "--tokenizer-model", tiny_tokenizer.path)
    _assert_one_error_line(proc, f"output prefix {under_file}: {tmp_path / 'somefile.txt'} is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt"]
    if not os.access("/proc/self", os.W_OK):
        proc = _main(
            "--input", inputs["jsonl"], "--output-prefix", "/proc/self/out", "--tokenizer-model", tiny_tokenizer.path
        )
        _assert_one_error_line(proc, "output prefix /proc/self/out: /proc/self is not writable")


def test_input_that_is_not_utf8_names_the_line_and_byte(tiny_tokenizer, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 28 "):
        preprocess([bad], tmp_path / "ds", tiny_tokenizer.path, progress=False, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.jsonl"]
