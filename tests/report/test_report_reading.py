"""What a report says, on fixed measurements (no training, no timing): one definition of the fastest,
"not resolved" where the per-round speedups overlap, the Pareto front of the plotted axes drawn on
every accuracy plot, no column twice, a one-task report that says "accuracy" and names its task,
one FLOPs vocabulary, and a busy machine said."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from tieta.files import write_owned
from tieta.measure import load as load_module
from tieta.report import plots, sweep_bench
from tieta.report.aggregate import RunRow, Spread, pareto_front, run_rows, tradeoff_points
from tieta.report.collect import collect
from tieta.report.plots import save_group_bars, save_tradeoff
from tieta.report.speed import MIN_ROUNDS, fastest_text, rank
from tieta.report.sweep_report import reading, write_report
from tieta.report.tables import DEMO_COLUMNS, EVAL_COLUMNS, FLOPS_COLUMNS, PYRA_UNIT, SUMMARY_COLUMNS, bench_columns
from tieta.sweep.plan import plan_from_dict
from tieta.sweep.runner import write_plan

# the demo's runs: (method, final accuracy, GMACs, img/s, per-round speedups); as the issue saw them, ToMe
# has the higher img/s and PYRA the higher median speedup, and their rounds overlap
DEMO = {
    "lora": ("lora", 52.5, 1.2, 100.0, [1.0] * 7),
    "tome-lora": ("tome+lora", 50.0, 0.85, 162.7, [1.50, 1.60, 1.62, 1.70, 1.75, 1.80, 1.90]),
    "pyra-lora": ("pyra+lora", 51.0, 0.86, 161.6, [1.60, 1.65, 1.70, 1.74, 1.75, 1.80, 1.85]),
    "dyt": ("dyt", 49.0, 0.9, 120.0, [1.10, 1.15, 1.20, 1.20, 1.22, 1.25, 1.30]),
}
IDLE = {"cores": 2.0, "before": 0.3, "own": 0.0, "after": 1.1}
BUSY = {"cores": 2.0, "before": 5.6, "own": 1.5, "after": 5.0}


def _quiet(text: str) -> None:
    pass


def _sweep(folder: Path, tasks: dict[str, str | None], runs: dict = DEMO, seeds=(0,)) -> Path:
    """A sweep folder with hand-written summaries, as tieta sweep leaves it."""
    plan = plan_from_dict({"tasks": [{"name": t, "group": g, "path": str(folder / "data" / t)} if g else
                                     {"name": t, "path": str(folder / "data" / t)} for t, g in tasks.items()],
                           "runs": {run: {"method": spec[0]} for run, spec in runs.items()}, "seeds": list(seeds)},
                          "test")
    write_plan(plan, folder)
    for run, (method, acc, gmacs, _, _) in runs.items():
        for seed in seeds:
            for task in tasks:
                cell = folder / task / run / f"seed{seed}"
                cell.mkdir(parents=True)
                (cell / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": method}))
                (cell / "summary.json").write_text(json.dumps(
                    {"acc": acc + seed, "best_acc": acc + seed + 1, "method": method, "gmacs": gmacs,
                     "pyra_gflops": gmacs * 1e9 / 2**30, "trainable_percent": 0.3}))
    return folder


def _timed(runs: dict = DEMO, rounds: int = 7, load: dict = IDLE) -> dict:
    return {"rounds": rounds, "load": load, "task": "elpv", "machine": "a CPU", "device": "cpu", "batch_size": 32,
            "rows": {run: {"images_per_s": spec[3], "speedup": statistics.median(spec[4]),
                           "round_speedups": spec[4], "speedup_spread": [min(spec[4]), max(spec[4])]}
                     for run, spec in runs.items()}}


@pytest.fixture
def fake_timing(monkeypatch):
    """The side-by-side timing replaced by DEMO's numbers, and the load by a fixed one (``set``)."""
    state = {"load": IDLE, "reads": 0}

    def measure(chosen, device, batch_size, rounds, log):
        return {"rows": _timed()["rows"]}

    def read_load():  # before the timing, then after it
        value, state["reads"] = state["load"], state["reads"] + 1
        return {"load": value["before" if state["reads"] % 2 else "after"], "own": value["own"],
                "cores": value["cores"]}

    monkeypatch.setattr(sweep_bench, "_measure", measure)
    monkeypatch.setattr(load_module, "read_load", read_load)
    return state


def _rows(folder: Path) -> list[RunRow]:
    return run_rows(collect(folder))


# --- the fastest: one definition, resolved or not --------------------------------------------

def test_the_fastest_is_the_highest_throughput_and_overlapping_rounds_are_not_resolved(tmp_path):
    text = reading(_rows(_sweep(tmp_path, {"elpv": "specialized"})), _timed(), "accuracy")
    # ToMe has the highest img/s, PYRA the highest median speedup: neither is named the fastest
    assert ("Fastest: not resolved between tome-lora (tome+lora) and pyra-lora (pyra+lora): their per-round "
            "speedups overlap (tome-lora 162.7 img/s, per round 1.50-1.90x; pyra-lora 161.6 img/s, per round "
            "1.60-1.85x).") in text
    assert "Fastest: pyra" not in text and "Fastest: tome" not in text


def test_a_fastest_run_clear_of_the_others_is_named_with_its_spread():
    rows = {"a": {"images_per_s": 100.0, "speedup": 1.0, "round_speedups": [1.0] * 5},
            "b": {"images_per_s": 180.0, "speedup": 1.8, "round_speedups": [1.7, 1.8, 1.9, 1.8, 1.75]},
            "c": {"images_per_s": 150.0, "speedup": 1.5, "round_speedups": [1.4, 1.5, 1.6, 1.5, 1.5]}}
    assert fastest_text(rows, 5, "a") == ("b", "b (180.0 img/s, 1.80x a; per-round speedups 1.70-1.90x, clear of "
                                               "every other's)")
    rows["c"]["round_speedups"][2] = 1.72  # one round of c reaches into b's range
    assert rank(rows, 5).unresolved == ["c"] and fastest_text(rows, 5, "a")[0] is None


def test_medians_that_disagree_are_not_resolved_even_without_overlap():
    """The img/s column and the median speedup rank two runs differently: not resolved."""
    rows = {"a": {"images_per_s": 100.0, "speedup": 1.0, "speedup_spread": [1.0, 1.0]},
            "b": {"images_per_s": 150.0, "speedup": 1.4, "speedup_spread": [1.35, 1.45]},
            "c": {"images_per_s": 149.0, "speedup": 1.6, "speedup_spread": [1.55, 1.65]}}
    assert rank(rows, 7).fastest == "b" and rank(rows, 7).unresolved == ["c"]


def test_too_few_rounds_rank_no_speeds():
    found = fastest_text(_timed()["rows"], MIN_ROUNDS - 1, "lora")
    assert found[0] is None and found[1].startswith(f"not resolved: only {MIN_ROUNDS - 1} rounds timed")
    assert fastest_text({"a": {"images_per_s": 1.0}}, 7, "a") is None  # one timed run: nothing to rank


def test_the_reading_names_runs_as_the_table_does(tmp_path):
    text = reading(_rows(_sweep(tmp_path, {"elpv": "specialized"})), _timed(), "accuracy")
    assert text.startswith("Most accurate: lora (accuracy 52.50%).")
    assert text.count("pyra-lora (pyra+lora)") == 1  # the run name, with its method the first time
    assert "pyra+lora" not in text.replace("pyra-lora (pyra+lora)", "")


# --- the Pareto front: the plotted axes --------------------------------------------------------

def test_the_reading_front_is_that_of_the_plotted_throughput_not_of_the_speedups(tmp_path):
    runs = {"a": ("a", 70.0, 1.0, 100.0, [1.0] * 7), "b": ("b", 69.0, 0.5, 150.0, [1.3] * 7),
            "c": ("c", 68.0, 0.6, 140.0, [1.6] * 7)}  # c: higher median speedup, lower img/s than b
    rows = _rows(_sweep(tmp_path, {"t1": None, "t2": None}, runs))
    text = reading(rows, _timed(runs), "mean over tasks")
    assert "Pareto front of accuracy vs throughput (no other run is both more accurate and faster): a, b." in text
    assert "Pareto front of accuracy vs GMACs (no other run is both more accurate and cheaper): b, a." in text
    speed = {run: values["images_per_s"] for run, values in _timed(runs)["rows"].items()}
    assert pareto_front(tradeoff_points(rows, speed)) == ["a", "b"]


class _Captured:
    """The figure a plot function would have saved, laid out as it would be rendered."""

    def __init__(self, monkeypatch):
        self.figures = []
        monkeypatch.setattr(plots, "save", lambda figure, path, caption="", **kwargs: self._keep(figure, caption))

    def _keep(self, figure, caption):
        figure.suptitle(caption, fontsize=8)
        figure.tight_layout()
        figure.canvas.draw()
        self.figures.append(figure)


def _inside(inner, outer, slack: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.x1 <= outer.x1 + slack and inner.y0 >= outer.y0 - slack
            and inner.y1 <= outer.y1 + slack)


@pytest.mark.parametrize("higher_x_better", [True, False])
def test_every_accuracy_plot_draws_its_front_and_keeps_its_labels_inside(tmp_path, monkeypatch, higher_x_better):
    captured = _Captured(monkeypatch)
    rows = _rows(_sweep(tmp_path, {"elpv": "specialized"}))
    x_values = {run: spec[3] if higher_x_better else spec[2] for run, spec in DEMO.items()}
    save_tradeoff(rows, x_values, tmp_path / "plot.png", "x", "top-1 accuracy on elpv (%)", higher_x_better)
    figure = captured.figures[0]
    axis = figure.axes[0]
    assert "Pareto front" in [text.get_text() for text in axis.get_legend().get_texts()]
    renderer = figure.canvas.get_renderer()
    names = [text for text in axis.texts]
    assert sorted(text.get_text() for text in names) == sorted(DEMO)
    for text in names:  # the run names sit inside the axes, the outermost too
        assert _inside(text.get_window_extent(renderer), axis.get_window_extent(renderer)), text.get_text()
    (left, right), (bottom, top) = axis.get_xlim(), axis.get_ylim()
    shown = [label for label in axis.get_xticklabels() if left <= label.get_position()[0] <= right] + \
        [label for label in axis.get_yticklabels() if bottom <= label.get_position()[1] <= top]
    for label in [axis.xaxis.label, axis.yaxis.label] + shown:  # axis labels and the ticks drawn
        assert _inside(label.get_window_extent(renderer), figure.bbox), label.get_text()


def test_a_front_of_one_run_is_still_drawn(tmp_path, monkeypatch):
    captured = _Captured(monkeypatch)
    runs = {"a": ("a", 70.0, 0.5, 200.0, [1.0] * 7), "b": ("b", 60.0, 1.0, 100.0, [0.5] * 7)}
    rows = _rows(_sweep(tmp_path, {"t": None}, runs))
    save_tradeoff(rows, {"a": 200.0, "b": 100.0}, tmp_path / "plot.png", "x", "y", True)
    assert "Pareto front" in [text.get_text() for text in captured.figures[0].axes[0].get_legend().get_texts()]


def test_the_group_chart_shows_differences_of_a_few_points(tmp_path, monkeypatch):
    captured = _Captured(monkeypatch)
    rows = _rows(_sweep(tmp_path, {"cifar": "natural", "eurosat": "specialized"}))
    save_group_bars(rows, ["natural", "specialized"], tmp_path / "bars.png")
    axis = captured.figures[0].axes[0]
    bottom, top = axis.get_ylim()
    assert 40 <= bottom < 49 and top > 52.5  # not from 0: 49-52.5% bars differ visibly
    assert axis.get_ylabel() == f"top-1 accuracy (%), axis from {bottom:.0f}"


# --- the tables: no column twice, a one-task report -------------------------------------------

def _header(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("| run | method |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.parametrize("tasks, headline, extra", [
    ({"elpv": "specialized"}, "accuracy", []),
    ({"t1": None, "t2": None}, "mean over tasks", []),
    ({"t1": "natural", "t2": "natural"}, "mean over tasks", []),  # one group: its mean is the task mean
    ({"cifar": "natural", "eurosat": "specialized"}, "mean of group means",
     ["natural (final)", "specialized (final)", "mean over tasks (final)"]),
])
def test_no_column_is_shown_twice_and_each_headline_is_named_for_what_it_is(tmp_path, tasks, headline, extra):
    written = write_report(_sweep(tmp_path / "sweep", tasks), bench=False, log=_quiet)
    header = _header((tmp_path / "sweep" / "report.md").read_text())
    assert len(header) == len(set(header))
    assert header == ["run", "method", f"{headline} (final)", f"{headline} (best)"] + extra + \
        ["trainable %", "GMACs", PYRA_UNIT]
    assert written["headline"] == headline


def test_a_one_task_report_says_accuracy_and_names_its_task(tmp_path, fake_timing):
    folder = _sweep(tmp_path / "20250101-120000", {"elpv": "specialized"})
    written = write_report(folder, log=_quiet)
    text = (folder / "report.md").read_text()
    assert text.startswith("# Report: elpv\n")  # the task, not the folder's timestamp
    assert "## Summary: elpv" in text and "task elpv, 4 runs, seed 0." in text
    assert "mean of group means" not in text and "mean over tasks" not in text and "specialized" not in text
    assert "## Per task" not in text  # the summary holds its numbers already
    assert "| pyra-lora | pyra+lora | 51.00 | 52.00 |" in text
    assert written["reading"].startswith("Most accurate: lora (accuracy 52.50%).")
    assert {path.name for path in written["files"]} == {"report.md", "report.csv", "accuracy_vs_throughput.png",
                                                         "accuracy_vs_gmacs.png"}  # no chart of one group
    # the title of a one-task report still marks it as tieta's: a second report replaces it
    (folder / ".tieta-written.json").unlink()
    write_report(folder, log=_quiet)


def test_a_figure_no_longer_drawn_is_removed_where_tieta_wrote_it(tmp_path):
    folder = _sweep(tmp_path / "sweep", {"elpv": "specialized"})
    write_owned(folder / "accuracy_vs_gflops.png", b"an older tieta's figure")
    write_owned(folder / "group_means.png", b"a chart from when there were groups")
    (folder / "accuracy_vs_throughput.png").write_bytes(b"the user's own")
    write_report(folder, bench=False, log=_quiet)
    assert not (folder / "accuracy_vs_gflops.png").exists() and not (folder / "group_means.png").exists()
    assert (folder / "accuracy_vs_throughput.png").read_bytes() == b"the user's own"


# --- one FLOPs vocabulary -----------------------------------------------------------------------

def test_gflops_names_only_the_pyra_papers_unit(tmp_path, fake_timing):
    for columns in (SUMMARY_COLUMNS, EVAL_COLUMNS, DEMO_COLUMNS, FLOPS_COLUMNS, bench_columns([{}])):
        for key, header, _ in columns:
            assert "GFLOPs" not in header or header == PYRA_UNIT == "MACs/2^30 (PYRA paper's GFLOPs)"
            assert key != "gmacs" or header.startswith("GMACs")
    folder = _sweep(tmp_path / "sweep", {"cifar": "natural", "eurosat": "specialized"})
    written = write_report(folder, log=_quiet)
    text = (folder / "report.md").read_text() + (folder / "report.csv").read_text() + written["reading"]
    assert text.count("GFLOPs") == text.count(PYRA_UNIT) == 1
    assert "GMACs" in text


# --- speeds carry their spread and the machine's load ------------------------------------------

def test_the_report_shows_the_spread_and_the_load_it_timed_under(tmp_path, fake_timing):
    folder = _sweep(tmp_path / "sweep", {"elpv": "specialized"})
    written = write_report(folder, log=_quiet)
    text = (folder / "report.md").read_text()
    assert "| tome-lora | tome+lora | 50.00 | 51.00 | 0.300 | 0.850 | 0.792 | 162.7 | 1.70 | 1.50-1.90 |" in text
    assert "Machine: 1-minute load 0.3 on 2 cores before timing, 1.1 after." in text
    assert "busy" not in text and "busy" not in written["reading"]
    kept = json.loads((folder / "throughput.json").read_text())
    assert kept["load"] == IDLE and kept["rows"]["dyt"]["round_speedups"] == DEMO["dyt"][4]
    with open(folder / "report.csv") as handle:
        line = next(line for line in handle if line.startswith("tome-lora,"))
    assert ",1.5,1.9," in line  # speedup_round_min, speedup_round_max


def test_a_busy_machine_is_said_in_the_report_and_its_reading(tmp_path, fake_timing):
    fake_timing["load"] = BUSY
    folder = _sweep(tmp_path / "sweep", {"elpv": "specialized"})
    written = write_report(folder, log=_quiet)
    assert ("The machine was busy: 1-minute load 5.6 on 2 cores before timing (1.5 of it this process's), 5.0 "
            "after, more than its cores, so these speeds are unreliable") in written["reading"]
    assert "**busy: more than its cores, so these speeds are unreliable**" in (folder / "report.md").read_text()


def test_an_older_kept_measurement_without_rounds_or_load_is_still_read(tmp_path):
    kept = _timed()
    for row in kept["rows"].values():
        del row["round_speedups"]
    del kept["load"]
    kept.update(folders={run: "/x" for run in DEMO})
    assert sweep_bench.cache_problem(kept) is None
    assert sweep_bench.cache_problem({**kept, "load": {"before": "high"}}) == "an unreadable machine load"
    rows = [RunRow(run, spec[0], headline=Spread(spec[1], 0.0, 1)) for run, spec in DEMO.items()]
    assert "Fastest: not resolved between tome-lora (tome+lora) and pyra-lora (pyra+lora)" in \
        reading(rows, kept, "accuracy")
