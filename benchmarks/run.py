"""Speed and precision, measured side by side against the alternatives, in one run on one machine.

    python benchmarks/run.py [--quick] --out results.json

Fields (see benchmarks/README.md for the latest numbers):

* ``resonance_overhead_ratio``: training-step time with ``resonance_yarn`` / with ``rope``: same model
  shape, same process, interleaved rounds, median of the per-round ratios (target <= 1.01);
* ``train_vs_hf_ratio``: training tokens/s of our CPU path (megatron-core GPTModel, local spec with SDPA
  core attention, DDP + distributed optimizer, single process) / Hugging Face ``LlamaForCausalLM`` with
  the same config, dtype (fp32), batch, threads and SDPA attention, AdamW on both (target >= 1.2); beside
  it ``train_vs_hf_ratio_model_only``: the same GPTModel trained the way the Hugging Face model is (torch
  AdamW and clipping, no megatron DDP, distributed optimizer or schedule), which separates the model's
  speed from that machinery's;
* ``angle_error_rad_at_1m``: max rotary angle error at position 1,048,575 against a float64 reference for
  our tables, beside ``megatron_core_angle_error_rad_at_1m`` for megatron-core's own ``RotaryEmbedding``;
* ``convert_gb_per_s`` / ``copy_gb_per_s``: HF -> Megatron conversion of a few-hundred-MB model vs ``cp -r``
  (benchmarks/convert_speed.py);
* on a GPU (only when CUDA is present): tokens/s per GPU, TFLOP/s and MFU of a LLaMA-2-7B-shaped layer
  stack at 4K and 32K, ``rope`` vs ``resonance_yarn``, for each layer spec there: ``local`` (eager),
  ``local_compiled`` (its layers under ``torch.compile``) and ``te`` when Transformer Engine is installed
  (``gpu_by_spec``; the ``gpu_<length>_*`` keys repeat the spec training picks by default).

Timings are medians over interleaved rounds after warm-up (ratios: medians of per-round ratios, with the
ratios of the separate medians beside them); the CPU comparison runs in fresh processes (5, or 2 with
--quick) and reports the median over them. The machine, threads and commit are recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

P_1M = 1_048_575
SECTIONS = ("precision", "cpu", "gpu", "convert")


# ----------------------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------------------


def angle_errors() -> dict:
    """Max |angle - exact| (mod 2*pi) at p = 1,048,575, LLaMA-2 shape (d=128, b=1e4), for our fp32 tables
    (rope and resonance_yarn s=8) and for megatron-core's RotaryEmbedding (fp32 outer product)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_resonance.rope import RopeConfig, angular_distance, compute_frequencies, rotary_angle_table

    out = {}
    for kind, factor in (("rope", 1.0), ("resonance_yarn", 8.0)):
        freqs = compute_frequencies(RopeConfig(kind=kind, head_dim=128, factor=factor))
        ours = rotary_angle_table(freqs, 1, offset=P_1M).double()[0]
        exact = _exact_angles(freqs.inv_freq, freqs.integer_wavelengths)
        out[kind] = float(angular_distance(ours, exact).max())
    mc = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    theirs = mc.get_freqs_non_repeated(1, offset=P_1M).double()[0]
    exact = _exact_angles(mc.inv_freq.double(), None)  # the exact angle of megatron's own fp32 frequencies
    return {
        "angle_error_rad_at_1m": max(out.values()),
        "angle_error_rad_at_1m_by_kind": out,
        "megatron_core_angle_error_rad_at_1m": float(
            torch.remainder(torch.abs(theirs - exact) + math.pi, 2 * math.pi).sub(math.pi).abs().max()
        ),
    }


def _exact_angles(inv_freq: torch.Tensor, wavelengths) -> torch.Tensor:
    """Angles at P_1M from exact rational arithmetic on the float64 frequencies (Python ints/fractions)."""
    from fractions import Fraction

    two_pi = Fraction(math.pi)  # the float64 value of pi is the reference's pi; errors here are ~1e-16
    values = []
    for i, f in enumerate(inv_freq.tolist()):
        if wavelengths is not None:
            lam = int(wavelengths[i])
            values.append(float(Fraction(P_1M % lam) * 2 * two_pi / lam))
        else:
            angle = Fraction(P_1M) * Fraction(f)
            turns = angle / (2 * two_pi)
            values.append(float((turns - (turns.numerator // turns.denominator)) * 2 * two_pi))
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# CPU training speed
# ----------------------------------------------------------------------------------------------------------


def _config(quick: bool):
    from megatron_resonance.megatron.llama import LlamaConfig

    return LlamaConfig(
        num_layers=4,
        hidden_size=256,
        ffn_hidden_size=688,
        num_attention_heads=8,
        num_query_groups=4,
        vocab_size=2048,
        max_position_embeddings=512,
        make_vocab_size_divisible_by=128,
    )


def _rope(model_cfg, kind: str, original: int, factor: float):
    from megatron_resonance.rope import RopeConfig

    if kind == "rope":
        return RopeConfig(kind="rope", head_dim=model_cfg.head_dim)
    return RopeConfig(kind=kind, head_dim=model_cfg.head_dim, original_max_position=original, factor=factor)


def _seed() -> None:
    """The same initial weights for every model built after it (torch's and megatron's RNG tracker)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)


def _token_batches(vocab_size: int, seq: int, batch: int):
    """The same random [batch, seq + 1] token windows for every step function (its own generator)."""
    g = torch.Generator().manual_seed(1)
    while True:
        yield torch.randint(0, vocab_size, (batch, seq + 1), generator=g)


def _megatron_trainer(model_cfg, rope, seq: int, batch: int, bf16: bool = False, spec: str = "auto"):
    """One-process megatron-core training step (same code path as pretrain_llama.py); returns the loss."""
    import dataclasses

    from megatron_resonance.training.config import Config, DataConfig, OptimizerConfig, ParallelConfig
    from megatron_resonance.training.model import build_model_and_optimizer
    from megatron_resonance.training.step import train_step

    cfg = Config(
        model=dataclasses.replace(model_cfg, rope=rope),
        data=DataConfig(seq_length=seq, micro_batch_size=batch, global_batch_size=batch, mock_data=True),
        optimizer=OptimizerConfig(lr=1e-4, min_lr=1e-4, lr_decay_style="constant", clip_grad=1.0),
        parallel=ParallelConfig(transformer_impl=spec),
    )
    cfg.training.train_iters = 10**6
    _seed()
    chunks, optimizer, scheduler, _ = build_model_and_optimizer(cfg, bf16=bf16)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()

    def batches():  # CPU tensors: step.forward_step moves each batch to the GPU, as in training
        for t in _token_batches(model_cfg.vocab_size, seq, batch):
            yield {
                "tokens": t[:, :-1],
                "labels": t[:, 1:],
                "loss_mask": torch.ones(batch, seq),
                "position_ids": torch.arange(seq).expand(batch, seq),
            }

    it = batches()

    def step():
        return train_step(fb, it, chunks, optimizer, scheduler, cfg, num_microbatches=1)[0]

    return step


def _plain_trainer(model, loss_of, vocab_size: int, seq: int, batch: int):
    """A training step as a plain PyTorch / Hugging Face loop runs it: Hugging Face Trainer's default
    optimizer with torch >= 2.8 (``adamw_torch_fused``, as ours on CPU), ``clip_grad_norm_``, autograd
    gradients; ``loss_of(tokens)`` is the model's mean token loss on a [batch, seq + 1] window. Runs
    without cpu_compat's device mode (``cpu_speed.suspended``), as in a process without megatron. Returns
    the loss."""
    from megatron_resonance.megatron import cpu_speed

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    tokens = _token_batches(vocab_size, seq, batch)

    def step():
        with cpu_speed.suspended():
            t = next(tokens)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return loss.detach()

    return step


def _model_only_trainer(model_cfg, rope, seq: int, batch: int):
    """The trainer's GPTModel (the CPU path's layers: local spec, SDPA attention, ``cpu_speed``), trained
    the way ``_hf_trainer`` trains Hugging Face's model (``_plain_trainer``): no megatron DDP, distributed
    optimizer or pipeline schedule. Returns the loss."""
    import dataclasses

    from megatron_resonance.megatron.llama import build_model

    cfg = dataclasses.replace(model_cfg, rope=rope)
    _seed()
    model = build_model(cfg, seq_length=seq, per_token_loss=True)[0]
    position_ids = torch.arange(seq).expand(batch, seq)

    def loss_of(t):
        return model(t[:, :-1], position_ids, None, labels=t[:, 1:]).mean()

    return _plain_trainer(model, loss_of, model_cfg.vocab_size, seq, batch)


def _hf_trainer(model_cfg, seq: int, batch: int):
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=model_cfg.padded_vocab_size(),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg)

    def loss_of(t):  # the model shifts the labels itself
        return model(input_ids=t[:, :-1], labels=t[:, :-1]).loss

    return _plain_trainer(model, loss_of, model_cfg.vocab_size, seq, batch)


def _round_orders(n: int) -> list:
    """Orders of the rounds of one cycle over steps 0..n-1: read as one circular sequence of calls, each
    step follows each other step exactly once per cycle and never itself (n - 1 rounds; one for n <= 2).
    Found by a depth-first search: an Euler circuit of the complete directed graph cut into permutations."""
    if n <= 2:
        return [list(range(n))]
    length = n * (n - 1)
    calls, used = [0], set()

    def extend() -> bool:
        if len(calls) == length:
            return (calls[-1], calls[0]) not in used
        round_start = len(calls) - len(calls) % n
        for nxt in range(n):
            pair = (calls[-1], nxt)
            if nxt in calls[round_start:] or pair in used or nxt == calls[-1]:
                continue
            calls.append(nxt)
            used.add(pair)
            if extend():
                return True
            calls.pop()
            used.discard(pair)
        return False

    assert extend(), n
    return [calls[i : i + n] for i in range(0, length, n)]


def _interleaved_times(steps: dict, warmup: int, repeats: int, sync=lambda: None) -> dict:
    """Seconds per call of each step, ``repeats`` rounds; each round runs every step once, back to back.

    A step run right after another model's pays for that model's cache and allocator state (~3 % for the
    step after Hugging Face's), so the rounds cycle through ``_round_orders``: each step follows each
    other one equally often and never itself (with three steps: a b c, a c b, a b c, ...). A fixed order
    put that cost on one variant; a rotation (a b c, b c a, c a b) still had ``rope`` follow Hugging Face
    twice as often as ``resonance_yarn``."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in steps}
    names = list(steps)
    orders = [[names[i] for i in order] for order in _round_orders(len(names))]
    for r in range(repeats):
        for k in orders[r % len(orders)]:
            fn = steps[k]
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
    return times


def _medians(times: dict) -> dict:
    return {k: statistics.median(v) for k, v in times.items()}


def _paired_ratio(numerator: list, denominator: list) -> float:
    """Median over rounds of one round's time ratio. The VM's speed drifts by ~10 % over a run; two steps
    of one round ran seconds apart, so their ratio carries less of that drift than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _initialize() -> None:
    from megatron_resonance.megatron import distributed

    if not torch.distributed.is_initialized():
        distributed.initialize(1, 1, seed=1)


#: (processes, rounds per process) of the CPU comparison, full and --quick
CPU_PROCESSES = {False: (5, 12), True: (2, 8)}
CPU_RATIOS = (
    "resonance_overhead_ratio",
    "train_vs_hf_ratio",
    "train_vs_hf_ratio_model_only",
    "resonance_overhead_ratio_of_medians",
    "train_vs_hf_ratio_of_medians",
)


def cpu_training(quick: bool, workdir: Path) -> dict:
    """The CPU comparison in fresh processes, medians over them. Within one process the paired ratio is
    steady, but the same models built in another process time differently (which one is built first,
    where their buffers land): two identical trainers in one process differed by 2.6 % in one run and by
    1.9 % the other way in the next. Each process builds the three models and runs its own rounds."""
    processes, rounds = CPU_PROCESSES[quick]
    runs = []
    for i in range(processes):
        out = workdir / f"cpu_process_{i}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--skip",
            "precision,gpu,convert",
            "--cpu-rounds",
            str(rounds),
            "--out",
            str(out),
            "--workdir",
            str(workdir),
        ]
        proc = subprocess.run(cmd + (["--quick"] if quick else []), cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise RuntimeError(f"CPU comparison process {i + 1} of {processes} failed (exit {proc.returncode})")
        runs.append(json.loads(out.read_text()))
        print(
            f"[bench] cpu: process {i + 1}/{processes}: "
            + ", ".join(f"{key} {runs[-1][key]:.3f}" for key in CPU_RATIOS[:3]),
            flush=True,
        )
    result = {key: statistics.median(r[key] for r in runs) for key in CPU_RATIOS}
    result.update({f"{key}_by_process": [r[key] for r in runs] for key in CPU_RATIOS[:3]})
    result["train_tokens_per_s"] = {
        k: statistics.median(r["train_tokens_per_s"][k] for r in runs) for k in runs[0]["train_tokens_per_s"]
    }
    result.update(train_processes=processes, train_rounds=rounds, train_shape=runs[0]["train_shape"])
    return result


def cpu_training_here(quick: bool, rounds: int) -> dict:
    """The three CPU training steps built in this process, ``rounds`` interleaved rounds."""
    _initialize()
    seq, batch = 256, 4
    model_cfg = _config(quick)
    rope = _rope(model_cfg, "rope", seq // 4, 4.0)
    steps = {
        "rope": _megatron_trainer(model_cfg, rope, seq, batch),
        "resonance_yarn": _megatron_trainer(model_cfg, _rope(model_cfg, "resonance_yarn", seq // 4, 4.0), seq, batch),
        "model_only": _model_only_trainer(model_cfg, rope, seq, batch),
        "hf": _hf_trainer(model_cfg, seq, batch),
    }
    times = _interleaved_times(steps, warmup=2 if quick else 3, repeats=rounds)
    medians = _medians(times)
    tokens = seq * batch
    return {
        "resonance_overhead_ratio": _paired_ratio(times["resonance_yarn"], times["rope"]),
        "train_vs_hf_ratio": _paired_ratio(times["hf"], times["rope"]),
        "train_vs_hf_ratio_model_only": _paired_ratio(times["hf"], times["model_only"]),
        # the same ratios from the separate medians (what train_tokens_per_s gives)
        "resonance_overhead_ratio_of_medians": medians["resonance_yarn"] / medians["rope"],
        "train_vs_hf_ratio_of_medians": medians["hf"] / medians["rope"],
        "train_tokens_per_s": {k: tokens / v for k, v in medians.items()},
        "train_rounds": len(times["rope"]),
        "train_shape": {
            "layers": model_cfg.num_layers,
            "hidden": model_cfg.hidden_size,
            "ffn": model_cfg.ffn_hidden_size,
            "heads": model_cfg.num_attention_heads,
            "kv_heads": model_cfg.num_query_groups,
            "vocab": model_cfg.padded_vocab_size(),
            "seq": seq,
            "batch": batch,
            "dtype": "fp32",
            "threads": torch.get_num_threads(),
        },
    }


# ----------------------------------------------------------------------------------------------------------
# GPU: LLaMA-2-7B-shaped layer stack (Transformer Engine when installed)
# ----------------------------------------------------------------------------------------------------------


#: the layer specs the GPU section measures, where they are available
GPU_SPECS = ("local", "local_compiled", "te")
GPU_LENGTHS = (4096, 32768)


def gpu_specs() -> list:
    """The layer specs this machine can build: ``te`` only with Transformer Engine."""
    from megatron_resonance.megatron.llama import te_available

    return [spec for spec in GPU_SPECS if spec != "te" or te_available()]


def gpu_throughput(quick: bool) -> dict:
    """tokens/s, TFLOP/s and MFU on one GPU for a LLaMA-2-7B-shaped stack (hidden 4096, FFN 11008, 32
    heads, 4 layers; 2 with --quick) in bf16 with the trainer's own step (DDP + distributed optimizer), at
    4K and 32K tokens, ``rope`` vs ``resonance_yarn`` interleaved, for each layer spec of ``gpu_specs()``
    (the local spec eager and compiled, TE's when installed), one spec's two models at a time. MFU is
    against the datasheet peak and against a measured 8192^3 bf16 matmul. The warm-up steps hold
    ``local_compiled``'s compilation (one per length). A spec that fails is recorded with its error and the
    next one runs."""
    import dataclasses
    import gc
    import traceback

    from megatron_resonance.megatron.llama import LlamaConfig, resolve_spec
    from megatron_resonance.training import flops

    _initialize()
    layers = 2 if quick else 4
    shape = LlamaConfig(
        num_layers=layers, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=32,
        vocab_size=32000, max_position_embeddings=32768,
    )  # fmt: skip
    peak = flops.peak_tflops()
    measured = _matmul_tflops()
    default = resolve_spec("auto")
    out = {
        "gpu_shape": {"layers": layers, "hidden": 4096, "ffn": 11008, "heads": 32, "dtype": "bf16", "batch": 1},
        "gpu_spec": default,
        "gpu_specs": gpu_specs(),
        "gpu_peak_tflops_datasheet": peak,
        "gpu_matmul_tflops_measured": measured,
        "gpu_by_spec": {},
    }
    print(
        f"[bench] gpu: specs {out['gpu_specs']} (default {default}); matmul {measured:.0f} TFLOP/s (datasheet {peak})",
        flush=True,
    )
    for seq in GPU_LENGTHS:
        length = f"{seq // 1024}k"
        model_cfg = dataclasses.replace(shape, max_position_embeddings=seq)
        per_token = flops.training_flops_per_token(model_cfg, seq)
        for spec in out["gpu_specs"]:
            entry = out["gpu_by_spec"].setdefault(spec, {})
            steps = None
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                steps = {  # the LLaMA-2 4K -> 32K extension: 4096 original positions, factor 8, at both lengths
                    kind: _megatron_trainer(model_cfg, _rope(model_cfg, kind, 4096, 8.0), seq, 1, bf16=True, spec=spec)
                    for kind in ("rope", "resonance_yarn")
                }
                times = _interleaved_times(steps, warmup=3, repeats=3 if quick else 6, sync=torch.cuda.synchronize)
            except Exception as e:  # (a compiler missing on this machine, out of memory): the next spec runs
                traceback.print_exc()
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                entry[length] = {"error": f"{type(e).__name__}: {first_line}"}
                print(f"[bench] gpu {length} {spec}: failed: {entry[length]['error']}", flush=True)
            else:
                result = {}
                for kind, seconds in _medians(times).items():
                    tflops = per_token * seq / seconds / 1e12
                    result[kind] = {
                        "step_s": seconds,
                        "tokens_per_s": seq / seconds,
                        "tflops": tflops,
                        "mfu": tflops / peak if peak else None,
                        "mfu_vs_measured_matmul": tflops / measured,
                    }
                    print(
                        f"[bench] gpu {length} {spec} {kind}: {seq / seconds:,.0f} tok/s, {tflops:.0f} TFLOP/s"
                        + (f", MFU {100 * tflops / peak:.1f} %" if peak else ""),
                        flush=True,
                    )
                result["resonance_overhead_ratio"] = _paired_ratio(times["resonance_yarn"], times["rope"])
                result["peak_memory_gib_two_models"] = torch.cuda.max_memory_allocated() / 2**30
                result["seconds_with_warmup"] = time.perf_counter() - start
                entry[length] = result
                if spec == default:  # the keys of earlier runs: the spec training picks by default
                    for kind in ("rope", "resonance_yarn"):
                        out[f"gpu_{length}_{kind}"] = result[kind]
                    out[f"gpu_{length}_resonance_overhead_ratio"] = result["resonance_overhead_ratio"]
                    out[f"gpu_{length}_peak_memory_gib_two_models"] = result["peak_memory_gib_two_models"]
            del steps
            gc.collect()
            torch.cuda.empty_cache()
    return out


def _matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    """Achieved bf16 TFLOP/s of an n^3 matmul on random data (median of CUDA-event-timed repeats)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------


def conversion(quick: bool, workdir: Path) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "convert_speed.py"), "--workdir", str(workdir)]
    if quick:
        cmd += ["--layers", "6"]
    subprocess.run(cmd, check=True, cwd=REPO)
    result = json.loads((workdir / "convert_speed.json").read_text())
    return {
        "convert_gb_per_s": result["hf_to_megatron"]["process_gb_per_s"],
        "copy_gb_per_s": result["cp_r"]["gb_per_s"],
        "conversion": result,
    }


def main(argv=None) -> int:
    from megatron_resonance.cli import ArgumentParser

    p = ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and a smaller conversion model (<= 5 min)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--workdir", default=None, help="scratch directory (default: next to --out)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: precision,cpu,gpu,convert")
    p.add_argument("--cpu-rounds", type=int, default=None, help=argparse.SUPPRESS)  # one process of the cpu section
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    for name in sorted(skip - set(SECTIONS)):
        p.error(f"--skip: unknown section {name!r} ({', '.join(SECTIONS)})")
    out = Path(args.out)
    workdir = Path(args.workdir or out.parent / "bench_work")
    workdir.mkdir(parents=True, exist_ok=True)
    from megatron_resonance.environment import describe

    results = {"machine": {**describe(), "cpu_count": os.cpu_count()}, "quick": args.quick}
    on_gpu = torch.cuda.is_available()  # the CPU path comparison needs a machine without CUDA
    sections = [
        ("precision", lambda: angle_errors()),
        ("gpu", lambda: gpu_throughput(args.quick))
        if on_gpu
        else (
            "cpu",
            lambda: (
                cpu_training(args.quick, workdir)
                if args.cpu_rounds is None
                else cpu_training_here(args.quick, args.cpu_rounds)
            ),
        ),
        ("convert", lambda: conversion(args.quick, workdir)),
    ]
    if not on_gpu:
        print("[bench] gpu: no CUDA device, the GPU section is skipped", flush=True)
    for name, fn in sections:
        if name in skip:
            continue
        start = time.time()
        print(f"[bench] {name} ...", flush=True)
        results.update(fn())
        print(f"[bench] {name}: {time.time() - start:.0f} s", flush=True)
        out.write_text(json.dumps(results, indent=2))
    for key in CPU_RATIOS[:3] + (
        "angle_error_rad_at_1m",
        "megatron_core_angle_error_rad_at_1m",
        "convert_gb_per_s",
        "copy_gb_per_s",
    ):
        if key in results:
            print(f"{key:>38}: {results[key]:.4g}")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
