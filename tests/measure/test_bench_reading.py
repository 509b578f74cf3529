"""`tieta bench` on fixed measurements (the timing replaced): progress on stderr while it times, a
reading at the end (the fastest or "not resolved", PYRA against ToMe, what efficiency means, a busy
machine), help for every flag, and enough rounds by default to rank."""

import json

import pytest

from tieta.cli import RELIABLE_ROUNDS, build_parser, main
from tieta.measure import bench_suite
from tieta.measure import load as load_module
from tieta.report.speed import MIN_ROUNDS, bench_reading


def _row(name, images_per_s, rounds, **extra):
    ordered = sorted(rounds)
    return {"name": name, "gmacs": 4.0 * extra.pop("flops_ratio", 1.0), "images_per_s": images_per_s,
            "speedup": ordered[len(ordered) // 2], "round_speedups": rounds,
            "speedup_spread": (ordered[0], ordered[-1]), **extra}


ROWS = [
    _row("timm", 100.0, [1.0] * 5, flops_ratio=1.0, efficiency=1.0),
    _row("tome r=0", 97.0, [0.96, 0.97, 0.97, 0.98, 0.97], flops_ratio=1.0, efficiency=0.97),
    _row("tome low", 170.0, [1.65, 1.70, 1.72, 1.68, 1.75], flops_ratio=0.5, efficiency=0.85,
         ceiling_speedup=1.8, ceiling_efficiency=0.9),
    _row("pyra low", 166.0, [1.60, 1.66, 1.70, 1.64, 1.67], flops_ratio=0.5, efficiency=0.83, vs_tome=0.98,
         ceiling_speedup=1.8, ceiling_efficiency=0.9),
]


def test_the_reading_says_what_is_fastest_and_what_is_not_resolved():
    lines = bench_reading(ROWS, 5, {"cores": 2, "before": 0.5, "own": 0.0, "after": 1.0})
    assert lines[0].startswith("Fastest: not resolved between tome low and pyra low: their per-round speedups "
                               "overlap (tome low 170.0 img/s, per round 1.65-1.75x; pyra low 166.0 img/s")
    assert lines[1] == ("At low, PYRA runs at 0.98x ToMe's speed (median of per-round ratios): not resolved "
                        "(per-round speedups 1.60-1.70x and 1.65-1.75x overlap).")
    assert lines[2].startswith("Efficiency = speedup / (the first row's GMACs / the row's GMACs)")
    assert lines[3].startswith("Ceiling: ") and len(lines) == 4  # an idle machine is not mentioned
    clear = [dict(row) for row in ROWS]
    clear[3].update(round_speedups=[1.40, 1.42, 1.45, 1.41, 1.44], speedup=1.42, images_per_s=142.0)
    lines = bench_reading(clear, 5)
    assert lines[0] == "Fastest: tome low (170.0 img/s, 1.70x timm; per-round speedups 1.65-1.75x, clear of every " \
                       "other's)."
    assert "resolved (per-round speedups 1.40-1.45x and 1.65-1.75x)" in lines[1]
    assert bench_reading(ROWS, 3)[0].startswith("Fastest: not resolved: only 3 rounds timed")
    assert not any(line.startswith("Efficiency") for line in bench_reading(ROWS, 5, efficiency=False))


@pytest.fixture
def fixed_suite(monkeypatch):
    """run_suite answering ROWS, after telling its log what it times round by round."""
    def run_suite(model, img_size, batch_size, dtype, schedules, rounds, train, device, log=None, **video):
        progress = bench_suite.stage_progress(log, 1, 2, "timing evaluation of timm, tome low side by side")
        for done in range(rounds + 1):
            progress(done, rounds, 2.0 * (rounds - done))
        return [dict(row) for row in ROWS]

    monkeypatch.setattr(bench_suite, "run_suite", run_suite)


def test_bench_shows_progress_and_ends_with_a_reading(fixed_suite, tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert main(["bench", "--model", "test_vit", "--rounds", "5", "--schedules", "low", "--output", str(output)]) == 0
    captured = capsys.readouterr()
    step = "tieta bench: [1/2] timing evaluation of timm, tome low side by side"
    assert captured.err.splitlines()[:2] == [f"{step}: round 1 of 5, about 10 s left in this step",
                                             f"{step}: round 2 of 5, about 8 s left in this step"]
    out = captured.out
    assert "per round" in out and "1.65-1.75x" in out  # the spread beside each speedup
    assert "\nFastest: not resolved between tome low and pyra low" in out
    assert "At low, PYRA runs at 0.98x ToMe's speed" in out and "\nEfficiency = speedup / " in out
    kept = json.loads(output.read_text())
    assert set(kept["load"]) in ({"cores", "before", "own", "after"}, set())


def test_bench_says_when_the_machine_was_busy(fixed_suite, monkeypatch, capsys):
    monkeypatch.setattr(load_module, "read_load", lambda: {"load": 7.0, "own": 0.5, "cores": 2.0})
    assert main(["bench", "--model", "test_vit", "--rounds", "5", "--schedules", "low"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("The machine was busy: 1-minute load 7.0 on 2 cores before timing")
    assert "these speeds are unreliable" in out


def test_bench_flags_have_help_and_the_defaults_time_enough_rounds_to_rank():
    parser = build_parser()
    commands = next(action for action in parser._actions if hasattr(action, "choices") and action.choices)
    bench = commands.choices["bench"]
    for action in bench._actions:
        assert action.help, action.option_strings
    assert RELIABLE_ROUNDS == MIN_ROUNDS
    assert parser.parse_args(["bench"]).rounds >= MIN_ROUNDS
    assert parser.parse_args(["report", "folder"]).rounds >= MIN_ROUNDS


def test_run_suite_tells_its_log_each_step_and_round(monkeypatch):
    def benchmark(models, batch_size, dtype, device, rounds, train, images=None, progress=None):
        for done in range(rounds + 1):
            progress(done, rounds, float(rounds - done))
        return [{"name": name, "flops_ratio": 1.0, "round_rates": [1.0] * rounds} for name in models]

    def shape_ceiling(model, schedule, batch_size, device, dtype, rounds, progress=None):
        progress(0, rounds, 3.0)
        return 1.5

    monkeypatch.setattr(bench_suite, "eval_models", lambda *args: {"timm": None, "tome low": None, "pyra low": None})
    monkeypatch.setattr(bench_suite, "benchmark", benchmark)
    monkeypatch.setattr(bench_suite, "shape_ceiling", shape_ceiling)
    monkeypatch.setattr(bench_suite, "resolve_schedule", lambda model, schedule: [1])
    lines = []
    rows = bench_suite.run_suite("test_vit", None, 2, "fp32", ["low"], 2, False, log=lines.append)
    assert lines == [
        "building the test_vit models to time (random weights; schedules low) and counting their FLOPs",
        "[1/2] timing evaluation of timm, tome low, pyra low side by side: round 1 of 2, about 2 s left in this step",
        "[1/2] timing evaluation of timm, tome low, pyra low side by side: round 2 of 2, about 1 s left in this step",
        "[1/2] timing evaluation of timm, tome low, pyra low side by side: 2 rounds done",
        "[2/2] the ceiling at low (timm's layers at its token counts): round 1 of 2, about 3 s left in this step"]
    assert rows[2]["ceiling_speedup"] == 1.5
