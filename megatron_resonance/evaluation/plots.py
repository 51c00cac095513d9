"""The evaluation figures: perplexity against length (one line per model), passkey accuracy heatmap."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot_perplexity(
    perplexity: Mapping[str, Mapping[int, Optional[float]]],
    original_lengths: Mapping[str, Optional[int]],
    path: str,
    title: str = "Perplexity by context length",
) -> None:
    """Perplexity vs length on a log y axis, one line per model; a dashed vertical line in the model's
    colour at its original training length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, by_length) in enumerate(perplexity.items()):
        color = colors[i % len(colors)]
        points = sorted((L, p) for L, p in by_length.items() if p is not None and math.isfinite(p))
        if points:
            ax.plot([L for L, _ in points], [p for _, p in points], marker="o", color=color, label=name)
        original = original_lengths.get(name)
        if original:
            ax.axvline(original, color=color, linestyle="--", linewidth=1, alpha=0.7)
    ax.set_yscale("log")
    values = [p for by in perplexity.values() for p in by.values() if p is not None and math.isfinite(p) and p > 0]
    wide = bool(values) and max(values) / min(values) > 10  # over a decade: label only 1-2-5 minor ticks

    def label(v, _):
        lead = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if not wide or lead in (1, 2, 5) else ""

    ax.yaxis.set_major_formatter(matplotlib_ticker().FuncFormatter(label))
    ax.yaxis.set_minor_formatter(matplotlib_ticker().FuncFormatter(label))
    ax.tick_params(axis="y", which="minor", labelsize="small")
    lengths = sorted({L for by_length in perplexity.values() for L in by_length})
    if len(lengths) <= 12:
        ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.plot([], [], color="gray", linestyle="--", linewidth=1, label="original training length")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(
    by_depth: Mapping[int, Mapping[str, float]],
    depths: Sequence[str],
    path: str,
    title: str = "Passkey retrieval accuracy",
    original_length: Optional[int] = None,
) -> None:
    """Heatmap of accuracy: one column per length, one row per depth (0 = key at the start), annotated."""
    plt = _pyplot()
    lengths = sorted(by_depth)
    grid = [[by_depth[L][d] for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 0.9 * len(lengths)), 1.4 + 0.5 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), list(depths))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
    if original_length:
        title += f" (trained at {original_length})"
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}" if value < 1e4 else f"{value:.3e}"

