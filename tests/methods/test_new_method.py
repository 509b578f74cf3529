"""A method is its module plus one registry entry: a throwaway method, written here into a folder
on the import path and registered with one ``Entry``, trains, is costed, exports, loads and shows
up in ``--help`` with its flag, without a line of tieta changed."""

import sys
import textwrap

import pytest
import torch

import tieta
from tieta.cli import build_parser, main
from tieta.methods import registry
from tieta.methods.catalog import Flag
from tieta.train import config as config_module
from tieta.train.checkpoint import read_tensors

TINY = ["--model", "test_vit", "--weights", "random", "--img-size", "32", "--lora-rank", "2"]

THROWAWAY = '''
"""A learned per-channel scale on every block's output."""

from dataclasses import dataclass

import torch
from torch import nn

from tieta.methods.method import Method


@dataclass
class ThrowawayConfig:
    init: float = 1.0


class Scale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def add_throwaway(model: nn.Module, init: float = 1.0) -> nn.Module:
    for block in model.blocks:
        block.throwaway = Scale(model.embed_dim, init)
        block.register_forward_hook(lambda module, args, output: module.throwaway(output))
    return model


METHOD = Method(
    name="throwaway",
    sections={"throwaway": ThrowawayConfig},
    attach=lambda model, config: add_throwaway(model, config.throwaway.init),
    modules=("throwaway",),
)
'''

ENTRY = registry.Entry(
    "throwaway", "throwaway_method", "a learned scale on every block's output",
    flags=(Flag("--throwaway-init", "throwaway.init", float, "throwaway: the scale's start (default 1)"),),
    verbs=("add_throwaway",),
)


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """The throwaway method registered: its module on the import path, its entry in the registry,
    and the run config's class rebuilt with its section wherever tieta's modules hold it."""
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "throwaway_method.py").write_text(textwrap.dedent(THROWAWAY))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(registry, "ENTRIES", (*registry.ENTRIES, ENTRY))
    old, new = config_module.RunConfig, config_module.run_config_class()
    for module in list(sys.modules.values()):
        if module is not None and module.__name__.startswith("tieta") and getattr(module, "RunConfig", None) is old:
            monkeypatch.setattr(module, "RunConfig", new)
    yield
    sys.modules.pop("throwaway_method", None)


def test_a_method_in_its_module_and_one_entry_trains_counts_exports_and_is_listed(throwaway, vtab_task, tmp_path,
                                                                                 capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--throwaway-init" in help_text and "throwaway" in help_text.split("--method")[1]

    run = tmp_path / "run"
    assert main(["train", *TINY, "--method", "throwaway+lora", "--throwaway-init", "0.5", "--data", str(vtab_task),
                 "--output", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
                 "--set", "optim.lr_groups.throwaway=0.01"]) == 0
    trained, _ = read_tensors(run / "checkpoint.safetensors")
    scales = [tensor for name, tensor in trained.items() if name.endswith("throwaway.weight")]
    assert len(scales) == 6  # one per block of test_vit, trained (moved from their start)
    assert all(not torch.equal(scale, torch.full_like(scale, 0.5)) for scale in scales)

    capsys.readouterr()
    assert main(["flops", *TINY, "--method", "throwaway+lora"]) == 0
    assert "test_vit + throwaway+lora" in capsys.readouterr().out

    exported = tmp_path / "export"
    assert main(["export", str(run), "--output", str(exported)]) == 0
    model = tieta.load(exported)
    loaded = {name: tensor for name, tensor in model.state_dict().items() if name.endswith("throwaway.weight")}
    assert len(loaded) == 6 and all(torch.equal(loaded[name], trained[name]) for name in loaded)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        for name in loaded:  # the scales take part in the loaded model's forward pass
            loaded[name].mul_(2)
        assert not torch.allclose(model(images), logits)


def test_the_registry_refuses_a_module_whose_method_has_another_name(throwaway, monkeypatch):
    monkeypatch.setattr(registry, "ENTRIES", (*registry.ENTRIES, registry.Entry("other", "throwaway_method", "")))
    with pytest.raises(TypeError, match="named 'throwaway', but its registry entry 'other'"):
        registry.METHODS
