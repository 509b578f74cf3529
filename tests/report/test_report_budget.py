"""tieta report --budget on a hand-made sweep: the most accurate run within the budget, on the
device the report timed, the nearest where none meets it, and the budget's line on the plots."""

import json

import pytest
import yaml

from conftest import refused
from tieta.cli import main
from tieta.measure.target import parse_target
from tieta.report import sweep_report
from tieta.sweep.plan import plan_from_dict
from tieta.sweep.runner import write_plan

# run -> (accuracy, GMACs, img/s at batch 32, per-round speedups): as a plan's sweep, LoRA alone first
RUNS = {
    "lora": (80.0, 4.0, 100.0, [1.0, 1.0, 1.0]),
    "evit-keep_rate0.5": (78.0, 2.2, 190.0, [1.85, 1.9, 1.95]),
    "tome-schedule0.45": (77.0, 1.9, 230.0, [2.25, 2.3, 2.4]),
    "dyt-rho0.3": (79.0, 2.6, 160.0, [1.55, 1.6, 1.7]),
    "atc-keep_rate0.4": (75.0, 1.7, 205.0, [1.95, 2.05, 2.1]),
}


def _sweep(folder, kind="image"):
    plan = plan_from_dict({"tasks": [{"name": "task", "path": str(folder / "data")}],
                           "runs": {run: {"method": run.split("-")[0]} for run in RUNS}}, "test")
    write_plan(plan, folder)
    for run, (acc, gmacs, _, _) in RUNS.items():
        run_folder = folder / "task" / run / "seed0"
        run_folder.mkdir(parents=True)
        (run_folder / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "method": run.split("-")[0],
                                                                "data": {"kind": kind}}))
        (run_folder / "summary.json").write_text(json.dumps({"acc": acc, "best_acc": acc, "gmacs": gmacs,
                                                             "method": run.split("-")[0]}))
    return folder


def _timed(*args, **kwargs):
    return {"device": "cpu", "machine": "x86_64 CPU, 2 threads", "batch_size": 32, "rounds": 3, "task": "task",
            "rows": {run: {"images_per_s": ips, "speedup": ips / 100.0, "round_speedups": rounds,
                           "speedup_spread": [min(rounds), max(rounds)]}
                     for run, (_, _, ips, rounds) in RUNS.items()}}


@pytest.fixture
def timed_report(tmp_path, monkeypatch):
    """write_report with the hand-made timing above, and the budget each plot was drawn with
    (``timed_batch``: the task had fewer evaluation items than the asked batch of 32; ``kind``:
    the runs' data kind)."""
    drawn = {}
    monkeypatch.setattr(sweep_report, "save_tradeoff", lambda rows, x_values, path, *args, **kwargs:
                        drawn.setdefault(path.name, args[-1] if len(args) == 7 else kwargs.get("budget")))

    def report(budget, timed_batch=None, kind="image"):
        drawn.clear()
        timing = _timed() if timed_batch is None else {**_timed(), "timed_batch": timed_batch}
        monkeypatch.setattr(sweep_report, "sweep_throughput", lambda *args, **kwargs: timing)
        folder = tmp_path / f"sweep-{kind}"
        if not folder.exists():
            _sweep(folder, kind)
        written = sweep_report.write_report(folder, log=lambda text: None, budget=parse_target(budget))
        return written["reading"].split("\n\n")[-1], dict(drawn)

    return report


def test_the_most_accurate_run_within_a_speedup_budget(timed_report):
    text, drawn = timed_report("speedup=1.9")
    assert text.startswith("Budget a speedup of 1.9x on x86_64 CPU, 2 threads (cpu, batch 32, speedup to lora): "
                           "3 of 5 runs meet it; the most accurate of them is evit-keep_rate0.5 (evit), at accuracy 78.00% and 1.90x.")
    assert "More accurate but over the budget: lora, 2.00 points higher at 1.00x." in text
    assert "per-round speedups (1.85-1.95x) reach below the budget" in text
    assert drawn["accuracy_vs_throughput.png"] == (pytest.approx(190.0), "budget speedup=1.9")
    assert drawn["accuracy_vs_gmacs.png"] is None


def test_latency_throughput_and_gmacs_budgets(timed_report):
    text, drawn = timed_report("latency=150ms")  # 32 images in at most 150 ms: at least 213.3 img/s
    assert "1 of 5 runs meet it; the most accurate of them is tome-schedule0.45" in text
    assert drawn["accuracy_vs_throughput.png"][0] == pytest.approx(32 * 1000 / 150)
    text, _ = timed_report("throughput=150")
    assert "4 of 5 runs meet it; the most accurate of them is dyt-rho0.3 (dyt), at accuracy 79.00% and 160.0 img/s." in text
    text, drawn = timed_report("gmacs=2.0")
    assert text.startswith("Budget 2 GMACs: 2 of 5 runs meet it; the most accurate of them is tome-schedule0.45")
    assert drawn["accuracy_vs_gmacs.png"] == (2.0, "budget gmacs=2")


def test_a_latency_is_a_pass_of_the_batch_that_was_timed(timed_report):
    # a task of 8 evaluation images is timed at batch 8, whatever --batch-size asked: 40 ms is 200 img/s
    text, drawn = timed_report("latency=40ms", timed_batch=8)
    assert "(cpu, batch 8)" in text and "2 of 5 runs meet it" in text
    assert drawn["accuracy_vs_throughput.png"][0] == pytest.approx(8 * 1000 / 40)


def test_a_video_sweep_s_budget_is_in_clips(timed_report):
    text, _ = timed_report("throughput=150", kind="video")
    assert text.startswith("Budget a throughput of 150 clips/s") and "at accuracy 79.00% and 160.0 clips/s." in text
    text, _ = timed_report("gmacs=2.0", kind="video")
    assert text.startswith("Budget 2 GMACs per clip:")


def test_a_budget_no_run_meets_names_the_nearest(timed_report):
    text, _ = timed_report("speedup=3")
    assert text.endswith("no run meets it; the nearest is tome-schedule0.45 (tome), at 2.30x.")


def test_a_speed_budget_without_a_timing_says_why(tmp_path, capsys):
    folder = _sweep(tmp_path / "sweep")
    assert main(["report", str(folder), "--no-bench", "--budget", "speedup=2"]) == 0
    out = capsys.readouterr().out
    assert "Budget speedup=2: not read, since throughput was not measured" in out
    assert main(["report", str(folder), "--no-bench", "--budget", "gmacs=2.2"]) == 0
    assert "the most accurate of them is evit-keep_rate0.5" in capsys.readouterr().out
    assert "Budget 2.2 GMACs" in (folder / "report.md").read_text()
    assert "a target is" in refused(capsys, "report", str(folder), "--budget", "2x")
