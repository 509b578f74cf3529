"""``tieta report``: a sweep folder to report.md, report.csv and the figures, ending with its reading.

The report's files have names tieta chooses in a folder that may be the user's, so each is written
by :func:`tieta.files.write_owned`: only a file tieta wrote there is replaced (a report.md of the
user's is refused, one sentence, before anything is measured or drawn). Files written by an older
tieta, which kept no record, are recognised by their content: report.md by its first line,
report.csv by its header, and a figure by the older report.md that shows it. A figure this report
does not draw (or an older tieta's name of one) is removed where tieta wrote it and nobody has
changed it since, so that the folder shows no stale figure.

What a report says of speed follows :mod:`tieta.report.speed`: the fastest run is the one of the
highest measured throughput (the img/s column and the x axis of the plot), named only where the
per-round speedups resolve it; the Pareto fronts are those of the plotted axes.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Callable, Optional

from tieta.errors import TietaError
from tieta.files import MANIFEST, check_owned, read_json, read_regular, write_owned, written_by_tieta
from tieta.measure.load import busy, busy_note, load_text
from tieta.measure.target import Target, rate_unit
from tieta.report.aggregate import (EXTRA_ACCURACIES, RunRow, Spread, headline_name, input_unit, means_of,
                                    pareto_front, present_groups, run_label, run_rows, score_name, tradeoff_points)
from tieta.report.budget import budget_reading, budget_x
from tieta.report.collect import SweepResults, collect, majority_share
from tieta.report.figure import pyplot
from tieta.report.plots import save_group_bars, save_tradeoff
from tieta.report.speed import fastest_text, spread, timed_batch
from tieta.report.sweep_bench import sweep_throughput
from tieta.report.tables import PYRA_UNIT
from tieta.train.reading import sweep_notes

MAJORITY = "majority class"
FIGURES = ("accuracy_vs_throughput.png", "accuracy_vs_gmacs.png", "group_means.png")
OLDER_FIGURES = ("accuracy_vs_gflops.png",)  # an older tieta's name of accuracy_vs_gmacs.png
REPORT_FILE, CSV_FILE = "report.md", "report.csv"
CSV_START = "run,method,seeds,headline,headline_final_mean"  # how every report.csv tieta wrote begins


def _cell(spread: Optional[Spread]) -> str:
    return spread.text() if spread is not None else "-"


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header)] + lines
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _majority(results: SweepResults) -> dict[str, float]:
    split = next((str((r.config.get("data") or {}).get("eval_split", "test")) for r in results.records), "test")
    shares = {task: majority_share(results.task_paths.get(task), split) for task in results.tasks}
    return {task: share for task, share in shares.items() if share is not None}


def _majority_row(results: SweepResults, shares: dict[str, float]) -> Optional[RunRow]:
    """The accuracy of always answering the most frequent test class, aggregated like a run."""
    if len(shares) != len(results.tasks):
        return None
    row = RunRow(MAJORITY, "-", final={t: Spread(v, 0.0, 1) for t, v in shares.items()})
    means = means_of(results, shares)
    row.groups = {g: Spread(means[g], 0.0, 1) for g in present_groups(results)}
    row.task_mean, row.headline = Spread(means["task_mean"], 0.0, 1), Spread(means["headline"], 0.0, 1)
    return row


def reading(rows: list[RunRow], throughput: Optional[dict[str, Any]], headline: str, score: str = "accuracy",
            unit: str = "image") -> str:
    """A few sentences: the most accurate run; the fastest (the highest throughput, named only where
    the per-round speedups resolve it; without a measurement, the cheapest in GMACs) and the trade
    between the two; what the seed spread does not resolve; the Pareto front of each plot's axes;
    and a busy machine. Runs are named by their run names, as in the table, with the method beside
    a name the first time where the two differ (:func:`tieta.report.aggregate.run_label`). ``score``:
    what the runs are ranked by ("accuracy", or a segmentation run's "mIoU"); ``unit``: what one input
    is ("image", or "clip": speeds in clips/s)."""
    rated = [row for row in rows if row.headline is not None]
    if not rated:
        return "No run has every task finished, so no run can be ranked yet."
    by_run = {row.run: row for row in rated}
    best = max(rated, key=lambda row: row.headline.mean)

    introduced: set[str] = set()

    def name(run: str) -> str:
        first = run not in introduced
        introduced.add(run)
        return run_label(by_run[run]) if first and run in by_run else run

    timed = (throughput or {}).get("rows", {})
    speed = {run: values for run, values in timed.items() if run in by_run}
    most = "Most accurate" if score == "accuracy" else f"Highest {score}"
    text = f"{most}: {name(best.run)} ({headline} {best.headline.text()}%)."
    found = fastest_text(speed, int((throughput or {}).get("rounds", 0)), next(iter(timed), ""), name,
                         rate_unit(unit)) \
        if speed else None
    if found is not None:
        fastest, said = found
        if fastest is None:
            text += f" Fastest: {said}."
        elif fastest == best.run:
            text += f" It is also the fastest: {said}."
        else:
            text += f" Fastest: {said}, {best.headline.mean - by_run[fastest].headline.mean:.2f} points below it."
    elif not speed:
        costed = [row for row in rated if "gmacs" in row.facts]
        cheapest = min(costed, key=lambda row: row.facts["gmacs"]) if len(costed) > 1 else None
        if cheapest is not None:
            how = f"{cheapest.facts['gmacs']:.3f} GMACs; throughput not measured"
            gap = best.headline.mean - cheapest.headline.mean
            text += f" It is also the cheapest ({how})." if cheapest is best else \
                f" Cheapest: {name(cheapest.run)} ({how}), {gap:.2f} points below it."
    seeds = max(row.headline.n for row in rated)
    if seeds > 1:
        noise = max(row.headline.std for row in rated)
        close = [name(row.run) for row in rated if row is not best and best.headline.mean - row.headline.mean < noise]
        if close:
            text += (f" Within the largest seed spread ({noise:.2f} points) of the best: {', '.join(close)}; "
                     "those differences are not resolved by these seeds.")
    else:
        text += " One seed: the spread between seeds is unknown, so small differences may be noise."
    for axis, better, x_values, higher in _plotted_axes(rated, speed):
        points = tradeoff_points(rated, x_values)
        if len(points) > 1:
            front = pareto_front(points, higher)
            higher_score = "more accurate" if score == "accuracy" else f"of a higher {score}"
            text += (f" Pareto front of {score} vs {axis} (no other run is both {higher_score} and {better}): "
                     f"{', '.join(name(run) for run in front)}.")
    note = busy_note((throughput or {}).get("load")) if speed else None
    return text + (f" {note}" if note else "")


def _plotted_axes(rows: list[RunRow], speed: dict[str, Any]) -> list[tuple[str, str, dict[str, float], bool]]:
    """The x axes of the accuracy plots, as (name, what better means, run -> x, whether higher x is
    better): measured throughput (img/s), then GMACs."""
    axes = []
    images_per_s = {run: values["images_per_s"] for run, values in speed.items() if "images_per_s" in values}
    if images_per_s:
        axes.append(("throughput", "faster", images_per_s, True))
    gmacs = {row.run: row.facts["gmacs"] for row in rows if "gmacs" in row.facts}
    if gmacs:
        axes.append(("GMACs", "cheaper", gmacs, False))
    return axes


def _summary_table(rows: list[RunRow], best_rows: dict[str, RunRow], groups: list[str], headline: str,
                   throughput: Optional[dict[str, Any]], task_mean: bool = True, unit: str = "image") -> str:
    """The summary: one row per run, each number in one column only (``groups``: the group columns
    to show, none where one group's mean is the headline; ``task_mean``: whether the mean over tasks
    differs from the headline by its definition); speed columns only where speed was measured."""
    speed = (throughput or {}).get("rows", {})
    extra = extra_accuracy_keys(rows)
    header = ["run", "method", f"{headline} (final)", f"{headline} (best)"] + [f"{g} (final)" for g in groups] + \
        (["mean over tasks (final)"] if task_mean else []) + [EXTRA_HEADERS[key] for key in extra] + \
        ["trainable %", "GMACs", PYRA_UNIT] + ([rate_unit(unit), "speedup", "speedup per round"] if speed else [])
    lines = []
    for row in rows:
        best, timed = best_rows.get(row.run), speed.get(row.run, {})
        found = spread(timed)
        lines.append([row.run, row.method, _cell(row.headline), _cell(best.headline if best else None)]
                     + [_cell(row.groups.get(g)) for g in groups]
                     + ([_cell(row.task_mean)] if task_mean else [])
                     + [_extra_cell(row, key) for key in extra]
                     + [_number(row.facts.get("trainable_percent"), 3),
                        _number(row.facts.get("gmacs"), 3), _number(row.facts.get("pyra_gflops"), 3)]
                     + ([_number(timed.get("images_per_s"), 1), _number(timed.get("speedup"), 2),
                         f"{found[0]:.2f}-{found[1]:.2f}" if found else "-"] if speed else []))
    return markdown_table(header, lines)


# the accuracies beside top-1 (tieta.report.aggregate.EXTRA_ACCURACIES), shown where a run records them
EXTRA_HEADERS = {"top5": "top-5 % (final)", "balanced_acc": "balanced % (final)", "mAcc": "mAcc % (final)",
                 "aAcc": "aAcc % (final)"}


def extra_accuracy_keys(rows: list[RunRow]) -> list[str]:
    """The accuracies beside top-1 that some row records, in their order."""
    return [key for key in EXTRA_ACCURACIES if any(key in row.extra_accuracies for row in rows)]


def _extra_cell(row: RunRow, key: str) -> str:
    """A run's top-5 or balanced accuracy: "n/a" where a run lacks it (top-5 of fewer than 5 classes)."""
    if key not in row.extra_accuracies:
        return "-"
    value = row.extra_accuracies[key]
    return f"{value:.2f}" if value is not None else "n/a"


def _task_table(rows: list[RunRow], tasks: list[str], groups: dict[str, Optional[str]], best: bool) -> str:
    header = ["run"] + [f"{task} ({groups[task] or 'no group'})" for task in tasks]
    lines = [[row.run] + [_cell((row.best if best else row.final).get(task)) for task in tasks] for row in rows]
    return markdown_table(header, lines)


def _extra_csv(row: RunRow, key: str) -> Any:
    value = row.extra_accuracies.get(key, "")
    return "n/a" if value is None else (round(value, 4) if value != "" else "")


def write_csv(path: Path, rows: list[RunRow], best_rows: dict[str, RunRow], results: SweepResults,
              throughput: Optional[dict[str, Any]], adopt: bool = False) -> None:
    """One line per run: every number of the report, means and standard deviations in their own columns.

    Args:
        adopt: a file at ``path`` is known to be an older tieta's (see :func:`tieta.files.write_owned`).
    """
    groups = present_groups(results)
    speed = (throughput or {}).get("rows", {})
    columns = ["run", "method", "seeds", "headline", "headline_final_mean", "headline_final_std", "headline_best_mean",
               "headline_best_std"] + [f"{g}_final_mean" for g in groups] + ["task_mean_final", "task_mean_best"] \
        + [f"{t}_final_mean" for t in results.tasks] + [f"{t}_final_std" for t in results.tasks] \
        + [f"{t}_best_mean" for t in results.tasks] \
        + ["trainable_percent", "gmacs", "pyra_gflops", "images_per_s", "speedup", "speedup_round_min",
           "speedup_round_max", "throughput_device"] + [f"{key}_final_mean" for key in EXTRA_ACCURACIES]

    def value(spread: Optional[Spread], part: str) -> Any:
        return "" if spread is None else round(getattr(spread, part), 4)

    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(columns)
    for row in rows:
        best, found = best_rows.get(row.run), spread(speed.get(row.run, {}))
        writer.writerow(
            [row.run, row.method, max((s.n for s in row.final.values()), default=0), headline_name(results),
             value(row.headline, "mean"), value(row.headline, "std"),
             value(best.headline if best else None, "mean"), value(best.headline if best else None, "std")]
            + [value(row.groups.get(g), "mean") for g in groups]
            + [value(row.task_mean, "mean"), value(best.task_mean if best else None, "mean")]
            + [value(row.final.get(t), "mean") for t in results.tasks]
            + [value(row.final.get(t), "std") for t in results.tasks]
            + [value(row.best.get(t), "mean") for t in results.tasks]
            + [round(row.facts[k], 4) if k in row.facts else "" for k in ("trainable_percent", "gmacs", "pyra_gflops")]
            + [round(speed[row.run]["images_per_s"], 2) if row.run in speed else "",
               round(speed[row.run]["speedup"], 4) if row.run in speed else "",
               round(found[0], 4) if found else "", round(found[1], 4) if found else "",
               (throughput or {}).get("machine", "") if row.run in speed else ""]
            + [_extra_csv(row, key) for key in EXTRA_ACCURACIES])
    write_owned(path, handle.getvalue(), adopt=adopt)


def _setup_line(results: SweepResults) -> str:
    """What was trained, from the first run's settings (the parts it records)."""
    config, summary = results.records[0].config, results.records[0].summary
    optim = config.get("optim") or {}
    parts = [f"{config['model']} at {summary['img_size']} px" if config.get("model") and summary.get("img_size")
             else None,
             f"{optim['epochs']} epochs, lr {optim.get('lr')}, batch {optim.get('batch_size')}" if optim.get("epochs")
             else None,
             f"{_tasks_text(results)}, {len(results.runs)} run{'s' if len(results.runs) != 1 else ''}, "
             f"seed{'s' if len(results.seeds) != 1 else ''} {', '.join(map(str, results.seeds))}"]
    return "; ".join(part for part in parts if part)


def _tasks_text(results: SweepResults) -> str:
    """"task elpv" where there is one, else "3 tasks"."""
    return f"task {results.tasks[0]}" if len(results.tasks) == 1 else f"{len(results.tasks)} tasks"


def write_report(folder: str | Path, output: Optional[str | Path] = None, bench: bool = True, device: str = "cpu",
                 batch_size: int = 32, rounds: int = 7, rebench: bool = False,
                 log: Callable[[str], None] = print, budget: Optional[Target] = None) -> dict[str, Any]:
    """Write report.md, report.csv and the figures for the runs under ``folder`` into ``output``
    (default: ``folder``); every run missing or left out is logged and listed with why.

    Args:
        budget: a speed or cost budget: the reading ends with the most accurate run that meets it
            (:func:`tieta.report.budget.budget_reading`) and the plots mark it.

    Returns:
        {"files": paths written, "reading": its sentences, "rows": RunRows (the majority class last),
         "best_rows", "missing": cells not finished, "left_out": results not compared (with why),
         "records": the finished runs, "throughput" (with the per-round speedups and the machine's
         load), "headline": what the headline is ("accuracy" for one task, see
         :func:`tieta.report.aggregate.headline_name`), "groups"}.

    Raises:
        TietaError: no run can be reported, or a file of the user's has a report file's name.
    """
    folder = Path(folder)
    results = collect(folder)
    output = Path(output) if output is not None else folder
    if output.exists() and not output.is_dir():
        raise TietaError(f"output {output} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)
    adopted = older_report_files(output, folder.name, results.tasks)
    for name in (REPORT_FILE, CSV_FILE):  # refused now, not after the timing
        check_owned(output / name, adopt=name in adopted)
    for item in results.left_out:
        log(f"left out {item}")
    rows = run_rows(results)
    best_rows = {row.run: row for row in run_rows(results, "best_acc")}
    throughput = sweep_throughput(results, folder, [row.run for row in rows], device, batch_size, rounds,
                                  rebench, log) if bench else None
    unit = input_unit(results)  # per clip for video runs: the table, reading and plots say so
    majority = _majority_row(results, _majority(results))
    groups, headline = present_groups(results), headline_name(results)
    shown = rows + ([majority] if majority else [])
    shown_groups = groups if len(groups) > 1 else []  # one group's mean is the headline itself
    task_mean = headline == "mean of group means"  # otherwise the headline is the mean over tasks (or the task)
    text = reading(rows, throughput, headline, "mIoU" if score_name(results) == "mIoU" else "accuracy", unit)
    if budget is not None:
        text += "\n\n" + budget_reading(rows, throughput, budget, headline, unit)
    text += "".join(f"\n\n{note}" for note in sweep_notes(results.records, _majority(results)))  # barely learned
    lines = [_title(folder, results.tasks), "", _setup_line(results) + ".", ""]
    if results.missing:
        lines += [f"**Partial:** {len(results.missing)} of {len(results.missing) + len(results.records)} runs are "
                  "missing; a run's means cover only the seeds where it has every task:", ""]
        lines += _listed(results.missing)
    if results.left_out:
        lines += [f"**Left out:** {len(results.left_out)} run{'s' if len(results.left_out) != 1 else ''} "
                  "with results that are not part of this comparison, each with why:", ""]
        lines += _listed(results.left_out)
    score = _score_text(results)
    if len(results.tasks) == 1:
        about = f"## Summary: {results.tasks[0]}", f"{score} on {results.tasks[0]}" + \
            (", mean ± standard deviation over seeds" if len(results.seeds) > 1 else "")
    else:
        about = "## Summary", (f"{score}, mean ± standard deviation over seeds. The headline is the "
                               f"{headline}" + (" (the papers' number; the mean over tasks is beside it)"
                                                if task_mean else ""))
    extra_note = (" Top-5 and balanced accuracy (the mean over classes of each class's recall): final, the mean "
                  "over every task and seed; n/a where a run lacks one (top-5 needs at least 5 classes)."
                  if set(extra_accuracy_keys(rows)) & {"top5", "balanced_acc"} else "")
    if set(extra_accuracy_keys(rows)) & {"mAcc", "aAcc"}:
        extra_note += (" mAcc (the mean over classes of each class's pixel accuracy) and aAcc (the share of test "
                       "pixels labelled right): final, the mean over every task and seed.")
    lines += [about[0], "", about[1] + ". Final: after the last epoch; best: the best evaluated epoch (what the "
              f"papers report). GMACs: multiply-accumulates per {unit} / 1e9." + extra_note, ""]
    lines += [_summary_table(shown, best_rows, shown_groups, headline, throughput, task_mean, unit), ""]
    if throughput:
        first = next(iter(throughput["rows"]), rows[0].run)
        lines += [f"Throughput: the trained models of task {throughput['task']} timed side by side on "
                  f"{throughput['machine']} ({throughput['device']}), batch {timed_batch(throughput)} of its "
                  f"evaluation {unit}s, median of {throughput['rounds']} interleaved rounds; speedup is the median "
                  f"per-round ratio to {first}, and 'speedup per round' the range of those ratios: runs whose "
                  f"ranges overlap are not told apart by this timing. Ratios hold; absolute {rate_unit(unit)} hold "
                  f"for that device only. Machine: {load_text(throughput.get('load'))}"
                  + ("; **busy: more than its cores, so these speeds are unreliable**." if busy(throughput.get("load"))
                     else "."), ""]
    else:
        lines += ["Throughput: not measured (the GMACs column is the cost measure).", ""]
    lines += ["## Reading", "", text, ""]
    if len(results.tasks) > 1:  # one task's numbers are all in the summary
        lines += [f"## Per task: final {score_name(results)} (%)", "",
                  _task_table(shown, results.tasks, results.groups, best=False), ""]
        lines += [f"## Per task: best {score_name(results)} (%)", "",
                  _task_table(rows, results.tasks, results.groups, best=True), ""]
    files = [output / REPORT_FILE, output / CSV_FILE]
    try:
        pyplot()
    except TietaError as error:  # no matplotlib: the tables are still worth writing
        log(f"no figures: {error}")
        figures = []
    else:
        figures = _figures(rows, throughput, results, output, majority, headline, groups, adopted, budget, unit)
    files += figures
    if figures:
        lines += ["## Figures", ""] + [f"![{path.stem}]({path.name})" for path in figures] + [""]
    write_csv(output / CSV_FILE, shown, best_rows, results, throughput, adopt=CSV_FILE in adopted)
    write_owned(output / REPORT_FILE, "\n".join(lines), adopt=REPORT_FILE in adopted)
    return {"files": files, "reading": text, "rows": shown, "best_rows": best_rows, "missing": results.missing,
            "left_out": results.left_out, "records": results.records,
            "throughput": throughput, "headline": headline, "groups": groups}


def _score_text(results: SweepResults) -> str:
    """How the summary names the runs' score: top-1 accuracy, or a segmentation run's mIoU (with
    its meaning)."""
    if score_name(results) == "mIoU":
        return "mIoU (%: the mean over classes of each class's intersection over union on the test pixels)"
    return "Top-1 accuracy (%)"


def _title(folder: Path, tasks: Optional[list[str]] = None) -> str:
    """report.md's first line: the task where there is one, else the folder's name (how a report.md
    of tieta's is recognised where it has no record of it)."""
    return f"# Report: {tasks[0]}" if tasks and len(tasks) == 1 else f"# Report: {folder.name}"


def _listed(items: list[str], limit: int = 30) -> list[str]:
    """Markdown list lines of the first ``limit`` items, then how many more, then a blank line."""
    lines = [f"- {item}" for item in items[:limit]]
    return lines + ([f"- ... and {len(items) - limit} more"] if len(items) > limit else []) + [""]


def _first_line(path: Path, limit: int = 1 << 20) -> Optional[str]:
    """The first line of a regular file (None where there is no readable one)."""
    try:
        data = read_regular(path, "file", limit=limit)
    except TietaError:
        return None
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")


def older_report_files(output: Path, name: str, tasks: Optional[list[str]] = None) -> set[str]:
    """The report files in ``output`` that an older tieta wrote, recognised by their content where
    tieta has no record of them (older versions kept none): report.md by its first line (titled by
    the folder ``name``, or by the one task of ``tasks``), report.csv by its header, a figure by
    being shown in such a report.md."""
    recorded = _recorded(output)
    adopted: set[str] = set()
    report = output / REPORT_FILE
    titles = {_title(Path(name)), _title(Path(name), tasks)}
    if REPORT_FILE not in recorded and _first_line(report) in titles:
        adopted.add(REPORT_FILE)
        try:
            text = read_regular(report, "file", limit=16 << 20).decode("utf-8", "replace")
        except TietaError:
            text = ""
        adopted.update(figure for figure in FIGURES + OLDER_FIGURES
                       if f"]({figure})" in text and figure not in recorded)
    line = _first_line(output / CSV_FILE)
    if CSV_FILE not in recorded and line is not None and line.startswith(CSV_START):
        adopted.add(CSV_FILE)
    return adopted


def _recorded(folder: Path) -> set[str]:
    """The names of the files tieta has recorded writing in ``folder``."""
    try:
        values = read_json(folder / MANIFEST, "tieta's record of the files it wrote", limit=1 << 20)
    except TietaError:
        return set()
    return set(values) if isinstance(values, dict) else set()


def _figures(rows: list[RunRow], throughput: Optional[dict[str, Any]], results: SweepResults, output: Path,
             majority: Optional[RunRow], headline: str, groups: list[str], adopted: set[str],
             budget: Optional[Target] = None, unit: str = "image") -> list[Path]:
    """Draw the report's figures into ``output`` (``unit``: what one input is, for the axes' names):
    each is checked to be tieta's to replace before any is drawn (``adopted``: the older tieta's
    files, see :func:`older_report_files`). An accuracy plot
    for each measured cost (throughput, GMACs), a group chart where there are several groups; a
    figure of tieta's that this report does not draw is removed (:func:`_remove_stale`)."""
    tasks = results.tasks
    score = "mIoU" if score_name(results) == "mIoU" else "top-1 accuracy"
    label = f"{score} on {tasks[0]} (%)" if len(tasks) == 1 else f"{headline}, {score_name(results)} (%)"
    baseline = majority.headline.mean if majority and majority.headline else None
    caption = _setup_line(results)
    line = budget_x(budget, throughput) if budget is not None else None
    marks = {line[0]: (line[1], f"budget {budget.flag()}")} if line else {}
    drawings = []
    if throughput:
        speed = {run: values["images_per_s"] for run, values in throughput["rows"].items()}
        x_label = f"{unit}s/s on {throughput['machine']}, batch {timed_batch(throughput)}"
        drawings.append((FIGURES[0], lambda path, adopt: save_tradeoff(rows, speed, path, x_label, label, True,
                                                                       caption, baseline, adopt,
                                                                       marks.get("throughput"))))
    gmacs = {row.run: row.facts["gmacs"] for row in rows if "gmacs" in row.facts}
    if gmacs:
        gmacs_label = f"GMACs per {unit} (MACs/1e9)"
        drawings.append((FIGURES[1], lambda path, adopt: save_tradeoff(rows, gmacs, path, gmacs_label,
                                                                       label, False, caption, baseline, adopt,
                                                                       marks.get("gmacs"))))
    if len(groups) > 1:
        drawings.append((FIGURES[2], lambda path, adopt: save_group_bars(rows, groups, path, caption, adopt)))
    for name, _ in drawings:
        check_owned(output / name, adopt=name in adopted)
    written = []
    for name, draw in drawings:
        draw(output / name, name in adopted)
        written.append(output / name)
    _remove_stale(output, {name for name, _ in drawings}, adopted)
    return written


def _remove_stale(output: Path, drawn: set[str], adopted: set[str]) -> None:
    """Remove the report figures in ``output`` that this report did not draw (a group chart of a
    report that had groups, an older tieta's accuracy_vs_gflops.png) where tieta wrote them and
    nobody has changed them since: report.md no longer shows them."""
    for name in FIGURES + OLDER_FIGURES:
        path = output / name
        if name not in drawn and (name in adopted or written_by_tieta(path)):
            try:
                os.unlink(path)
            except OSError:
                pass
