"""A Llama-3-family source end to end: convert -> preprocess -> extend -> export -> perplexity -> passkey.

The source is made here and shaped like Llama-3.1: a byte-level BPE ``tokenizer.json`` trained with
``tokenizers`` (``tests/hf_tokenizers.py``: 65,600 BPE tokens, then ``<|begin_of_text|>`` 65600,
``<|end_of_text|>`` 65601 and 254 reserved tokens, so ids no longer fit 16 bits), rope theta 500,000 with
``llama3`` scaling (factor 8 over an original length of 64, stored length 128) and GQA (4 heads, 2 key/value
heads). Every step is the tool as a user types it, in its own process; no tokenizer is named after
preprocessing: evaluation finds it with each checkpoint.

The extension keeps the source's ``llama3`` plan (``--rope-kind llama3 --resonance``: its original length
64 and its factor growing to 8 x 256 / 128 = 16, with resonance rounding on top): ``extend_context.py``
refuses to switch a scaled source to ``resonance_yarn`` (that would drop its scaling).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.hf_tokenizers import BPE_VOCAB, SPECIALS, high_id_text, stdlib_texts, train_byte_level_bpe
from tests.launch import REPO

pytestmark = pytest.mark.slow

VOCAB = BPE_VOCAB + len(SPECIALS)  # 65,856
BOS, EOS = BPE_VOCAB, BPE_VOCAB + 1
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}
ARCH = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=BOS,
    eos_token_id=EOS,
    tie_word_embeddings=False,
    rope_parameters=LLAMA3,
)
TARGET = 256
LENGTHS = "64,256"
REL = 1e-4
TOOLS = REPO / "tools"
EVAL_WORKER = REPO / "tests" / "evaluation" / "workers" / "run_tools.py"


def _run(*cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, *map(str, cmd)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def _source(directory: Path) -> None:
    import torch
    import transformers

    train_byte_level_bpe(directory)
    config = transformers.LlamaConfig(**ARCH)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # far from init: logits of order 1
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3_family")
    p = {k: root / k for k in ("source", "megatron", "data", "extended", "export", "eval")}
    times = {}
    start = time.perf_counter()
    _source(p["source"])
    texts = stdlib_texts()
    high = high_id_text(p["source"])
    docs = [t + "\n" + high for t in texts]  # every document holds ids above 65,535
    p["train"] = root / "train.jsonl"
    p["train"].write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    p["texts"] = docs
    times["source"] = time.perf_counter() - start

    def step(name, *cmd):
        t = time.perf_counter()
        out = _run(*cmd)
        times[name] = time.perf_counter() - t
        return out

    step(
        "convert", TOOLS / "convert_hf_to_megatron.py", "--load", p["source"], "--save", p["megatron"], "--no-progress"
    )
    prefix = p["data"] / "train_text_document"
    # the tokenizer.json the importer kept with the checkpoint
    step(
        "preprocess",
        TOOLS / "preprocess_data.py",
        "--input",
        p["train"],
        "--output-prefix",
        prefix,
        "--tokenizer",
        p["megatron"] / "hf" / "tokenizer.json",
        "--no-progress",
    )
    p["prefix"] = prefix
    p["extend_stdout"] = step(
        "extend",
        REPO / "finetune" / "extend_context.py",
        "--nproc-per-node",
        "1",
        "--load",
        p["megatron"],
        "--rope-kind",
        "llama3",
        "--resonance",
        "--seq-length",
        TARGET,
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--train-iters",
        "3",
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-3",
        "--log-interval",
        "1",
        "--eval-iters",
        "1",
        "--data-path",
        prefix,
        "--valid-data-path",
        prefix,
        "--tokenizer-model",
        p["megatron"] / "hf",
        "--save",
        p["extended"],
    ).stdout
    # no --hf-reference: the source's files were carried into the extended checkpoint
    step("export", TOOLS / "convert_megatron_to_hf.py", "--load", p["extended"], "--save", p["export"], "--no-progress")

    # evaluation: text (tokenized by the tokenizer found with each model), every tool's main in one process
    p["eval_text"] = root / "eval.jsonl"
    p["eval_text"].write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    runs = {
        "perplexity": (
            "perplexity",
            [
                "--load",
                p["megatron"],
                "--name",
                "converted",
                "--hf",
                p["source"],
                "--name",
                "source",
                "--load",
                p["extended"],
                "--name",
                "extended",
                "--hf",
                p["export"],
                "--name",
                "export",
                "--data",
                p["eval_text"],
                "--lengths",
                LENGTHS,
            ],
        ),
        "indexed": ("perplexity", ["--load", p["extended"], "--data", prefix, "--lengths", LENGTHS]),
        "passkey": ("passkey", ["--load", p["extended"], "--lengths", "160,256", "--trials", "2", "--depths", "0,1"]),
        "passkey_hf": ("passkey", ["--hf", p["export"], "--lengths", "160,256", "--trials", "2", "--depths", "0,1"]),
    }
    plan = {
        "setup": None,
        "commands": [
            [tool, [*map(str, argv), "--out", str(p["eval"] / key), "--no-progress"]]
            for key, (tool, argv) in runs.items()
        ],
    }
    (root / "plan.json").write_text(json.dumps(plan))
    step("evaluate", EVAL_WORKER, root / "plan.json", root / "results.json")
    results = json.loads((root / "results.json").read_text())["commands"]
    for key, record in zip(runs, results):
        assert record["status"] in (0, None), f"{key}: {record['stderr']}"
    p["reports"] = {key: json.loads((p["eval"] / key / "report.json").read_text()) for key in runs}
    times["total"] = time.perf_counter() - start
    print("llama3 family pipeline seconds:", {k: round(v, 1) for k, v in times.items()})
    return p


def _auto(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def test_converter_keeps_the_tokenizer_and_the_llama3_plan(pipeline):
    kept = pipeline["megatron"] / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (kept / name).read_bytes() == (pipeline["source"] / name).read_bytes(), name
    stored = json.loads((pipeline["megatron"] / "iter_0000000" / "megatron_resonance.json").read_text())["model"]
    assert stored["vocab_size"] == VOCAB and stored["num_query_groups"] == 2
    rope = stored["rope"]
    assert (rope["kind"], rope["base"], rope["factor"], rope["original_max_position"]) == ("llama3", 500000.0, 8.0, 64)


def test_token_ids_above_65535_round_trip_through_bin_idx(pipeline):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    auto = _auto(pipeline["source"])
    ds = IndexedDataset(str(pipeline["prefix"]))
    assert ds.index.dtype == np.int32
    assert len(ds) == len(pipeline["texts"])
    for i, text in enumerate(pipeline["texts"]):
        expected = auto.encode(text, add_special_tokens=False) + [auto.eos_token_id]
        assert ds[i].tolist() == expected, i
        assert ds[i][-1] == EOS > 65_535 and ds[i][:-1].max() > 65_535


def test_extension_keeps_the_llama3_plan_and_the_hf_files(pipeline):
    stored = json.loads((pipeline["extended"] / "iter_0000003" / "megatron_resonance.json").read_text())
    rope = stored["model"]["rope"]
    assert (rope["kind"], rope["resonance"], rope["original_max_position"], rope["base"]) == (
        "llama3",
        True,
        64,
        500000.0,
    )
    assert rope["factor"] == pytest.approx(8.0 * TARGET / 128)
    assert stored["model"]["max_position_embeddings"] >= TARGET
    assert stored["run"]["data"]["tokenizer_model"] == str(pipeline["megatron"] / "hf")
    assert "[extend] rope llama3 + resonance: original length 64" in pipeline["extend_stdout"]
    carried = pipeline["extended"] / "hf"
    assert (carried / "tokenizer.json").read_bytes() == (pipeline["source"] / "tokenizer.json").read_bytes()
    losses = [json.loads(line) for line in (pipeline["extended"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in losses if "loss" in r] == [1, 2, 3]


def test_export_has_the_source_tokenizer_and_token_ids(pipeline):
    config = json.loads((pipeline["export"] / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (BOS, EOS, VOCAB)
    assert config["megatron_resonance_rope_kind"] == "llama3"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (pipeline["export"] / name).read_bytes() == (pipeline["source"] / name).read_bytes(), name


def test_tokenizer_found_with_each_model_encodes_as_the_source(pipeline):
    from megatron_resonance.data.tokenizer import Tokenizer

    models = pipeline["reports"]["perplexity"]["models"]
    found = {name: m["tokenizer"] for name, m in models.items()}
    assert found == {
        "converted": str(pipeline["megatron"] / "hf"),
        "source": str(pipeline["source"]),
        "extended": str(pipeline["extended"] / "hf"),
        "export": str(pipeline["export"]),
    }
    auto = _auto(pipeline["source"])
    text = pipeline["texts"][0]
    expected = auto.encode(text, add_special_tokens=False)
    for path in found.values():
        tok = Tokenizer(path)
        assert tok.encode(text) == expected and (tok.bos_id, tok.eos_id) == (BOS, EOS), path


def test_megatron_and_hf_perplexities_agree(pipeline):
    ppl = pipeline["reports"]["perplexity"]["perplexity"]
    for length in LENGTHS.split(","):
        for meg, hf in (("converted", "source"), ("extended", "export")):
            assert math.isfinite(ppl[meg][length]) and ppl[meg][length] > 1
            assert ppl[meg][length] == pytest.approx(ppl[hf][length], rel=REL), (meg, hf, length)
        # the extension changed the model (a different rope plan and three steps at lr 1e-3)
        assert ppl["extended"][length] != pytest.approx(ppl["converted"][length], rel=1e-3)
    # the indexed dataset (cut at <|end_of_text|>) holds the same documents as the JSONL text
    indexed = pipeline["reports"]["indexed"]["perplexity"]
    assert indexed["256"] == pytest.approx(ppl["extended"]["256"], rel=1e-6)


def test_passkey_runs_with_the_found_tokenizer_and_agrees_with_the_export(pipeline):
    meg, hf = pipeline["reports"]["passkey"], pipeline["reports"]["passkey_hf"]
    assert meg["model"]["tokenizer"] == str(pipeline["extended"] / "hf")
    assert set(meg["accuracy"]) == {"160", "256"}
    for length, nll in meg["answer_nll"].items():
        assert nll == pytest.approx(hf["answer_nll"][length], rel=REL), length
    assert meg["accuracy"] == hf["accuracy"]
