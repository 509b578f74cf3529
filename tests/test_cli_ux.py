"""The command line as it feels to use: help at once, quiet pipes, costs beside the unmodified model,
eval as a table, and a warning where a benchmark is too short to mean anything."""

import json
import os
import subprocess
import sys

import pytest

from tieta.cli import RELIABLE_ROUNDS, _cost_rows, build_parser, main
from tieta.methods import registry

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2"]


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a fresh interpreter (so that sys.modules starts empty)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, **kwargs)


# every subcommand's --help and a few argument errors, then what they loaded
HELP_WITHOUT_TORCH = """
import argparse, sys
from tieta.cli import build_parser, main

subcommands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
for argv in [["--help"]] + [[command, "--help"] for command in subcommands.choices] + [
        ["bench", "--rounds", "0"], ["flops", "--schedule", "[1,1"], ["train", "--no-such-flag"]]:
    try:
        main(argv)
    except SystemExit:
        pass
loaded = [name for name in ("torch", "timm") if name in sys.modules]
assert not loaded, f"loaded {loaded}"
print("no torch")
"""


def test_help_and_argument_errors_do_not_load_torch_or_timm():
    result = _python(HELP_WITHOUT_TORCH)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("no torch")
    assert "usage: tieta train" in result.stdout and "--schedule" in result.stdout


def test_import_tieta_is_light_and_every_public_name_still_works():
    code = ("import sys, tieta\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
            "assert set(tieta.__all__) <= set(dir(tieta))\n"
            "assert tieta.__version__ and tieta.__doc__\n"
            "tieta.add_lora\n"
            "assert 'torch' in sys.modules\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    import tieta

    for name in tieta.__all__:
        assert getattr(tieta, name) is not None
    from tieta import TietaError, add_tome  # noqa: F401 (the from-import form resolves too)

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tieta.nope


def test_each_method_is_one_registry_entry_that_its_module_s_method_follows(capsys):
    assert registry.names() == list(registry.METHODS)
    for entry in registry.ENTRIES:
        method = registry.METHODS[entry.name]
        assert method.name == entry.name
        assert (method.summary, method.flags, method.verbs) == (entry.summary, entry.flags, entry.verbs)
    assert {flag.option for flag in registry.flags()} == {flag.option for entry in registry.ENTRIES
                                                          for flag in entry.flags}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert all(flag.option in help_text for flag in registry.flags())
    assert all(name in help_text for name in registry.names())


def test_the_public_verbs_are_the_registry_s_and_the_listed_rest():
    import importlib

    import tieta

    for verb, module in registry.verbs().items():  # each verb is the one its method's module offers
        assert verb in tieta.__all__ and getattr(tieta, verb) is getattr(importlib.import_module(module), verb)
    assert {"add_lora", "merge_lora", "add_dyt", "dyt_loss", "search_rates"} <= set(registry.verbs())
    assert {"count_flops", "load", "load_backbone", "freeze_backbone"} <= set(tieta.__all__) - set(registry.verbs())


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI with stdout into a pipe whose reader has already gone (as ``| head`` does once it
    has read enough)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "tieta.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args,status", [
    (["flops", *TINY], {1}),  # what the Python docs advise on a broken pipe
    (["--help"], {0, 1}),  # argparse drops a failed write of its help; a failed flush comes to main
])
def test_output_into_a_closed_pipe_ends_quietly(args, status):
    result = _closed_pipe_run(*args)
    assert result.returncode in status
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def _table_row(out: str, name: str) -> list[str]:
    """The cells after the first of the table row named ``name`` (cells are two spaces apart)."""
    line = next(line.strip() for line in out.splitlines() if line.strip().startswith(name + "  "))
    return line[len(name):].split()


def test_flops_shows_the_unmodified_model_beside_the_method(capsys):
    assert main(["flops", *TINY[:4], "--img-size", "64", "--method", "tome", "--schedule", "[3, 2]"]) == 0
    out = capsys.readouterr().out
    assert "GMACs (MACs/1e9)" in out and "MACs/2^30 (PYRA paper's GFLOPs)" in out and "ratio" in out
    plain, merged = _table_row(out, "timm (no method)"), _table_row(out, "test_vit + tome")
    assert plain[-1] == "1.000" and 0 < float(merged[-1]) < 1
    assert "parameters:" in out and "merge schedule" in out  # the lines that were there before stay


def test_cost_rows_give_each_row_its_ratio_to_the_unmodified_model():
    rows = _cost_rows("m + tome", {"gmacs": 2.0, "pyra_gflops": 1.8}, {"gmacs": 1.0, "pyra_gflops": 0.9})
    assert [row["name"] for row in rows] == ["timm (no method)", "m + tome"]
    assert [row["ratio"] for row in rows] == [1.0, 0.5]


def test_eval_prints_the_summary_table_or_the_raw_record(vtab_task, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(vtab_task), "--output", str(run), "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == f"{run}: test split, 6 images"
    assert "acc %" in table and "trainable %" in table and "eval img/s" in table
    assert _table_row(table, "lora")[0] == f"{json.loads((run / 'summary.json').read_text())['acc']:.2f}"
    assert main(["eval", str(run), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["split"] == "test" and record["images"] == 6 and record["method"] == "lora"


@pytest.mark.parametrize("rounds", ["0", "-1", "two"])
def test_bench_rounds_below_one_are_a_usage_error(rounds, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--rounds", rounds])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("tieta bench: error: argument --rounds: ")


@pytest.mark.parametrize("rounds,warned", [(1, True), (2, True), (RELIABLE_ROUNDS, False)])
def test_bench_with_few_rounds_says_its_medians_are_unreliable(rounds, warned, monkeypatch, capsys):
    from tieta.measure import bench_suite

    monkeypatch.setattr(bench_suite, "run_suite", lambda *args, **kwargs: [{"name": "timm", "gmacs": 1.0}])
    assert main(["bench", "--rounds", str(rounds)]) == 0
    err = capsys.readouterr().err
    assert (f"fewer than {RELIABLE_ROUNDS} interleaved rounds are not reliable" in err) == warned
    assert len(err.strip().splitlines()) == int(warned)
