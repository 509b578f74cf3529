"""torch.compile of ToMe and PYRA evaluation models: no graph break at any depth (the native merge
stays out of traced code), and the compiled logits are the eager ones."""

from __future__ import annotations

import pytest
import torch

import tieta
from tieta.deploy.compiled import compile_model, graph_breaks
from tests.conftest import SMALL, make_vit, randomise_parameters


def tome(model):
    return tieta.add_tome(model, r=2)  # 17 tokens: 2 per block fit 6 blocks


def pyra(model):
    return randomise_parameters(tieta.add_pyra(model, r=2), ("pyra",), seed=2)  # away from the identity


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("depth", [3, 6])
@pytest.mark.parametrize("attach", [tome, pyra], ids=["tome", "pyra"])
def test_no_graph_break_at_any_depth(attach, depth, monkeypatch):
    """The count does not grow with depth (before: 10 breaks, 11 graphs, from the native merge)."""
    monkeypatch.setitem(SMALL, "depth", depth)  # conftest builds its ViTs from SMALL when asked
    model = tieta.merge_lora(attach(tieta.add_lora(make_vit("plain"), rank=2)))
    assert len(model.blocks) == depth
    with torch.no_grad():
        model(images())  # the native merge, where it can be built, is loaded and used eagerly
    assert graph_breaks(model, images()) == 0


@pytest.mark.parametrize("attach", [tome, pyra], ids=["tome", "pyra"])
def test_compiled_logits_are_the_eager_ones(attach):
    model = attach(make_vit("registers"))  # 4 registers and a class token stay in front
    compiled = compile_model(model)
    with torch.inference_mode():
        for seed in (0, 1):  # the second call reuses the graph
            batch = images(seed=seed)
            assert torch.allclose(compiled(batch), model(batch), atol=1e-5, rtol=0)
    with torch.inference_mode():  # eager afterwards still has its own state (no tracer tensors left)
        assert type(model(images())) is torch.Tensor


def test_dyt_compiles_to_one_graph_with_data_dependent_token_counts():
    """DyT's nonzero is captured in the graph: batches with different active counts reuse it."""
    model = tieta.add_dyt(make_vit("plain"), rho=0.5)
    model = randomise_parameters(model, ("dispatcher", "adapter"), seed=3)  # some tokens skip the MLP
    assert graph_breaks(model, images()) == 0
    compiled = compile_model(model)
    first, second = images(seed=0), images(seed=1) * 3
    assert tieta.activation_rates(model, first) != tieta.activation_rates(model, second)
    with torch.inference_mode():
        for batch in (first, second):
            assert torch.allclose(compiled(batch), model(batch), atol=1e-5, rtol=0)
