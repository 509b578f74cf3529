"""Every registered method on the frames of a video model: it runs, trains, is counted and described
as on images (the methods attached to the backbone before it is wrapped)."""

from __future__ import annotations

import functools

import pytest
import torch

import tieta
from tests.conftest import make_vit
from tests.registry_cases import attach
from tieta.methods import registry
from tieta.methods.params import freeze_backbone
from tieta.train.config import load_config
from tieta.video.model import VideoModel, frame_backbone

FRAMES = 2


def clips(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def video_model(name: str) -> VideoModel:
    return freeze_backbone(VideoModel(freeze_backbone(attach(name, make_vit("plain"))), FRAMES))


@functools.lru_cache(maxsize=None)
def plain_gmacs() -> float:
    return tieta.count_flops(VideoModel(make_vit("plain"), FRAMES), clips())["gmacs"]


@pytest.mark.parametrize("name", registry.names())
def test_every_method_runs_trains_and_is_counted_on_clips(name):
    model = video_model(name).eval()
    x = clips()
    with torch.no_grad():
        logits = model(x)
        alone = model(x[1:])
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1:], alone, rtol=1e-4, atol=1e-5)  # clips do not see each other
    method = registry.METHODS[name]
    if method.describe is not None:  # facts of the per-frame model (tokens per block...)
        assert isinstance(method.describe(frame_backbone(model)), dict)
    if method.epoch_update is not None:  # as training calls it, on the per-frame model
        settings = {"diffrate.rates": "vit_b_deit_8.7"} if name == "diffrate" else {}  # it needs rates named
        config = load_config(overrides={"method": name, **settings})
        assert isinstance(method.epoch_update(frame_backbone(model), config, 0, 2), dict)
    gmacs = tieta.count_flops(model, x)["gmacs"]
    if method.reduces_tokens:
        assert gmacs < plain_gmacs()
    model.train()
    model(x).logsumexp(dim=-1).mean().backward()
    # (the keys' gradient starts at zero: the query token starts at zero, as in DyT's code)
    assert model.head.pool.query.grad is not None and model.head.pool.v.weight.grad.abs().sum() > 0
    trained = [param for param in model.backbone.parameters() if param.requires_grad]  # none for ToMe, EViT...
    assert all(param.grad is not None for param in trained)
