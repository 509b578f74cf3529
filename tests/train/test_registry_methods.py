"""Every method in the registry trains through ``tieta train`` and is costed by ``tieta flops``,
with no method named anywhere in training, config or the command line."""

import json

import pytest
import torch

from tieta.cli import main
from tieta.methods import registry
from tieta.train.config import load_config

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2"]
# settings that fit test_vit at 32 px (5 tokens, 6 blocks) where a method's defaults are for ViT-B
TINY_SETTINGS = {
    "tome": ["--schedule", "[1, 1]"],
    "pyra": ["--schedule", "[1, 1]"],
    "evit": ["--keep-rate", "0.5"],  # 0.7 of 4 patches keeps 3, which with the fused token are 4 again
    "diffrate": ["--set", "diffrate.kept_prune=[5,4,3,3,2,2]", "--set", "diffrate.kept_merge=[5,3,3,2,2,2]"],
    "fpet": ["--fpet-layer", "1"],
    "tofu": ["--schedule", "[1, 1]"],
    "pitome": ["--pitome-ratio", "0.5"],
    "mctf": ["--img-size", "64", "--mctf-r", "2"],  # it always keeps 10 tokens: 5 would fuse none
    "dtem": ["--dtem-r", "2"],
}


def with_lora(name: str) -> str:
    """The method trained with LoRA, as the papers train the token-reduction methods ("lora" alone)."""
    return name if name == "lora" else f"{name}+lora"


def test_the_tiny_settings_name_registered_methods():
    assert set(TINY_SETTINGS) <= set(registry.names())


def unmodified_gmacs(img_size: int = 32) -> float:
    """The GMACs per image of test_vit at ``img_size`` px without any method."""
    from tieta.measure.flops import count_flops
    from tieta.train.model import build_backbone

    config = load_config(overrides={"model": "test_vit", "weights": "random", "img_size": img_size})
    images = torch.randn(1, 3, img_size, img_size)
    return count_flops(build_backbone(config, 2, random_weights=True), images)["gmacs"]


@pytest.mark.parametrize("name", registry.names())
def test_every_method_trains_through_the_command_line_and_a_token_reducer_reduces(vtab_task, tmp_path, name, capsys):
    run, method = tmp_path / "run", with_lora(name)
    assert main(["train", *TINY, "--method", method, "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", *TINY_SETTINGS.get(name, [])]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["acc"] is not None
    # GMACs counted along the executed path on the run's real evaluation images
    settings = TINY_SETTINGS.get(name, [])
    img_size = int(settings[settings.index("--img-size") + 1]) if "--img-size" in settings else 32
    plain = unmodified_gmacs(img_size)
    if registry.METHODS[name].reduces_tokens:
        assert summary["gmacs"] < 0.95 * plain, (summary["gmacs"], plain)
    else:
        assert summary["gmacs"] >= plain


# with the adapter, and DiffRate's search (at 64 px: 17 tokens leave it room to find lower rates)
@pytest.mark.parametrize("method,settings,img_size", [
    ("evit+adapter", ["--keep-rate", "0.5"], 32), ("dynamicvit+adapter", [], 32),
    ("diffrate+lora", ["--set", "diffrate.target_gmacs=0.0005", "--set", "diffrate.search_epochs=1", "--epochs", "2"],
     64),
])
def test_baselines_train_through_the_command_line(vtab_task, tmp_path, method, settings, img_size, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--method", method, "--data", str(vtab_task), "--output", str(run),
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--img-size", str(img_size),
                 *settings]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["acc"] is not None
    assert summary["gmacs"] < 0.95 * unmodified_gmacs(img_size)
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
