import pytest
import timm
import torch

import tieta
from tieta import TietaError
from tieta.methods.schedules import (PAPER_SCHEDULES, VIT_B16, FlopsTarget, flops_ratio, linear_schedule,
                                     model_macs, resolve_schedule, schedule, schedule_setting, token_counts,
                                     vit_shape)
from tieta.train.config import load_config
from tests.conftest import make_vit


def _meta(name, **kwargs):
    """A full-size timm ViT on the meta device: shapes without memory or time."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name,low,high", [
    ("vit_base_patch16_224", [16] * 11 + [10], [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]),
    ("deit_base_distilled_patch16_224", [16] * 6 + [10] * 6, [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]),
    ("vit_large_patch16_224", [8] * 23 + [6], PAPER_SCHEDULES[(24, 1024, 196, 1)]["high"]),
])
def test_named_schedules_are_the_papers(name, low, high):
    model = _meta(name)
    assert resolve_schedule(model, "low") == low and resolve_schedule(model, "high") == high


def test_named_schedules_elsewhere_reach_vit_b_flops_ratios():
    low_ratio = flops_ratio(VIT_B16, PAPER_SCHEDULES[(12, 768, 196, 1)]["low"])
    high_ratio = flops_ratio(VIT_B16, PAPER_SCHEDULES[(12, 768, 196, 1)]["high"])
    assert low_ratio == pytest.approx(0.50, abs=0.01) and high_ratio == pytest.approx(0.29, abs=0.01)
    for name, kwargs in [("vit_small_patch16_224", {}), ("vit_small_patch14_dinov2", {"img_size": 112}),
                         ("vit_base_patch16_224", {"depth": 8})]:
        model = _meta(name, **kwargs)
        shape = vit_shape(model)
        for schedule_name, target in (("low", low_ratio), ("high", high_ratio)):
            r = resolve_schedule(model, schedule_name)
            assert len(r) == shape.depth
            assert flops_ratio(shape, r) == pytest.approx(target, abs=0.02), (name, schedule_name, r)
    low = resolve_schedule(_meta("vit_small_patch16_224"), "low")
    assert max(low) - min(low) <= 6  # constant like the paper's low


def test_schedule_verb_hits_any_target():
    model = _meta("vit_small_patch16_224")
    for target in (0.9, 0.7, 0.5, 0.35):
        r = tieta.schedule(model, target_flops=target)
        assert flops_ratio(vit_shape(model), r) == pytest.approx(target, abs=0.01)
    with pytest.raises(TietaError, match="ratio"):
        tieta.schedule(model, target_flops=1.5)


def test_analytic_cost_matches_counted_flops(vit_variant):
    model = tieta.add_tome(make_vit(vit_variant), r=[3, 2, 1])
    counted = tieta.count_flops(model, torch.randn(1, 3, 32, 32))["gmacs"] * 1e9
    assert round(counted) == model_macs(vit_shape(model), [3, 2, 1])


def test_pyra_table_1_complexity():
    """PYRA Table 1 (2^30 units): ViT-B/16 16.37G -> 8.15G, ViT-L/16 57.37G -> 28.76G, within 1%."""
    for name, full, low in (("vit_base_patch16_224", 16.37, 8.15), ("vit_large_patch16_224", 57.37, 28.76)):
        shape = vit_shape(_meta(name))
        r = resolve_schedule(_meta(name), "low")
        assert model_macs(shape, [0] * shape.depth) / 2**30 == pytest.approx(full, rel=0.01)
        assert model_macs(shape, r) / 2**30 == pytest.approx(low, rel=0.01)
    assert model_macs(vit_shape(_meta("vit_base_patch16_224")), [0] * 12) / 1e9 == pytest.approx(17.58, rel=0.01)


def test_forms_of_schedule():
    model = make_vit("plain")  # 17 tokens, 3 blocks
    assert resolve_schedule(model, 2) == [2, 2, 2]
    assert resolve_schedule(model, [3]) == [3, 0, 0]
    assert resolve_schedule(model, (2, -1.0)) == linear_schedule(3, 2, -1.0) == [4, 2, 0]
    assert token_counts(vit_shape(model), [3, 2, 1]) == [17, 14, 12, 11]


def test_a_flops_target_is_the_clipped_schedule_that_reaches_it_on_the_model():
    """{flops, inflection} is resolved on the model it goes on, capped per block: ViT-S/16 reaches
    0.29 (the "high" cost) that an {r, inflection} form cannot give without asking some block for
    more merges than its tokens allow."""
    model = _meta("vit_small_patch16_224")
    r = resolve_schedule(model, {"flops": 0.29, "inflection": -0.9})
    assert r == schedule(model, 0.29, -0.9)
    assert flops_ratio(vit_shape(model), r) == pytest.approx(0.29, abs=0.005)
    assert resolve_schedule(model, {"flops": 0.5}) == schedule(model, 0.5, 0.0)  # constant by default
    with pytest.raises(TietaError, match="at most"):
        resolve_schedule(model, {"r": 40, "inflection": -0.9})
    small = _meta("vit_small_patch14_dinov2", img_size=112)  # one setting, the same cost elsewhere
    assert flops_ratio(vit_shape(small), resolve_schedule(small, FlopsTarget(0.29, -0.9))) == pytest.approx(0.29, abs=0.01)


def test_a_flops_target_from_the_config_and_the_verb():
    merge = load_config(overrides={"merge.schedule": {"flops": 0.4}}).merge
    assert schedule_setting(merge) == FlopsTarget(0.4, 0.0)
    model = tieta.add_tome(make_vit("plain"), r={"flops": 0.6, "inflection": -0.5})
    assert tieta.count_flops(model, torch.randn(1, 3, 32, 32))["gmacs"] > 0


@pytest.mark.parametrize("r,message", [
    ({"flops": 0}, r"flops is the FLOPs ratio to reach, in \(0, 1\]"), ({"flops": 1.5}, r"in \(0, 1\]"),
    ({"flops": "half"}, "flops is the FLOPs ratio"), ({"flops": 0.5, "inflection": 2}, r"inflection is a number in \[-1, 1\]"),
    ({"flops": 0.5, "r": 4}, "or flops and an optional inflection"),
])
def test_a_bad_flops_target_is_one_sentence(r, message):
    with pytest.raises(TietaError, match=message):
        tieta.add_tome(make_vit("plain"), r=r)


@pytest.mark.parametrize("r,message", [
    (9, "at most 8"), ([8, 5], "block 1 asks to merge 5 tokens but at most 4"),
    ([1, 1, 1, 1], "4 entries"), ("medium", "unknown schedule"), ([1.5], "whole numbers"),
])
def test_impossible_schedules_name_the_limit(r, message):
    with pytest.raises(TietaError, match=message):
        tieta.add_tome(make_vit("plain"), r=r)


def test_not_a_vit():
    with pytest.raises(TietaError, match="VisionTransformer"):
        tieta.add_pyra(timm.create_model("resnet18"))
