import math

import pytest
import torch

import tieta
from tieta import TietaError
from tieta.train.config import load_config, parse_override
from tieta.train.optim import build_optimizer, lr_multiplier
from tests.conftest import make_vit


def test_defaults_are_the_papers_recipe():
    config = load_config()
    assert (config.optim.lr, config.optim.weight_decay, config.optim.epochs, config.optim.warmup_epochs) == (1e-3, 1e-4, 100, 10)
    assert config.optim.batch_size == 64 and config.optim.min_lr == 1e-5
    assert (config.lora.rank, config.lora.targets, config.lora.alpha, config.lora.dropout) == (8, "qkv", None, 0.1)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  epochs: 5\nlora:\n  rank: 4\n")
    config = load_config(path, {"optim.epochs": 7})
    assert (config.optim.lr, config.optim.epochs, config.lora.rank) == (0.01, 7, 4)
    assert parse_override("optim.lr=1e-4") == ("optim.lr", 1e-4)
    assert parse_override("optim.lr_groups.head=0.01") == ("optim.lr_groups.head", 0.01)


@pytest.mark.parametrize("text,message", [
    ("optim:\n  learning_rate: 1\n", "unknown config key"),
    ("lora:\n  rank: eight\n", "should be an integer"),
    ("method: foo\n", "unknown method"),
    ("[1, 2\n", "not valid YAML"),
    ("optim:\n  epochs: 0\n", "at least 1"),
])
def test_bad_config(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(TietaError, match=message):
        load_config(path)


def test_schedule_warmup_then_cosine_to_min():
    total, warmup, ratio = 100, 10, 0.01
    values = [lr_multiplier(s, total, warmup, ratio) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_multiplier(total, total, warmup, ratio) == pytest.approx(ratio)
    assert values[55] == pytest.approx(ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_param_groups_no_decay_on_norms_and_biases_and_own_lr():
    model = tieta.freeze_backbone(tieta.add_adapter(tieta.add_lora(make_vit("plain"), rank=2), dim=2))
    optimizer = build_optimizer(model, 1e-3, 1e-4, {"adapter": 5e-4})
    groups = {(g["method"], g["weight_decay"] > 0): g for g in optimizer.param_groups}
    assert set(groups) == {("adapter", False), ("adapter", True), ("head", False), ("head", True), ("lora", True)}
    assert groups[("adapter", True)]["base_lr"] == 5e-4 and groups[("lora", True)]["base_lr"] == 1e-3
    assert all(p.ndim == 1 for p in groups[("adapter", False)]["params"])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == n_trainable


@pytest.mark.parametrize("choice,expected", [("reference", None), ("paper", 1e-4), (3e-4, 3e-4)])
def test_pyra_learning_rate_by_name(choice, expected):
    from tieta.train.config import group_learning_rates

    config = load_config(overrides={"method": "pyra+lora", "pyra.lr": choice})
    assert group_learning_rates(config).get("pyra") == expected
    with pytest.raises(TietaError, match="pyra.lr"):
        load_config(overrides={"pyra.lr": "fast"})


def test_merge_schedule_forms_in_config():
    from tieta.methods.schedules import schedule_setting

    assert schedule_setting(load_config(overrides={"merge.schedule": {"r": 8, "inflection": -0.5}}).merge) == (8, -0.5)
    assert schedule_setting(load_config(overrides={"merge.schedule": [4, 4]}).merge) == [4, 4]
    assert load_config().merge.schedule == "low" and load_config().merge.prop_attn is True
