"""Every method in the registry trains through ``tieta train`` and is costed by ``tieta flops``,
with no method named anywhere in training, config or the command line."""

import json

import pytest

from tieta.cli import main
from tieta.methods import registry
from tieta.train.config import load_config

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2"]


@pytest.mark.parametrize("method,settings", [
    ("evit+lora", []), ("dynamicvit+lora", []), ("evit+adapter", []), ("dynamicvit+adapter", []),
    ("atc+lora", []),
    ("diffrate+lora", ["--set", "diffrate.kept_prune=[17,17,14,12,10,8]", "--set", "diffrate.kept_merge=[17,16,12,10,8,6]"]),
    ("diffrate+lora", ["--set", "diffrate.target_gmacs=0.0005", "--set", "diffrate.search_epochs=1", "--epochs", "2"]),
])
def test_baselines_train_through_the_command_line(vtab_task, tmp_path, method, settings, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--method", method, "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", *settings]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["acc"] is not None
    assert main(["eval", str(run)]) == 0


@pytest.mark.parametrize("method,fact", [("evit", "tokens entering each block's MLP"),
                                         ("dynamicvit", "tokens entering each block")])
def test_flops_prints_the_cost_and_token_counts(method, fact, capsys):
    assert main(["flops", "--model", "vit_base_patch16_224", "--weights", "random", "--method", method]) == 0
    out = capsys.readouterr().out
    assert "GMACs" in out and fact in out


def test_every_method_has_its_sections_and_flags():
    config = load_config()
    for method in registry.METHODS.values():
        for section in method.sections:
            assert hasattr(config, section), (method.name, section)
        for flag in method.flags:
            head, _, field = flag.key.partition(".")
            assert hasattr(getattr(config, head), field), flag


@pytest.mark.parametrize("setting,message", [
    ("img_size=big", "img_size should be an integer"),
    ("weights=3", "weights should be a string"),
    ("evit.keep_rate=2", "keep_rate"),
    ("dynamicvit.ratios=[0.5, 2]", "ratios"),
    ("optim.lr_groups.head=fast", "should be a number"),
])
def test_settings_are_type_checked(setting, message, tmp_path):
    from tieta.train.config import parse_override
    from tieta import TietaError

    with pytest.raises(TietaError, match=message):
        load_config(overrides=dict([parse_override(setting)]))


def test_a_flag_value_a_method_cannot_read_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["flops", "--method", "tome", "--schedule", "[1,1"])
    assert exit_info.value.code == 2
    assert "cannot read the schedule" in capsys.readouterr().err
