"""The subcommands agree with each other: every flag explained, --device wherever a model runs, a
subcommand's own usage on its errors, one meaning of --output for pictures, one mode for every file."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
import torch

from conftest import refused, write_vtab_task
from tieta.cli import build_parser, main

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2"]
# the subcommands that run a model, each with a --device
RUNS_A_MODEL = ("train", "sweep", "report", "eval", "predict", "flops", "bench", "plan", "show-merges", "show-tokens",
                "demo")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


def test_every_flag_and_argument_of_every_subcommand_has_help():
    unexplained = [f"{name} {action.option_strings or action.dest}"
                   for name, subparser in _subcommands().items() for action in subparser._actions
                   if not action.help or action.help == argparse.SUPPRESS]
    assert unexplained == []


@pytest.mark.parametrize("command", RUNS_A_MODEL)
def test_every_subcommand_that_runs_a_model_takes_device(command):
    options = {option for action in _subcommands()[command]._actions for option in action.option_strings}
    assert "--device" in options


@pytest.mark.parametrize("argv", [
    ["train", "--no-such-flag"],
    ["eval", "run", "an-extra-argument"],
    ["eval"],
    ["train", "--epochs", "x"],
    ["show-merges", "--count", "0"],
    ["sweep", "--output", "out", "--devices", "cpu", "--bogus", "1"],
])
def test_an_argument_error_prints_the_subcommand_s_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: tieta {argv[0]} "), err
    assert err.strip().splitlines()[-1].startswith(f"tieta {argv[0]}: error: ")


# --- --device ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tome_run(tmp_path_factory):
    """A finished ToMe+LoRA run on a tiny task (shared: training is the slow part)."""
    root = tmp_path_factory.mktemp("consistency")
    task, run = write_vtab_task(root / "task"), root / "run"
    assert main(["train", *TINY, "--method", "tome+lora", "--schedule", "[1, 1]", "--data", str(task),
                 "--output", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    return run


def test_eval_runs_on_the_device_asked_for(tome_run, monkeypatch, capsys):
    from tieta.train import fit

    devices = []
    real = fit.evaluate
    monkeypatch.setattr(fit, "evaluate", lambda model, loader, normalize, device, *args, **kwargs:
                        devices.append(device) or real(model, loader, normalize, device, *args, **kwargs))
    assert main(["eval", str(tome_run), "--device", "cpu", "--json"]) == 0
    assert devices == [torch.device("cpu")]
    assert main(["eval", str(tome_run), "--json"]) == 0  # the run's own setting (auto)
    assert devices[1] == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    capsys.readouterr()
    assert "device cuda:99 was asked for" in refused(capsys, "eval", str(tome_run), "--device", "cuda:99")
    assert "'foo' is not a device" in refused(capsys, "eval", str(tome_run), "--device", "foo")


def test_show_merges_show_tokens_and_flops_take_a_device(tome_run, tmp_path, capsys):
    assert main(["show-merges", "--run", str(tome_run), "--count", "2", "--device", "cpu",
                 "--output", str(tmp_path)]) == 0
    assert (tmp_path / "merges.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["flops", *TINY, "--method", "tome", "--device", "cpu"]) == 0
    capsys.readouterr()
    # a device this machine lacks is refused before any model is built or run folder read
    for argv in (["show-merges", "--run", str(tmp_path / "no-run"), "--output", str(tmp_path / "other")],
                 ["show-tokens", str(tmp_path / "no-run"), "--output", str(tmp_path / "other")],
                 ["flops", *TINY]):
        assert "device cuda:99 was asked for" in refused(capsys, *argv, "--device", "cuda:99")


def test_sweep_takes_device_for_one_device_as_train_does(tmp_path, monkeypatch, capsys):
    from tieta.sweep import runner

    task = write_vtab_task(tmp_path / "data" / "a")
    trained_on = []
    monkeypatch.setattr(runner, "fit", lambda config, output, **kwargs: trained_on.append(config.device))
    sweep = ["sweep", "--data", str(task), "--method", "lora", *TINY, "--epochs", "1"]
    main([*sweep, "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert trained_on == ["cpu"]
    capsys.readouterr()
    assert "not both" in refused(capsys, *sweep, "--output", str(tmp_path / "o2"), "--device", "cpu",
                                 "--devices", "cpu")
    assert "--device takes one device" in refused(capsys, *sweep, "--output", str(tmp_path / "o3"),
                                                  "--device", "cpu,cpu")


# --- pictures: --output is a folder ------------------------------------------------------------------

def _merges(task, *args: str) -> list[str]:
    return ["show-merges", *TINY[:4], "--img-size", "64", "--schedule", "[3, 2]", "--data", str(task),
            "--count", "2", *args]


def test_show_merges_output_is_a_folder_as_for_show_tokens(tmp_path, monkeypatch, capsys):
    task = write_vtab_task(tmp_path / "task")
    assert main(_merges(task, "--output", str(tmp_path / "pictures"))) == 0
    assert (tmp_path / "pictures" / "merges.png").read_bytes()[:4] == b"\x89PNG"
    assert "note" not in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(_merges(task)) == 0  # the default: the current folder
    assert (tmp_path / "merges.png").is_file()
    assert "merges.png already exists" in refused(capsys, *_merges(task, "--output", str(tmp_path / "pictures")))


def test_a_png_path_given_to_show_merges_still_works_with_a_note(tmp_path, capsys):
    task = write_vtab_task(tmp_path / "task")
    assert main(_merges(task, "--output", str(tmp_path / "m.png"))) == 0
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    assert f"wrote {tmp_path / 'm.png'}" in captured.out
    assert "tieta: note: --output names a folder now" in captured.err


def test_both_picture_commands_document_output_as_a_folder():
    for command in ("show-merges", "show-tokens"):
        output = next(action for action in _subcommands()[command]._actions if "--output" in action.option_strings)
        assert str(output.default) == "."
        assert output.help.startswith("folder for ")


# --- one mode for every file ------------------------------------------------------------------------

def _modes(folder) -> dict[str, int]:
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode)
            for path in folder.rglob("*") if path.is_file()}


def test_a_run_folder_s_and_an_export_s_files_all_have_the_same_mode(tome_run, tmp_path, capsys):
    export = tmp_path / "export"
    previous = os.umask(0o027)  # not the usual 022: the modes follow the umask, as open() would
    try:
        assert main(["export", str(tome_run), "--output", str(export)]) == 0
    finally:
        os.umask(previous)
    modes = _modes(export)
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes
    run_modes = _modes(tome_run)  # written under the usual umask
    assert "checkpoint.safetensors" in run_modes
    assert set(run_modes.values()) == {0o666 & ~previous}, run_modes


def test_demo_refuses_a_device_this_machine_lacks_before_fetching_anything(tmp_path, capsys, monkeypatch):
    from conftest import refused
    from tieta import demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo started"))
    assert "'foo' is not a device" in refused(capsys, "demo", "--output", str(tmp_path / "d"), "--device", "foo")
