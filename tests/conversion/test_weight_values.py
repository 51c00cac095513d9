"""Weights the importer must not take as they come: NaN or Inf values, values the chosen ``--dtype`` cannot
hold (both refused: one error line, exit status 2, ``--save`` untouched), and a mix of dtypes (converted to
the one stored dtype, with one line saying what changed).

These are found while the tensors stream into the model, after megatron is imported, so every command runs
in one worker process (``workers/convert_all.py``, the tools' ``main``), as the round-trip pipeline's do.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conversion import tiny_models
from tests.conversion.test_bad_inputs import snapshot
from tests.launch import python

WORKERS = Path(__file__).parent / "workers"
PROG = "convert_hf_to_megatron.py"

NAN_KEY = "model.layers.1.mlp.up_proj.weight"  # moved into linear_fc1 with gate_proj
INF_KEY = "model.layers.0.self_attn.k_proj.weight"  # packed with q and v
BIG_KEY = "model.norm.weight"
HUGE_KEY = "model.embed_tokens.weight"  # padded to the Megatron vocabulary
#: the float16 tensors of the mixed source (every other tensor is bfloat16)
FLOAT16_KEYS = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
)


def _rewrite(path: Path, edit) -> None:
    """Every safetensors shard of ``path`` rewritten with ``edit(name, tensor) -> tensor``."""
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: edit(k, f.get_tensor(k)) for k in f.keys()}
        save_file(tensors, shard, metadata=metadata)


def _nan(name, t):
    if name == NAN_KEY:
        t = t.clone()
        t[3, 7] = t[0, 0] = float("nan")
    return t


def _inf(name, t):
    if name == INF_KEY:
        t = t.clone()
        t[5, 1] = -float("inf")
    return t


def _big(name, t):
    if name == BIG_KEY:
        t = t.clone()
        t[9] = 1e5  # a float32 value beyond float16's largest (65504)
    return t


def _huge(name, t):
    if name == HUGE_KEY:
        t = t.clone()
        t[17, 3] = -3e25  # finite, but no trained weight: an exponent bit flipped
    return t


def _mixed(name, t):
    return t.to(torch.float16 if name in FLOAT16_KEYS else torch.bfloat16)


#: case -> (edit of the tiny GQA source, extra arguments)
CASES = {
    "nan": (_nan, []),
    "inf": (_inf, []),
    "beyond_float16": (_big, ["--dtype", "float16"]),
    "huge": (_huge, []),
    "mixed": (_mixed, []),
    "bfloat16": (lambda name, t: t.to(torch.bfloat16), []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """case -> {"result": the command's status and output, "src", "save", "before": --save's files before}."""
    root = tmp_path_factory.mktemp("weight_values")
    good = root / "good"
    tiny_models.write_source("gqa", good)
    out, commands = {}, []
    for case, (edit, extra) in CASES.items():
        src, save = root / case / "src", root / case / "save"
        shutil.copytree(good, src)
        _rewrite(src, edit)
        save.mkdir()
        (save / "keep.txt").write_text("precious")
        out[case] = {"src": src, "save": save, "before": snapshot(save)}
        commands.append(
            ["hf_to_megatron", ["--load", str(src), "--save", str(save), "--overwrite", "--no-progress", *extra]]
        )
    # what the mixed source became, read back through the exporter (stored dtype: bfloat16)
    export = root / "mixed" / "export"
    commands.append(["megatron_to_hf", ["--load", str(out["mixed"]["save"]), "--save", str(export), "--no-progress"]])
    plan, results = root / "plan.json", root / "results.json"
    plan.write_text(json.dumps({"commands": commands}))
    python(WORKERS / "convert_all.py", plan, results, timeout=300)
    *imports, exported = json.loads(results.read_text())
    for case, result in zip(CASES, imports):
        out[case]["result"] = result
    out["mixed"]["export"], out["mixed"]["export_result"] = export, exported
    return out


def _refused(run) -> str:
    """The one error line; exit status 2; --save exactly as before, no staging directory left beside it."""
    r, save = run["result"], run["save"]
    lines = r["stderr"].strip().splitlines()
    assert r["status"] == 2 and len(lines) == 1, r
    assert lines[0].startswith(f"{PROG}: error: "), lines[0]
    assert snapshot(save) == run["before"] and sorted(p.name for p in save.parent.iterdir()) == ["save", "src"]
    return lines[0]


def _shard(src: Path, key: str) -> str:
    return str(src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key])


def test_nan_is_refused(runs):
    line = _refused(runs["nan"])
    assert line == (
        f"{PROG}: error: {_shard(runs['nan']['src'], NAN_KEY)}: tensor {NAN_KEY} holds 2 non-finite "
        "values (NaN): refusing to import"
    )


def test_inf_is_refused(runs):
    line = _refused(runs["inf"])
    assert line == (
        f"{PROG}: error: {_shard(runs['inf']['src'], INF_KEY)}: tensor {INF_KEY} holds 1 non-finite "
        "value (Inf): refusing to import"
    )


def test_value_beyond_the_target_dtype_is_refused(runs):
    """float16 would store 1e5 as Inf: refused, naming the way out."""
    line = _refused(runs["beyond_float16"])
    assert line == (
        f"{PROG}: error: {_shard(runs['beyond_float16']['src'], BIG_KEY)}: tensor {BIG_KEY} holds a "
        "value of magnitude 1e+05, beyond float16's range (Inf once converted): refusing to import; "
        "--dtype float32 or bfloat16 holds it"
    )


def test_value_no_load_accepts_is_refused(runs):
    """What checkpointing.check_finite refuses at every load is refused here, not blamed on the checkpoint later."""
    line = _refused(runs["huge"])
    assert line == (
        f"{PROG}: error: {_shard(runs['huge']['src'], HUGE_KEY)}: tensor {HUGE_KEY} holds a value of "
        "magnitude 3e+25, beyond any trained weight (a corrupted file): refusing to import"
    )


def test_mixed_dtypes_are_converted_with_one_line(runs):
    run = runs["mixed"]
    r = run["result"]
    assert r["status"] == 0, r
    assert r["stderr"] == ""
    source = tiny_models.read_hf_tensors(run["src"])
    changes = {k: (source[k].to(torch.bfloat16).float() - source[k].float()).abs().max().item() for k in FLOAT16_KEYS}
    worst = max(changes, key=changes.get)
    assert changes[worst] > 0  # float16 values that bfloat16 cannot hold: the line has something to say
    lines = r["stdout"].strip().splitlines()
    assert len(lines) == 2 and "GB/s" in lines[1], r["stdout"]
    assert lines[0] == (
        f"{run['src']}: the weights mix dtypes (bfloat16 and float16); all are stored as "
        f"bfloat16 (most of the bytes): 4 float16 tensors converted, largest absolute change "
        f"{changes[worst]:.2g} (in {worst}); --dtype float32 keeps every value"
    )
    # what is stored is what the line says: the float16 tensors rounded to bfloat16, the others as they were
    assert run["export_result"]["status"] == 0, run["export_result"]
    exported = tiny_models.read_hf_tensors(run["export"])
    assert sorted(exported) == sorted(source)
    for k, t in source.items():
        assert exported[k].dtype == torch.bfloat16
        assert torch.equal(exported[k], t.to(torch.bfloat16)), k
    assert all(not torch.equal(exported[k].float(), source[k].float()) for k in FLOAT16_KEYS)
    # a source of one dtype has nothing to report: the summary alone
    r = runs["bfloat16"]["result"]
    assert r["status"] == 0 and r["stderr"] == "", r
    assert re.fullmatch(r".* -> .*: \d+ tensors, .* GB/s; setup .*\)", r["stdout"].strip()), r["stdout"]
