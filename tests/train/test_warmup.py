"""The warm-up rule: a tenth of the epochs, at most 10, unless set; an explicit warm-up is kept, and
said when it is at least the run's length."""

from __future__ import annotations

import pytest
import yaml

from tieta.cli import _config_from, _overrides_from, build_parser
from tieta.sweep.plan import Cell, plan_from_dict, plan_from_flags
from tieta.sweep.runner import cell_config
from tieta.train.config import (OptimConfig, RunConfig, default_warmup_epochs, load_config, warmup_warning,
                                with_warmup)


@pytest.mark.parametrize("epochs,warmup", [(1, 0), (2, 0), (5, 0), (10, 1), (100, 10), (1000, 10)])
def test_the_default_warmup_is_a_tenth_of_the_epochs_at_most_10(epochs, warmup):
    assert default_warmup_epochs(epochs) == warmup
    config = load_config(overrides={"optim.epochs": epochs})
    assert config.optim.warmup_epochs == warmup and warmup_warning(config) is None
    assert with_warmup(RunConfig(optim=OptimConfig(epochs=epochs))).optim.warmup_epochs == warmup


def test_the_papers_recipe_keeps_its_10_warmup_epochs_and_the_resolved_value_is_written():
    config = load_config()
    assert (config.optim.epochs, config.optim.warmup_epochs) == (100, 10)
    assert config.to_dict()["optim"]["warmup_epochs"] == 10
    # the dataclass default is the rule, not a value: resolved before a run writes its config.yaml
    assert RunConfig().optim.warmup_epochs is None
    short = with_warmup(load_config(overrides={"optim.epochs": 2}))
    assert short.to_dict()["optim"]["warmup_epochs"] == 0


def _train_args(*flags: str):
    return build_parser().parse_args(["train", "--output", "r", *flags])


@pytest.mark.parametrize("warmup", [0, 3, 12])
def test_an_explicit_warmup_is_kept_from_a_flag_a_set_a_file_and_a_sweep(tmp_path, warmup):
    file = tmp_path / "c.yaml"
    file.write_text(f"optim: {{epochs: 100, warmup_epochs: {warmup}}}\n")
    base = {"model": "test_vit", "optim": {"epochs": 100, "warmup_epochs": warmup}}
    plan = plan_from_dict({"tasks": ["t"], "base": base, "runs": {"lora": {"method": "lora"},
                          "own": {"method": "lora", "optim.warmup_epochs": warmup + 1}}}, "s.yaml", tmp_path)
    flags = plan_from_flags([str(tmp_path / "t")], ["lora"], [0],
                            _overrides_from(_train_args("--epochs", "100", "--warmup-epochs", str(warmup))))
    configs = {
        "flag": _config_from(_train_args("--epochs", "100", "--warmup-epochs", str(warmup))),
        "set": _config_from(_train_args("--epochs", "100", "--set", f"optim.warmup_epochs={warmup}")),
        "file": _config_from(_train_args("--config", str(file))),
        "sweep base": cell_config(plan, Cell(plan.tasks[0], plan.runs[0], 0)),
        "sweep flags": cell_config(flags, flags.cells()[0]),
    }
    assert {name: config.optim.warmup_epochs for name, config in configs.items()} == dict.fromkeys(configs, warmup)
    assert cell_config(plan, Cell(plan.tasks[0], plan.runs[1], 0)).optim.warmup_epochs == warmup + 1
    # a file's warm-up stays when the flags change only the epochs
    assert _config_from(_train_args("--config", str(file), "--epochs", "2")).optim.warmup_epochs == warmup


def test_a_run_written_with_the_rule_resumes_and_sweeps_with_equal_settings(tmp_path):
    written = tmp_path / "config.yaml"
    config = load_config(overrides={"optim.epochs": 2, "model": "test_vit"})
    written.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(written).to_dict() == config.to_dict()
    plan = plan_from_flags([str(tmp_path / "t")], ["lora"], [0], {"optim.epochs": 2})
    assert cell_config(plan, plan.cells()[0]).optim.warmup_epochs == 0


@pytest.mark.parametrize("warmup,epochs,says", [
    (10, 2, "never reaches its base value (it ends at 20% of it)"),
    (2, 2, "reaches its base value only at the last step"),
])
def test_an_explicit_warmup_of_at_least_the_run_is_warned_about(warmup, epochs, says):
    config = load_config(overrides={"optim.epochs": epochs, "optim.warmup_epochs": warmup})
    assert config.optim.warmup_epochs == warmup  # kept: a warning, not an error
    warning = warmup_warning(config)
    assert f"optim.warmup_epochs {warmup} is at least the run's {epochs} epochs" in warning and says in warning
    assert "\n" not in warning
    assert warmup_warning(load_config(overrides={"optim.epochs": epochs, "optim.warmup_epochs": epochs - 1})) is None
