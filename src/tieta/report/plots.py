"""A sweep's figures, as in the papers: accuracy against throughput and against GMACs (one marker
per run, the seed spread as error bars, the Pareto front of the plotted axes drawn on each), and a
bar chart of the group means where there are several groups. Every label stays inside the figure:
run names point inwards from the outermost markers, and the axes keep a margin around them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from tieta.report.aggregate import RunRow, pareto_front, run_label, tradeoff_points
from tieta.report.figure import pyplot, save

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
          "#64B5CD")


def save_tradeoff(rows: list[RunRow], x_values: dict[str, float], path: Path, x_label: str, y_label: str,
                  higher_x_better: bool, caption: str = "", baseline: Optional[float] = None,
                  adopt: bool = False, budget: Optional[tuple[float, str]] = None) -> None:
    """Accuracy (y: each row's headline, mean ± std over seeds) against ``x_values[run]``, the
    Pareto front (the runs no other run beats on both plotted axes, :func:`tieta.report.aggregate.pareto_front`)
    ringed, and joined by a dashed step line where it holds several runs.

    Args:
        baseline: a horizontal reference line (e.g. the majority-class accuracy), if given.
        adopt: a file at ``path`` is known to be an older tieta's figure (see
            :func:`tieta.files.write_owned`, which writes it).
        budget: (x, label): a vertical line where a budget falls on the x axis (``tieta report
            --budget``).
    """
    plt = pyplot()
    points = tradeoff_points(rows, x_values)
    shown = [row for row in rows if row.run in points]
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    xs = [x for x, _ in points.values()]
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0
    for index, row in enumerate(shown):
        x, y = points[row.run]
        axis.errorbar(x, y, yerr=row.headline.std if row.headline.n > 1 else None, fmt="o", markersize=7,
                      color=COLORS[index % len(COLORS)], capsize=3, label=run_label(row))
        # the name points inwards (never past the figure's edge), alternately above and below, so
        # that runs of equal cost do not print over each other
        inwards = -1 if x > middle else 1
        axis.annotate(row.run, (x, y), textcoords="offset points", xytext=(6 * inwards, 4 if index % 2 else -10),
                      ha="left" if inwards > 0 else "right", fontsize=7)
    front = pareto_front(points, higher_x_better)
    if front:
        xs, ys = [points[name][0] for name in front], [points[name][1] for name in front]
        if len(front) > 1:
            axis.step(xs, ys, where="pre" if higher_x_better else "post", linestyle="--", color="black",
                      linewidth=1, alpha=0.6)
        axis.plot(xs, ys, "o", markersize=13, markerfacecolor="none", markeredgecolor="black", alpha=0.6,
                  label="Pareto front")
    if baseline is not None:
        axis.axhline(baseline, color="grey", linestyle=":", linewidth=1, label="majority class")
    axis.margins(x=0.15, y=0.12)  # room for the names beside the outermost markers
    if budget is not None:
        axis.axvline(budget[0], color="#C44E52", linestyle="-.", linewidth=1.2, label=budget[1])
        left, right = axis.get_xlim()
        pad = 0.05 * (max(right, budget[0]) - min(left, budget[0]))
        axis.set_xlim(min(left, budget[0] - pad), max(right, budget[0] + pad))  # the line inside the axes
    axis.set_xlabel(x_label + ("  (better →)" if higher_x_better else "  (← better)"))
    axis.set_ylabel(y_label)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    save(figure, path, caption, owned=True, adopt=adopt)


def save_group_bars(rows: list[RunRow], groups: list[str], path: Path, caption: str = "",
                    adopt: bool = False) -> None:
    """Grouped bars: each group's mean accuracy (mean ± std over seeds) per run (``adopt`` as for
    :func:`save_tradeoff`). The accuracy axis starts just below the lowest bar (said in its label),
    so that differences of a few points are visible."""
    plt = pyplot()
    shown = [row for row in rows if row.groups]
    columns = groups + ["mean of groups"]
    width = 0.8 / max(1, len(shown))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 0.3 * len(shown)), 4.2))
    low, high = 100.0, 0.0
    for index, row in enumerate(shown):
        spreads = [row.groups.get(group) for group in groups] + [row.headline]
        xs = [position + (index - (len(shown) - 1) / 2) * width for position in range(len(columns))]
        axis.bar(xs, [s.mean if s else 0 for s in spreads], width,
                 yerr=[s.std if s and s.n > 1 else 0 for s in spreads], capsize=2,
                 color=COLORS[index % len(COLORS)], label=run_label(row))
        for s in spreads:
            if s is not None:
                error = s.std if s.n > 1 else 0.0
                low, high = min(low, s.mean - error), max(high, s.mean + error)
    span = max(high - low, 2.0)
    bottom = float(max(0, math.floor(low - span))) if high >= low else 0.0
    axis.set_ylim(bottom, min(100.0, high + 0.4 * span) if high >= low else 100.0)
    axis.set_xticks(range(len(columns)))
    axis.set_xticklabels(columns)
    axis.set_ylabel("top-1 accuracy (%)" + (f", axis from {bottom:.0f}" if bottom > 0 else ""))
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    save(figure, path, caption, owned=True, adopt=adopt)
