"""A sweep's figures, as in the papers: accuracy against throughput and against GFLOPs (one marker
per run, the seed spread as error bars, the Pareto front drawn), and a bar chart per group."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tieta.report.aggregate import RunRow, pareto_front
from tieta.report.figure import pyplot, save

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
          "#64B5CD")


def save_tradeoff(rows: list[RunRow], x_values: dict[str, float], path: Path, x_label: str, y_label: str,
                  higher_x_better: bool, caption: str = "", baseline: Optional[float] = None,
                  adopt: bool = False) -> None:
    """Accuracy (y: each row's headline, mean ± std over seeds) against ``x_values[run]``, the
    Pareto front as a dashed step line through the runs no other run beats on both axes.

    Args:
        baseline: a horizontal reference line (e.g. the majority-class accuracy), if given.
        adopt: a file at ``path`` is known to be an older tieta's figure (see
            :func:`tieta.files.write_owned`, which writes it).
    """
    plt = pyplot()
    shown = [row for row in rows if row.headline is not None and row.run in x_values]
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    points = {row.run: (x_values[row.run], row.headline.mean) for row in shown}
    for index, row in enumerate(shown):
        x, y = points[row.run]
        axis.errorbar(x, y, yerr=row.headline.std if row.headline.n > 1 else None, fmt="o", markersize=7,
                      color=COLORS[index % len(COLORS)], capsize=3, label=row.run)
        # alternate above and below, so that runs of equal cost do not print over each other
        axis.annotate(row.run, (x, y), textcoords="offset points", xytext=(6, 4 if index % 2 else -10), fontsize=7)
    front = pareto_front(points, higher_x_better)
    if len(front) > 1:
        xs, ys = [points[name][0] for name in front], [points[name][1] for name in front]
        axis.step(xs, ys, where="pre" if higher_x_better else "post", linestyle="--", color="black", linewidth=1,
                  alpha=0.6, label="Pareto front")
    if baseline is not None:
        axis.axhline(baseline, color="grey", linestyle=":", linewidth=1, label="majority class")
    axis.set_xlabel(x_label + ("  (better →)" if higher_x_better else "  (← better)"))
    axis.set_ylabel(y_label)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    save(figure, path, caption, owned=True, adopt=adopt)


def save_group_bars(rows: list[RunRow], groups: list[str], path: Path, caption: str = "",
                    adopt: bool = False) -> None:
    """Grouped bars: each group's mean accuracy (mean ± std over seeds) per run (``adopt`` as for
    :func:`save_tradeoff`)."""
    plt = pyplot()
    shown = [row for row in rows if row.groups]
    columns = groups + ["mean of groups"]
    width = 0.8 / max(1, len(shown))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 0.3 * len(shown)), 4.2))
    for index, row in enumerate(shown):
        spreads = [row.groups.get(group) for group in groups] + [row.headline]
        xs = [position + (index - (len(shown) - 1) / 2) * width for position in range(len(columns))]
        axis.bar(xs, [s.mean if s else 0 for s in spreads], width,
                 yerr=[s.std if s and s.n > 1 else 0 for s in spreads], capsize=2,
                 color=COLORS[index % len(COLORS)], label=row.run)
    axis.set_xticks(range(len(columns)))
    axis.set_xticklabels(columns)
    axis.set_ylabel("top-1 accuracy (%)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    save(figure, path, caption, owned=True, adopt=adopt)
