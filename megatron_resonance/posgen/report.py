"""The PosGen report: stored cells -> ``report.json``, ``report.md`` and one ``position_<task>.png`` per task.

Every finished training is one JSON record under ``<out>/cells/<task>/seed<k>/<trained-kind>.json`` (with
both of its test variants). The report aggregates what is there: per task and variant, in- and
out-of-distribution accuracy as mean ± sample std over seeds; the paired per-seed differences the paper
makes (``resonance − rope``, ``resonance_yarn − yarn``) with a 95 % Student-t interval (``posgen.stats``);
which trained models learned the rule in distribution; and accuracy by position with a band over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence

from megatron_resonance import atomic
from megatron_resonance.environment import describe
from megatron_resonance.posgen import stats
from megatron_resonance.posgen.presets import PROTOCOLS, TRAINED_KINDS, VARIANTS, Preset
from megatron_resonance.posgen.tasks import PREFIX_LENGTH, VOCAB_SIZE

# matplotlib (about a second to import) is imported where a figure is drawn, and posgen.cell
# (megatron layer) where a YaRN scale is computed: the report reads and writes JSON without them.

CELLS_DIR = "cells"
PAIRS = (("resonance", "rope"), ("resonance_yarn", "yarn"))
"""The paired comparisons the report makes: (variant, baseline) with the same seed."""
METRICS = ("ood_accuracy", "id_accuracy")
LEARNED = 0.95
"""In-distribution accuracy at which a trained model counts as having learned the task's rule: accuracy
past the training length says something about position generalization only for such models."""


def cell_path(out: str, task: str, seed: int, kind: str) -> str:
    return os.path.join(out, CELLS_DIR, task, f"seed{seed}", f"{kind}.json")


def pair_name(pair) -> str:
    return f"{pair[0]} - {pair[1]}"


def build_report(out: str, preset: Preset) -> dict:
    """Aggregate the stored cells of ``preset``'s tasks and seeds (finished ones only).

    Per task and variant: ``{metric: summary}`` (mean ± std over seeds); per task and pair of
    :data:`PAIRS`: the paired per-seed difference with its 95 % interval; per task and trained kind: the
    seeds whose model learned the rule (``learned``); per task and variant the position curves' mean and
    std over seeds.
    """
    report = {
        "preset": preset.name,
        "protocol": preset.protocol,
        "settings": dataclasses.asdict(preset),
        "tasks": list(preset.tasks),
        "variants": list(VARIANTS),
        "seeds": list(range(preset.seeds)),
        **{metric: {} for metric in METRICS},
        "paired_difference": {metric: {} for metric in METRICS},
        "learned": {},
        "position_accuracy": {},
        "position_accuracy_std": {},
        "position_accuracy_runs": {},
        "cells": [],
    }
    for task in preset.tasks:
        by_seed = {metric: {v: {} for v in VARIANTS} for metric in METRICS}
        curves = {v: [] for v in VARIANTS}
        for seed in range(preset.seeds):
            for kind in TRAINED_KINDS:
                path = cell_path(out, task, seed, kind)
                if not os.path.isfile(path):
                    continue
                with open(path) as f:
                    cell = json.load(f)
                report["cells"].append(
                    {
                        "task": task,
                        "seed": seed,
                        "trained_as": kind,
                        "train_seconds": cell["train"]["seconds"],
                        "test_seconds": cell["test_seconds"],
                        "world_size": cell["world_size"],
                    }
                )
                for variant, result in cell["variants"].items():
                    for metric in METRICS:
                        by_seed[metric][variant][seed] = result[metric]
                    curves[variant].append(result["position_accuracy"])
        for metric in METRICS:
            report[metric][task] = {v: stats.summary(by_seed[metric][v]) for v in VARIANTS}
            report["paired_difference"][metric][task] = {
                pair_name(pair): stats.paired_difference(by_seed[metric][pair[0]], by_seed[metric][pair[1]])
                for pair in PAIRS
            }
        report["learned"][task] = {
            kind: {
                "seeds": sorted(s for s, a in by_seed["id_accuracy"][kind].items() if a >= LEARNED),
                "of": len(by_seed["id_accuracy"][kind]),
            }
            for kind in TRAINED_KINDS
        }
        bands = {v: stats.band(curves[v]) if curves[v] else ([], []) for v in VARIANTS}
        report["position_accuracy"][task] = {v: bands[v][0] for v in VARIANTS}
        report["position_accuracy_std"][task] = {v: bands[v][1] for v in VARIANTS}
        report["position_accuracy_runs"][task] = curves
    report["learned_threshold"] = LEARNED
    report["complete"] = len(report["cells"]) == len(preset.cells())
    report["environment"] = describe()
    return report


def _yarn_scale(preset: Preset) -> float:
    from megatron_resonance.posgen.cell import rope_config

    return rope_config(preset, "yarn").factor


def _cell_text(summary: dict) -> str:
    if summary["mean"] is None:
        return "–"
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def _difference_text(d: dict) -> str:
    if d["mean"] is None:
        return "–"
    if d["ci"] is None:
        return f"{100 * d['mean']:+.1f} (1 seed)"
    return f"{100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"


def _learned_text(learned: dict) -> str:
    return f"{len(learned['seeds'])} of {learned['of']}"


def write_report(out: str, preset: Preset, run_info: Optional[dict] = None) -> dict:
    """``report.json``, ``report.md`` and one ``position_<task>.png`` per task, from the stored cells.

    ``run_info``: the last command that ran cells (``wall_seconds``, ``cells_run``, ``processes``,
    ``threads_per_process``, ``how``); None keeps the one the previous report recorded.
    """
    report = build_report(out, preset)
    if run_info is None:
        try:
            with open(os.path.join(out, "report.json")) as f:
                run_info = json.load(f).get("last_run")
        except (OSError, ValueError):
            run_info = None
    report["last_run"] = run_info
    atomic.write_json(os.path.join(out, "report.json"), report)
    plots = plot_positions(out, report)
    env, p = report["environment"], preset
    train_total = sum(c["train_seconds"] + c["test_seconds"] for c in report["cells"])
    lines = [
        f"# PosGen benchmark — preset `{preset.name}`, protocol `{p.protocol}`",
        "",
        f"- protocol `{p.protocol}`: {PROTOCOLS[p.protocol]}",
        f"- date {env['date']}, commit `{env['commit']}`, torch {env['torch']}, megatron-core {env['megatron_core']}",
        f"- hardware: {env['hardware']}; data-parallel ranks per cell: "
        + ", ".join(sorted({str(c["world_size"]) for c in report["cells"]}) or ["–"]),
        f"- model: {p.num_layers} layers, d_model {p.hidden_size}, {p.num_attention_heads} heads x {p.head_dim}, "
        f"SwiGLU {p.ffn_hidden_size}, rotary base {p.rotary_base:g}; vocab 17 + BOS",
        f"- data: {p.train_sequences:,} / {p.validation_sequences:,} / {p.test_sequences:,} sequences, train "
        f"length {p.train_length}, test length {p.test_length}; YaRN s = {_yarn_scale(p):g}",
        f"- training: {p.epochs:g} epochs = {p.train_iters():,} steps of {p.global_batch_size}, AdamW lr {p.lr:g} "
        f"wd {p.weight_decay:g}, {100 * p.warmup_fraction:g} % warm-up then cosine, {'bf16' if p.bf16 else 'fp32'}",
        f"- seeds: {p.seeds}; cells finished: {len(report['cells'])} of {len(p.cells())}; compute time "
        f"{train_total / 60:.1f} min"
        + (
            ""
            if run_info is None
            else f"; the last command ran {run_info['cells_run']} cell(s) in "
            f"{run_info['wall_seconds'] / 60:.1f} min wall ({run_info['how']} x {run_info['threads_per_process']} "
            "thread(s))"
        ),
        "",
        "Teacher-forced next-token accuracy (%), mean ± sample std over seeds. `yarn` / `resonance_yarn` are "
        f"the `rope` / `resonance` models evaluated with YaRN (s = {_yarn_scale(p):g}) applied at test time. "
        "Differences are paired by seed (same initial weights and data order), in points, with a two-sided "
        f"{100 * stats.CONFIDENCE:g} % Student-t interval over seeds.",
        "",
    ]
    pairs = [pair_name(pair) for pair in PAIRS]
    for metric, title in (
        ("ood_accuracy", f"Out of distribution: positions {p.train_length}–{p.test_length - 1}"),
        ("id_accuracy", f"In distribution: positions {PREFIX_LENGTH}–{p.train_length - 1}"),
    ):
        columns = list(VARIANTS) + [f"{pair} [95 % CI]" for pair in pairs]
        lines += [f"## {title}", "", "| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for task in p.tasks:
            cells = [_cell_text(report[metric][task][v]) for v in VARIANTS]
            cells += [_difference_text(report["paired_difference"][metric][task][pair]) for pair in pairs]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"## Rule learned: trained models at ≥ {100 * LEARNED:g} % in distribution",
        "",
        "Accuracy past the training length measures position generalization only where the rule was learned.",
        "",
        "| task | " + " | ".join(TRAINED_KINDS) + " |",
        "|---" * (len(TRAINED_KINDS) + 1) + "|",
    ]
    for task in p.tasks:
        lines.append(
            f"| {task} | " + " | ".join(_learned_text(report["learned"][task][k]) for k in TRAINED_KINDS) + " |"
        )
    lines += ["", "## Accuracy by position (mean ± std over seeds, bins of 4 positions)", ""]
    lines += [f"![{task}]({os.path.basename(f)})" for task, f in plots.items()]
    lines += ["", "## Cells", "", "| task | seed | trained as | train s | test s |", "|---|---|---|---|---|"]
    for c in report["cells"]:
        lines.append(
            f"| {c['task']} | {c['seed']} | {c['trained_as']} | {c['train_seconds']:.0f} | {c['test_seconds']:.1f} |"
        )
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


PLOT_BIN = 4
"""Positions per plotted point. Bins of 4 start at the prefix end and meet the training length (a multiple
of 4) at a bin edge, and average out semi_recursive's even / odd alternation, which is unreadable raw."""


def binned(curve: Sequence[Optional[float]], width: int = PLOT_BIN):
    """(bin centres, bin means) of a per-position curve, skipping the seed prefix (None entries)."""
    xs, ys = [], []
    for start in range(PREFIX_LENGTH, len(curve), width):
        values = [a for a in curve[start : start + width] if a is not None]
        if values:
            xs.append(start + (min(width, len(curve) - start) - 1) / 2)
            ys.append(sum(values) / len(values))
    return xs, ys


def plot_positions(out: str, report: dict) -> Dict[str, str]:
    """One PNG per task with data: accuracy by position (bins of 4), one line per variant at the mean over
    seeds with a band of ± one std (each seed's curve binned first). The unbinned curves are
    ``report.json``'s ``position_accuracy`` / ``position_accuracy_runs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_length = report["settings"]["train_length"]
    written = {}
    for task, runs in report["position_accuracy_runs"].items():
        if not any(runs.values()):
            continue
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for variant in VARIANTS:
            if not runs[variant]:
                continue
            binned_runs = [binned(curve) for curve in runs[variant]]
            xs = binned_runs[0][0]
            mean, std = stats.band([ys for _, ys in binned_runs])
            n = len(binned_runs)
            (line,) = ax.plot(xs, mean, label=f"{variant} ({n} seed{'s' * (n != 1)})", linewidth=1.5)
            if n > 1:
                ax.fill_between(
                    xs,
                    [m - s for m, s in zip(mean, std)],
                    [m + s for m, s in zip(mean, std)],
                    color=line.get_color(),
                    alpha=0.15,
                    linewidth=0,
                )
        ax.axvline(train_length - 0.5, color="grey", linestyle="--", linewidth=1, label="training length")
        ax.axhline(1 / VOCAB_SIZE, color="grey", linestyle=":", linewidth=1, label="chance (1/17)")
        ax.set(
            xlabel="position l (prediction of x_l from x_<l)",
            ylabel=f"teacher-forced accuracy (bins of {PLOT_BIN})",
            title=f"PosGen {task} — preset {report['preset']}, protocol {report['protocol']}",
            ylim=(0, 1.02),
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.grid(alpha=0.3)
        path = os.path.join(out, f"position_{task}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[task] = path
    return written
