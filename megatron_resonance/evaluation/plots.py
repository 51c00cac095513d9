"""The evaluation figures: perplexity against length (one line per model), retrieval heatmaps by length and depth."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

# matplotlib (about a second to import) is imported where a figure is drawn.


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
    if original_length:
        title += f" (original length {original_length})"
    plot_depth_heatmaps({"": by_depth}, depths, path, title=title)


def plot_depth_heatmaps(
    panels: Mapping[str, Mapping[int, Mapping[str, float]]],
    depths: Sequence[str],
    path: str,
    title: str,
    original_lengths: Optional[Mapping[str, Optional[int]]] = None,
) -> None:
    """Retrieval heatmaps side by side, one panel per model (``{name: {length: {depth: score}}}``): one column
    per length, one row per depth (0 = needle at the start), annotated; a cell without samples is blank."""
    plt = _pyplot()
    original_lengths = original_lengths or {}
    width = max(len(by) for by in panels.values())
    fig, axes = plt.subplots(
        1,
        len(panels),
        squeeze=False,
        sharey=True,
        figsize=(len(panels) * max(4.5, 1.6 + 0.9 * width), 1.4 + 0.5 * len(depths)),
    )
    for ax, (name, by_depth) in zip(axes[0], panels.items()):
        lengths = sorted(by_depth)
        grid = [[by_depth[L].get(d, math.nan) for L in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), list(depths))
        ax.set_xlabel("context length (tokens)")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                if math.isfinite(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
        if name:
            original = original_lengths.get(name)
            ax.set_title(name + (f" (original length {original})" if original else ""), fontsize="medium")
    axes[0][0].set_ylabel("needle depth")
    if len(panels) == 1 and not next(iter(panels)):
        axes[0][0].set_title(title, fontsize="medium")
    else:
        fig.suptitle(title, fontsize="medium")
    fig.colorbar(image, ax=list(axes[0]), label="score")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}" if value < 1e4 else f"{value:.3e}"
