"""The report's plots (matplotlib, Agg backend), each returned as PNG bytes to embed."""
from __future__ import annotations

import io
import math
import textwrap
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

LOG_FLOOR = 1e-12  # an exact 0 on a log axis is drawn here and labelled as 0
# A linear axis spans at least this fraction of its values: two backends that agree to 1e-8 are
# drawn as one line, not as a gap that the axis's offset ("1e-7+5.47") makes look large.
MIN_RELATIVE_SPAN = 0.02
LEGEND_WIDTH = 44  # characters per legend line; longer case names wrap instead of leaving the picture
WIDTH, HEIGHT, DPI = 7.0, 2.8, 80


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)  # a fixed layout: "tight" would draw every figure twice
    plt.close(fig)
    return buffer.getvalue()


def _axes(title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    fig.subplots_adjust(left=0.1, right=0.66, top=0.88, bottom=0.24)  # room for the legend on the right
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _runs_axis(ax, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)))
    step = max(1, math.ceil(len(labels) / 10))
    ax.set_xticklabels([label if i % step == 0 or i == len(labels) - 1 else "" for i, label in enumerate(labels)],
                       rotation=30, ha="right", fontsize=6)
    ax.set_xlim(-0.5, len(labels) - 0.5)


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, [textwrap.fill(label, LEGEND_WIDTH) for label in labels], fontsize=6,
                  loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _linear_span(ax, values: Sequence[float]) -> None:
    """No offset notation, and at least MIN_RELATIVE_SPAN of the values' size from top to bottom."""
    ax.ticklabel_format(axis="y", useOffset=False)
    if not values:
        return
    low, high = ax.get_ylim()
    need = MIN_RELATIVE_SPAN * max(abs(v) for v in values)
    if high - low < need:
        middle = (max(values) + min(values)) / 2
        ax.set_ylim(middle - need / 2, middle + need / 2)


def trend(title: str, ylabel: str, runs: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
          log: bool = False, lines: Mapping[str, float] | None = None,
          series_lines: Mapping[str, float] | None = None) -> bytes:
    """One point per run and series (None: no value that run); ``lines``: horizontal reference
    lines (a target, a floor); ``series_lines``: a dashed line per series in its colour (a tolerance)."""
    fig, ax = _axes(title, ylabel)
    for name, values in series.items():
        xs = [i for i, v in enumerate(values) if v is not None]
        ys = [max(values[i], LOG_FLOOR) if log else values[i] for i in xs]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name)
        if series_lines and name in series_lines and series_lines[name]:
            ax.axhline(series_lines[name], color=line.get_color(), linestyle="--", linewidth=0.9, alpha=0.8)
    for label, value in (lines or {}).items():
        ax.axhline(value, color="black", linestyle=":", linewidth=1.2)
        ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), fontsize=6, va="bottom")
    if log:
        ax.set_yscale("log")
    else:
        _linear_span(ax, [v for values in series.values() for v in values if v is not None])
    _runs_axis(ax, runs)
    _legend(ax)
    return png(fig)


def roofline_bars(title: str, bars: Mapping[str, tuple[float | None, float | None]]) -> bytes:
    """Per contender: (achieved GFLOP/s, host peak GFLOP/s), the peak drawn as an outline."""
    fig, ax = _axes(title, "GFLOP/s")
    fig.subplots_adjust(left=0.36, right=0.78)  # case and backend names label the bars
    names = list(bars)
    achieved = [bars[n][0] or 0.0 for n in names]
    peaks = [bars[n][1] or 0.0 for n in names]
    ax.barh(names, peaks, color="none", edgecolor="grey", linestyle="--", label="host GEMM peak")
    ax.barh(names, achieved, color="tab:blue", alpha=0.8, label="achieved")
    for i, (a, p) in enumerate(zip(achieved, peaks)):
        if p and a <= p:
            ax.annotate(f"{a / p:.0%}", (a, i), fontsize=6, va="center", xytext=(2, 0), textcoords="offset points")
        elif p:  # above the peak as measured: the peak was measured low, not the run faster than the CPU
            ax.annotate("> peak (peak measured low)", (a, i), fontsize=6, va="center", ha="right", xytext=(-2, 0),
                        textcoords="offset points", color="white", fontweight="bold")
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel("")
    ax.set_xlabel("GFLOP/s", fontsize=8)
    _legend(ax)
    return png(fig)


def quantile_bars(title: str, quantiles: Mapping[str, Mapping[str, float | None]]) -> bytes:
    """Per output: mean, p99 and max |difference| on a log axis, the tolerance as a tick."""
    fig, ax = _axes(title, "|difference|")
    names = list(quantiles)
    width = 0.25
    for k, (stat, colour) in enumerate((("mean_abs", "tab:green"), ("p99_abs", "tab:orange"), ("max_abs", "tab:red"))):
        values = [max(quantiles[n].get(stat) or 0.0, LOG_FLOOR) for n in names]
        ax.bar([i + (k - 1) * width for i in range(len(names))], values, width, color=colour, label=stat.replace("_abs", ""))
    tolerances = [quantiles[n].get("atol") for n in names]
    ax.scatter([i for i, t in enumerate(tolerances) if t], [t for t in tolerances if t], marker="_", s=400,
               color="black", label="tolerance (atol)", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=6)
    _legend(ax)
    return png(fig)
