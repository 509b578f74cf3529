"""tieta report: group means on a hand-computed example, partial sweeps, CSV, figures from a real sweep."""

import csv
import json

import pytest
import yaml

from conftest import fail_in_epoch
from tieta import TietaError
from tieta.cli import main
from tieta.report.aggregate import Spread, pareto_front, run_rows
from tieta.report.collect import collect
from tieta.report.sweep_report import reading, write_report
from tieta.sweep.plan import plan_from_dict
from tieta.sweep.runner import write_plan

# task -> group, and two runs' final accuracies per seed
GROUPS = {"cifar": "natural", "dtd": "natural", "eurosat": "specialized", "kitti": "structured"}
ACCS = {
    "lora": {0: {"cifar": 70.0, "dtd": 60.0, "eurosat": 90.0, "kitti": 50.0},
             1: {"cifar": 72.0, "dtd": 62.0, "eurosat": 88.0, "kitti": 54.0}},
    "pyra": {0: {"cifar": 68.0, "dtd": 58.0, "eurosat": 91.0, "kitti": 40.0}},
}


def _fake_sweep(folder, accs=ACCS, seeds=(0, 1)):
    """A sweep folder with hand-written summaries (no training), as tieta sweep leaves it."""
    plan = plan_from_dict({"tasks": [{"name": t, "group": g, "path": str(folder / "data" / t)} for t, g in GROUPS.items()],
                           "runs": {run: {"method": run} for run in accs}, "seeds": list(seeds)}, "test")
    write_plan(plan, folder)
    for run, by_seed in accs.items():
        for seed, by_task in by_seed.items():
            for task, acc in by_task.items():
                run_folder = folder / task / run / f"seed{seed}"
                run_folder.mkdir(parents=True)
                (run_folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": run}))
                summary = {"acc": acc, "best_acc": acc + 1, "method": run, "gmacs": 1.0 if run == "lora" else 0.5,
                           "trainable_percent": 0.3, "pyra_gflops": 0.9}
                (run_folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_group_means_and_their_mean_by_hand(tmp_path):
    rows = {row.run: row for row in run_rows(collect(_fake_sweep(tmp_path)))}
    lora = rows["lora"]
    # seed 0: natural (70+60)/2 = 65, specialized 90, structured 50 -> mean of groups 68.333; tasks 67.5
    # seed 1: natural (72+62)/2 = 67, specialized 88, structured 54 -> mean of groups 69.667; tasks 69.0
    assert lora.groups["natural"].mean == pytest.approx(66.0)
    assert lora.groups["specialized"].mean == pytest.approx(89.0)
    assert lora.headline.mean == pytest.approx((68 + 1 / 3 + 69 + 2 / 3) / 2)
    assert lora.headline.std == pytest.approx(0.9428090, abs=1e-6)  # sample std of 68.333 and 69.667
    assert lora.task_mean.mean == pytest.approx(68.25)
    assert lora.final["cifar"].mean == 71.0 and lora.final["cifar"].n == 2
    assert lora.best["cifar"].mean == 72.0
    assert lora.complete and lora.facts["gmacs"] == 1.0
    # pyra has seed 0 only: its means cover that seed, and the row says it is incomplete
    pyra = rows["pyra"]
    assert not pyra.complete and pyra.headline.n == 1
    assert pyra.headline.mean == pytest.approx((63 + 91 + 40) / 3)


def test_a_partial_sweep_says_what_is_missing(tmp_path):
    folder = _fake_sweep(tmp_path)
    (folder / "kitti" / "pyra" / "seed1").mkdir(parents=True)
    (folder / "kitti" / "pyra" / "seed1" / "config.yaml").write_text("seed: 1\n")
    written = write_report(folder, bench=False, log=lambda text: None)
    assert "kitti · pyra · seed 1: interrupted" in written["missing"]  # started, and no process runs it
    assert "cifar · pyra · seed 1: not run" in written["missing"]
    text = (folder / "report.md").read_text()
    assert "**Partial:** 4 of 16 runs are missing" in text
    assert "mean of group means (final)" in text and "mean over tasks (final)" in text


def test_the_csv_has_one_line_per_run_with_every_number(tmp_path):
    folder = _fake_sweep(tmp_path)
    write_report(folder, bench=False, log=lambda text: None)
    with open(folder / "report.csv") as handle:
        lines = list(csv.DictReader(handle))
    assert [line["run"] for line in lines] == ["lora", "pyra"]  # no data folder: no majority row
    assert float(lines[0]["headline_final_mean"]) == pytest.approx(69.0, abs=1e-4)
    assert float(lines[0]["natural_final_mean"]) == 66.0 and float(lines[0]["cifar_best_mean"]) == 72.0
    assert lines[0]["headline"] == "mean of group means" and lines[0]["seeds"] == "2"


def test_the_reading_names_the_most_accurate_the_fastest_and_the_spread(tmp_path):
    rows = run_rows(collect(_fake_sweep(tmp_path)))
    timed = {"rounds": 7, "rows": {
        "lora": {"images_per_s": 100.0, "speedup": 1.0, "round_speedups": [1.0] * 7},
        "pyra": {"images_per_s": 190.0, "speedup": 1.9, "round_speedups": [1.85, 1.9, 1.95]}}}
    text = reading(rows, timed, "mean of group means")
    assert text.startswith("Most accurate: lora (mean of group means 69.00 ± 0.94%).")
    assert ("Fastest: pyra (190.0 img/s, 1.90x lora; per-round speedups 1.85-1.95x, clear of every other's), "
            "4.33 points below it.") in text
    assert "Pareto front of accuracy vs throughput (no other run is both more accurate and faster): lora, pyra." in text


def test_pareto_front():
    points = {"a": (1.0, 70.0), "b": (2.0, 69.0), "c": (1.5, 60.0), "d": (2.0, 69.0), "e": (3.0, 50.0)}
    assert pareto_front(points) == ["a", "b", "d", "e"]
    assert pareto_front({"x": (10.0, 70.0), "y": (5.0, 70.0)}, higher_x_better=False) == ["y"]
    assert Spread.of([]) is None and Spread.of([1.0]).text() == "1.00"


def test_a_folder_without_finished_runs_is_one_sentence(tmp_path, capsys):
    with pytest.raises(TietaError, match="holds no finished run"):
        collect(tmp_path)
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_small_real_sweep_gives_a_report_and_its_figures(vtab_mini, tmp_path, capsys):
    """Two methods on a real task, trained briefly on a tiny random ViT: the whole path, plots included."""
    common = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--epochs", "1", "--warmup-epochs",
              "0", "--batch-size", "50", "--set", "lora.rank=2", "--set", "data.train_split=val200"]
    folder = tmp_path / "sweep"
    assert main(["sweep", "--data", str(vtab_mini / "dtd10"), "--method", "lora", "pyra+lora",
                 "--seeds", "0", "1", "--output", str(folder)] + common) == 0
    capsys.readouterr()
    assert main(["report", str(folder), "--rounds", "1", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "\nMost accurate: " in out
    for name in ("report.md", "report.csv", "accuracy_vs_throughput.png", "accuracy_vs_gmacs.png"):
        assert (folder / name).stat().st_size > 0, name
    assert (folder / "accuracy_vs_throughput.png").read_bytes()[:4] == b"\x89PNG"
    text = (folder / "report.md").read_text()
    assert "| majority class |" in text and "timed side by side" in text
    assert "| accuracy (final) |" in text and "mean over tasks" not in text  # one task: its accuracy
    kept = json.loads((folder / "throughput.json").read_text())
    assert set(kept["rows"]) == {"lora", "pyra+lora"} and kept["task"] == "dtd10"
    # a second report reuses the measurement instead of timing again
    assert main(["report", str(folder), "--rounds", "1", "--batch-size", "4", "--output", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "report.md").is_file()


def test_a_tampered_summary_counts_as_unfinished(tmp_path):
    folder = _fake_sweep(tmp_path)
    (folder / "kitti" / "lora" / "seed1" / "summary.json").write_text('{"acc": "high"}')
    results = collect(folder)
    assert 'kitti · lora · seed 1: summary.json gives acc "high", not a percentage from 0 to 100' in results.missing
    assert run_rows(results)[0].headline.n == 1  # seed 1 of lora no longer has every task


def test_a_folder_of_runs_lists_its_unfinished_ones_with_their_state(vtab_task, tmp_path, monkeypatch):
    from tieta.train import fit as fit_module
    from tieta.train.config import load_config

    config = load_config(overrides={"model": "test_vit", "weights": "random", "img_size": 32, "optim.epochs": 2,
                                    "optim.warmup_epochs": 1, "optim.batch_size": 4, "data.path": str(vtab_task)})
    fit_module.fit(config, tmp_path / "runs" / "done")
    fail_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit_module.fit(config, tmp_path / "runs" / "killed")
    results = collect(tmp_path / "runs")
    assert len(results.records) == 1
    assert results.missing == [f"{tmp_path / 'runs' / 'killed'}: interrupted after epoch 1 of 2: stopped by Ctrl-C "
                               "or SIGTERM"]
