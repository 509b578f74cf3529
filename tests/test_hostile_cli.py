"""Every subcommand, fed what a clumsy user or an attacker would type: each bad input is one sentence
on stderr and exit status 2, before any work, never a traceback and never a silently wrong result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import refused
from tieta.cli import main
from tieta.safe_yaml import MAX_BYTES, MAX_DEPTH

# a tiny random ViT (6 blocks, patch 16) at 32 px: 4 patches, fast to build
FLOPS = ["flops", "--model", "test_vit", "--weights", "random", "--img-size", "32"]


# --- method flags: each Flag.parse, then the method's own validate ---------------------------------

@pytest.mark.parametrize("args,message", [
    (["--schedule", "[1,1"], "cannot read the schedule '[1,1': expected ',' or ']'"),
    (["--schedule", "abc"], "merge.schedule: unknown schedule 'abc'"),
    (["--schedule", "[1, -1]"], "block 1 of the schedule asks for -1 merges"),
    (["--schedule", "[2, true]"], "block 1 of the schedule asks for True merges"),
    (["--schedule", "-3"], "cannot be negative, got -3"),
    (["--method", "tome", "--schedule", "[1, 1, 1, 1, 1, 1, 1]"], "7 entries but the model has 6 blocks"),
    (["--method", "tome", "--schedule", "9"], "at most"),
    (["--schedule", "1.5"], "a merge schedule is low, high, a whole number r"),
    (["--schedule", "null"], "a merge schedule is low, high"),
    (["--schedule", "{r: 1}"], "exactly the keys r and inflection"),
    (["--schedule", "{r: 2, inflection: 3}"], "inflection is a number in [-1, 1]"),
    (["--schedule", "{r: .nan, inflection: 0}"], "r is a number of tokens >= 0"),
    (["--schedule", "{r: 1, r: 2}"], "the key 'r' appears twice"),
    (["--schedule", "!!python/object/apply:os.system [true]"], "cannot read the schedule"),
    (["--method", "pyra", "--pyra-lr", "inf"], "pyra.lr must be"),
    (["--method", "pyra", "--pyra-lr", "nan"], "pyra.lr must be"),
    (["--method", "pyra", "--pyra-lr", "-1"], "pyra.lr must be"),
    (["--rho", "nan"], "dyt.rho should be a finite number"),
    (["--keep-rate", "inf"], "evit.keep_rate should be a finite number"),
    (["--target-gmacs", "nan"], "diffrate.target_gmacs should be a finite number"),
    (["--experts", "1e9"], "argument --experts: invalid int value"),
    (["--lora-rank", "0"], "lora.rank must be a positive integer"),
    (["--adapter-dim", "-1"], "adapter.dim must be a positive integer"),
    (["--dyt-variant", "everything"], "argument --dyt-variant: invalid choice"),
    (["--diffrate-rates", "fastest"], "argument --diffrate-rates: invalid choice"),
])
def test_a_bad_method_flag_is_one_sentence(capsys, args, message):
    assert message in refused(capsys, *FLOPS, *args)


# --- general settings: config.validate --------------------------------------------------------------

@pytest.mark.parametrize("setting,message", [
    ("drop_path=2", "drop_path must be in [0, 1), got 2"),
    ("drop_path=-0.1", "drop_path must be in [0, 1)"),
    ("drop_path=.nan", "drop_path should be a finite number"),
    ("lora.dropout=1", "lora.dropout must be in [0, 1)"),
    ("lora.dropout=-0.1", "lora.dropout must be in [0, 1)"),
    ("adapter.dropout=1.5", "adapter.dropout must be in [0, 1)"),
    ("lora.alpha=-1", "lora.alpha must be positive"),
    ("lora.alpha=nan", "lora.alpha should be a finite number"),
    ("adapter.scale=inf", "adapter.scale should be a finite number"),
    ("dyt.rate_weight=-1", "cannot be negative"),
    ("pyra.lr=[1]", "pyra.lr must be"),
    ("merge.schedule=[1, 2.5]", "block 1 of the schedule asks for 2.5 merges"),
    ("optim.clip_grad=abc", "optim.clip_grad should be a number, got 'abc'"),
    ("optim.clip_grad=-1", "optim.clip_grad, the largest gradient norm, must be positive"),
    ("optim.clip_grad=0", "optim.clip_grad, the largest gradient norm, must be positive"),
    ("optim.min_lr=-1", "optim.min_lr cannot be negative"),
    ("optim.weight_decay=-1", "optim.weight_decay cannot be negative"),
    ("optim.lr=nan", "optim.lr should be a finite number"),
    ("optim.lr=.inf", "optim.lr should be a finite number"),
    ("eval_batch_size=0", "eval_batch_size must be at least 1"),
    ("data.num_workers=-1", "data.num_workers cannot be negative"),
    ("data.normalization=foo", "data.normalization must be one of imagenet, inception"),
    ("data.train_split=nope", "data.train_split must be one of train, "),
    ("data.eval_split=nope", "data.eval_split must be one of "),
    ("optim.lr_groups.head=abc", "optim.lr_groups.head should be a number"),
    ("optim.lr_groups.head=0", "optim.lr_groups.head must be positive"),
    ("optim.lr_groups.heads=0.1", "optim.lr_groups names a parameter group, one of head, lora"),
    ("optim.lr_groups={head: 1, head: 2}", "the key 'head' appears twice"),
    ("unknown.key=1", "unknown config key 'unknown'"),
    ("=1", "--set takes KEY=VALUE with a dotted key"),
    ("a..b=1", "--set takes KEY=VALUE with a dotted key"),
    ("optim.=1", "--set takes KEY=VALUE with a dotted key"),
    ("optim", "--set takes KEY=VALUE"),
    ("optim=3", "config section optim should be a mapping, got 3"),
    ("seed=-1", "seed must be in 0 .. 2**32 - 1"),
    ("seed=4294967296", "seed must be in 0 .. 2**32 - 1"),
    ("device=cudafoo", "device must be auto, cpu or cuda[:N], got 'cudafoo'"),
])
def test_a_bad_setting_is_one_sentence(capsys, setting, message):
    assert message in refused(capsys, *FLOPS, "--set", setting)


def test_the_largest_seed_numpy_and_torch_take_is_accepted(capsys):
    import numpy as np
    import torch

    from tieta.train.config import load_config
    from tieta.train.model import seed_everything

    largest = 2**32 - 1
    assert main([*FLOPS, "--set", f"seed={largest}"]) == 0
    assert load_config(overrides={"seed": largest}).seed == largest
    seed_everything(largest)  # what a run does with it: NumPy and torch take it as it is
    assert torch.initial_seed() == largest
    assert np.random.get_state()[1][0] == np.random.RandomState(largest).get_state()[1][0]


@pytest.mark.parametrize("args,message", [
    (["--img-size", "33"], "img_size 33 is not a multiple of test_vit's patch size 16; use e.g. 32 or 48"),
    (["--img-size", "8"], "patch size 16; use e.g. 16"),
    (["--img-size", "-5"], "img_size must be positive"),
    (["--img-size", "0"], "img_size must be positive"),
    (["--num-classes", "0"], "argument --num-classes: must be at least 1"),
    (["--num-classes", "-3"], "argument --num-classes: must be at least 1"),
    (["--model", "resnet18"], "VisionTransformer"),
    (["--model", "vit_nonexistent_patch16"], "timm has no model named"),
    (["--method", "+"], "method must name at least one method"),
])
def test_flops_refuses_what_it_cannot_count(capsys, args, message):
    assert message in refused(capsys, *FLOPS, *args)


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "optim.lr should be a finite number, got nan"),
    (["--lr", "inf"], "optim.lr should be a finite number, got inf"),
    (["--lr", "0"], "optim.lr must be positive"),
    (["--epochs", "0"], "optim.epochs must be at least 1"),
    (["--batch-size", "0"], "optim.batch_size must be at least 1"),
    (["--warmup-epochs", "-1"], "optim.warmup_epochs cannot be negative"),
    (["--weight-decay", "-1"], "optim.weight_decay cannot be negative"),
    (["--eval-every", "0"], "eval_every must be at least 1"),
    (["--seed", "-1"], "seed must be in 0 .. 2**32 - 1"),
    (["--seed", str(2**40)], "seed must be in 0 .. 2**32 - 1"),
    (["--device", "foo"], "device must be auto, cpu or cuda[:N]"),
    (["--img-size", "33"], "patch size 16"),
    (["--set", "data.num_workers=-1"], "data.num_workers cannot be negative"),
    (["--set", "data.train_split=nope"], "data.train_split must be one of"),
])
def test_train_refuses_a_bad_setting_before_it_makes_the_run_folder(vtab_task, tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert message in refused(capsys, "train", *FLOPS[1:], "--data", str(vtab_task), "--output", str(run), *args)
    assert not run.exists()


# --- config files: tieta.safe_yaml's documented limits --------------------------------------------

def _alias_bomb(levels: int = 9) -> str:
    """The billion laughs: each level a list of nine aliases of the one before (9**levels strings)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


CONFIG_FILES = {
    "a list": ("- model: test_vit\n", "should hold a mapping of settings, got a list"),
    "empty": ("", "holds no settings (it is empty)"),
    "only a comment": ("# nothing yet\n", "holds no settings"),
    "not UTF-8": (b"model: \xe9t\xe9\n", "is not UTF-8 text"),
    "binary garbage": (bytes(range(256)) * 4, "is not UTF-8 text"),
    "control characters": ("model: test\x00vit\n", "is not valid YAML: unacceptable character"),
    "a python tag": ("model: !!python/object/apply:os.system [echo owned]\n", "could not determine a constructor"),
    "an alias bomb": (_alias_bomb(), "is refused: it holds more than 100,000 values with its aliases expanded"),
    "an alias of itself": ("optim: &o {lr_groups: *o}\n", "is refused: the alias *o is inside the collection"),
    "deep nesting": ("model: " + "[" * 1000 + "]" * 1000 + "\n", f"nests more than {MAX_DEPTH} levels deep"),
    "a repeated key": ("model: test_vit\nweights: random\nmodel: vit_base_patch16_224\n",
                       "is refused: the key 'model' appears twice in one mapping (line 3)"),
    "a repeated section": ("optim:\n  lr: 0.1\noptim:\n  epochs: 3\n", "the key 'optim' appears twice"),
    "a repeated nested key": ("optim: {lr: 0.1, lr: 0.2}\n", "the key 'lr' appears twice"),
    "too large": ("# padding\n" * (MAX_BYTES // 10 + 1) + "model: test_vit\n", "settings files are at most"),
    "a section given a scalar": ("optim: 3\n", "config section optim should be a mapping"),
    "a malformed list": ("merge: {schedule: [1, 2\n", "is not valid YAML"),
}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_a_bad_config_file_is_one_sentence(tmp_path, capsys, name):
    content, message = CONFIG_FILES[name]
    path = tmp_path / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert message in refused(capsys, *FLOPS, "--config", str(path))


def test_a_config_path_that_is_a_folder_is_named_as_such(tmp_path, capsys):
    assert f"config file {tmp_path} is not a file" in refused(capsys, *FLOPS, "--config", str(tmp_path))


def test_anchors_and_merge_keys_that_share_settings_are_fine(tmp_path):
    from tieta.train.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("lora: &drop {dropout: 0.05}\nadapter: {<<: *drop, dropout: 0.2, dim: 4}\ndyt: {rho: 0.4}\n")
    config = load_config(path)  # a key a merge brought in may be overridden: not a repeated key
    assert (config.lora.dropout, config.adapter.dropout, config.adapter.dim) == (0.05, 0.2, 4)
    path.write_text(_alias_bomb(levels=3))  # 9**3 values: shared, within the limit, then refused as settings
    with pytest.raises(Exception, match="unknown config key 'a0'"):
        load_config(path)


# --- eval and checkpoints ---------------------------------------------------------------------------

def test_eval_batch_size_below_one_is_a_usage_error(tmp_path, capsys):
    message = refused(capsys, "eval", str(tmp_path), "--batch-size", "0")
    assert "argument --batch-size: must be at least 1, got 0" in message


def _checkpoint(path: Path, metadata: dict[str, str]) -> Path:
    """A checkpoint with a matching checksum, so that what is refused is its metadata."""
    import torch
    from safetensors.torch import save_file

    from tieta.train.checkpoint import checksum

    tensors = {"head.weight": torch.zeros(3, 64)}
    save_file(tensors, str(path), metadata={**metadata, "tieta_sha256": checksum(tensors, metadata)})
    return path


def _run_config(**changes) -> str:
    from tieta.train.config import load_config

    config = load_config(overrides={"model": "test_vit", "weights": "random", "img_size": 32}).to_dict()
    config.update(changes)
    return json.dumps(config)


# checkpoint metadata
def test_eval_of_a_checkpoint_whose_config_is_not_json_is_one_sentence(tmp_path, capsys):
    path = _checkpoint(tmp_path / "checkpoint.safetensors", {"tieta_config": "{not json", "num_classes": "3"})
    assert str(path) in refused(capsys, "eval", str(path))


# checkpoint metadata
def test_eval_of_a_checkpoint_whose_class_count_is_not_a_number_is_one_sentence(tmp_path, capsys):
    path = _checkpoint(tmp_path / "checkpoint.safetensors", {"tieta_config": _run_config(), "num_classes": "abc"})
    assert str(path) in refused(capsys, "eval", str(path))


# checkpoint metadata: the config inside a checkpoint is checked as any other (here numpy's seed range)
def test_eval_of_a_checkpoint_whose_config_is_refused_is_one_sentence(tmp_path, capsys):
    path = _checkpoint(tmp_path / "checkpoint.safetensors", {"tieta_config": _run_config(seed=-1), "num_classes": "3"})
    assert "seed" in refused(capsys, "eval", str(path))


# --- bench ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1"),
    (["--img-size", "0"], "argument --img-size: must be at least 1"),
    (["--img-size", "33"], "img_size 33 is not a multiple of test_vit's patch size 16"),
    (["--model", "vit_nonexistent_patch16"], "timm has no model named 'vit_nonexistent_patch16'"),
    (["--model", "resnet18"], "VisionTransformer"),
    (["--model", "resnet18", "--img-size", "224"], "resnet18 takes no img_size: it is not a VisionTransformer"),
    (["--device", "foo"], "'foo' is not a device"),
    (["--device", "cuda:999"], "cuda:999 was asked for but torch sees"),
    (["--schedules", "999"], "argument --schedules: invalid choice: '999'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
])
def test_bench_refuses_before_it_times_anything(capsys, args, message):
    base = ["bench", "--model", "test_vit"] if "--model" not in args else ["bench"]
    assert message in refused(capsys, *base, *args)


def test_bench_output_is_checked_before_the_minutes_of_timing(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in refused(capsys, "bench", "--model", "test_vit", "--output",
                                                str(tmp_path / "file" / "rows.json"))
    assert "it is a folder; give a file name" in refused(capsys, "bench", "--model", "test_vit", "--output",
                                                         str(tmp_path))


# --- report -----------------------------------------------------------------------------------------

def _finished_run(folder: Path, seed: object = 0, acc: float = 50.0) -> Path:
    """A run folder as report reads it: summary.json and config.yaml (nothing to load, nothing timed)."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"acc": acc, "best_acc": acc, "method": "lora",
                                                     "data": str(folder / "task")}))
    (folder / "config.yaml").write_text(f"seed: {seed}\n")
    return folder


def test_report_on_no_folder_a_file_or_an_empty_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    assert "is not a folder" in refused(capsys, "report", str(tmp_path / "missing"))
    assert "is not a folder" in refused(capsys, "report", str(tmp_path / "file"))
    assert "holds no finished run" in refused(capsys, "report", str(tmp_path / "empty"))


def test_report_output_on_a_file_and_its_benchmark_device(tmp_path, capsys):
    _finished_run(tmp_path / "sweep" / "run")
    (tmp_path / "file").write_text("x")
    assert "exists and is not a folder" in refused(capsys, "report", str(tmp_path / "sweep"), "--no-bench",
                                                   "--output", str(tmp_path / "file"))
    assert "'foo' is not a device" in refused(capsys, "report", str(tmp_path / "sweep"), "--device", "foo",
                                              "--output", str(tmp_path / "out"))
    assert "must be at least 1" in refused(capsys, "report", str(tmp_path / "sweep"), "--rounds", "0")


def test_report_names_a_run_it_cannot_read_instead_of_a_traceback(tmp_path, capsys):
    _finished_run(tmp_path / "sweep" / "run", seed="abc")
    message = refused(capsys, "report", str(tmp_path / "sweep"), "--no-bench")
    assert "holds no finished run" in message and "gives no whole-number seed ('abc')" in message


def test_report_takes_no_nan_accuracy_for_a_result(tmp_path, capsys):
    run = tmp_path / "sweep" / "run"
    _finished_run(run)
    (run / "summary.json").write_text('{"acc": NaN, "best_acc": Infinity, "method": "lora"}')
    assert "holds no finished run" in refused(capsys, "report", str(tmp_path / "sweep"), "--no-bench")


def test_report_refuses_a_sweep_plan_with_a_repeated_key(tmp_path, capsys):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.yaml").write_text("tasks: [a]\nruns: {lora: {}}\nseeds: [0]\nseeds: [1]\n")
    assert "the key 'seeds' appears twice" in refused(capsys, "report", str(tmp_path / "sweep"), "--no-bench")


# --- show-merges, show-tokens, demo -----------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--count", "0"], "argument --count: must be at least 1, got 0"),
    (["--count", "-1"], "argument --count: must be at least 1"),
    (["--count", "two"], "argument --count: expected a whole number"),
    (["--split", "nope"], "split must be one of"),
    (["--schedule", "[1,1"], "cannot read the schedule"),
    (["--img-size", "33"], "patch size 16"),
])
def test_show_merges_refuses_bad_input(vtab_task, tmp_path, capsys, args, message):
    png = tmp_path / "m.png"
    assert message in refused(capsys, "show-merges", *FLOPS[1:], "--data", str(vtab_task), "--output", str(png), *args)
    assert not png.exists()


def test_show_tokens_count_and_a_folder_without_a_run(tmp_path, capsys):
    assert "argument --count: must be at least 1" in refused(capsys, "show-tokens", str(tmp_path), "--count", "0")
    assert str(tmp_path) in refused(capsys, "show-tokens", str(tmp_path), "--output", str(tmp_path / "pictures"))


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--epochs", "-1"], "argument --epochs: must be at least 1"),
])
def test_demo_epochs_below_one_are_a_usage_error(capsys, args, message):
    assert message in refused(capsys, "demo", *args)


def test_demo_output_on_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in refused(capsys, "demo", "--output", str(tmp_path / "file"), "--epochs", "1")


# --- sweep ------------------------------------------------------------------------------------------

SWEEP_FILES = {
    "an unknown method": ("tasks: [a]\nruns: {x: {method: nope}}\n", "run x: unknown method 'nope'"),
    "a fractional seed": ("tasks: [a]\nruns: {lora: {}}\nseeds: [0.5]\n", "seeds should be a list of non-negative"),
    "a text seed": ("tasks: [a]\nruns: {lora: {}}\nseeds: [one]\n", "seeds should be a list of non-negative"),
    "a seed past numpy's range": ("tasks: [a]\nruns: {lora: {}}\nseeds: [4294967296]\n", "seed must be in 0 .. 2**32"),
    "a task named twice": ("tasks: [a, {name: a, path: elsewhere}]\nruns: {lora: {}}\n", "a task name appears twice"),
    "a repeated key": ("tasks: [a]\nruns: {lora: {}}\nruns: {tome: {}}\n", "the key 'runs' appears twice"),
    "a repeated run": ("tasks: [a]\nruns:\n  lora: {}\n  lora: {lora.rank: 4}\n", "the key 'lora' appears twice"),
    "a seed in a run": ("tasks: [a]\nruns: {lora: {seed: 5}}\n", "run lora: seed is set per run by the sweep's seeds"),
    "a task folder in base": ("tasks: [a]\nbase: {data: {path: x}}\nruns: {lora: {}}\n",
                              "base: data.path is set per run by the sweep's tasks"),
    "an alias bomb": (_alias_bomb() + "tasks: [a]\nruns: {lora: {}}\n", "more than 100,000 values"),
    "not UTF-8": (b"tasks: [\xff]\n", "is not UTF-8 text"),
}


@pytest.mark.parametrize("name", list(SWEEP_FILES))
def test_a_bad_sweep_file_is_one_sentence_before_any_run(tmp_path, capsys, name):
    content, message = SWEEP_FILES[name]
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    output = tmp_path / "out"
    assert message in refused(capsys, "sweep", str(path), "--output", str(output), "--model", "test_vit",
                              "--weights", "random", "--root", str(tmp_path))
    assert not output.exists()


@pytest.mark.parametrize("args,message", [
    (["--set", "seed=3"], "--set: seed is set per run by the sweep's seeds"),
    (["--set", "data.path=/elsewhere"], "--set: data.path is set per run by the sweep's tasks"),
    (["--set", "method=tome"], "--set method: a sweep's methods are given with --method"),
    (["--seeds", str(2**40)], "seed must be in 0 .. 2**32 - 1"),
    (["--seeds", "1.5"], "argument --seeds: invalid int value"),
    (["--schedule", "[1, -1]"], "block 1 of the schedule asks for -1 merges"),
    (["--lr", "nan"], "optim.lr should be a finite number"),
])
def test_sweep_flags_that_would_be_ignored_or_cannot_work_are_refused(vtab_task, tmp_path, capsys, args, message):
    output = tmp_path / "out"
    assert message in refused(capsys, "sweep", "--data", str(vtab_task), "--method", "lora", "--output", str(output),
                              "--model", "test_vit", "--weights", "random", *args)
    assert not output.exists()


def test_a_seed_setting_on_top_of_a_sweep_file_is_refused(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("tasks: [a]\nruns: {lora: {}}\n")
    assert "--set: seed is set per run" in refused(capsys, "sweep", str(path), "--output", str(tmp_path / "out"),
                                                   "--set", "seed=1")


def test_sweep_output_on_a_file_is_refused(vtab_task, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in refused(capsys, "sweep", "--data", str(vtab_task), "--method", "lora",
                                                "--output", str(tmp_path / "file"))


def test_sweep_file_only_flags_are_not_silently_ignored_with_data_and_method(vtab_task, tmp_path, capsys):
    assert "--tasks, --runs and --root choose within a sweep file" in refused(
        capsys, "sweep", "--data", str(vtab_task), "--method", "lora", "--output", str(tmp_path / "out"),
        "--tasks", "task")


# --- output and input paths in the wrong place ------------------------------------------------------

def test_a_weights_path_that_is_a_folder_is_named_as_such(vtab_task, tmp_path, capsys):
    (tmp_path / "w.safetensors").mkdir()
    assert "is not a file" in refused(capsys, "train", "--model", "test_vit", "--weights",
                                      str(tmp_path / "w.safetensors"), "--img-size", "32", "--data", str(vtab_task),
                                      "--output", str(tmp_path / "run"))


def test_picture_outputs_under_a_file_are_refused_before_any_model_is_built(vtab_task, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in refused(capsys, "show-merges", *FLOPS[1:], "--data", str(vtab_task),
                                                "--output", str(tmp_path / "file" / "m.png"))
    assert "is a file, not a folder" in refused(capsys, "show-tokens", str(tmp_path), "--output",
                                                str(tmp_path / "file"))
