"""Matched FLOPs: the knob value whose FLOPs ratio comes closest to a target, found by bisection."""

import pytest
import timm

from tieta.errors import TietaError
from tieta.measure.matched import flops_ratio, setting_for_flops
from tieta.methods import registry


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=32, depth=4, num_heads=2,
                             num_classes=10)


def test_every_token_reducer_but_diffrate_declares_a_knob():
    for name, method in registry.methods().items():
        if method.reduces_tokens and name != "diffrate":
            assert method.knob is not None and method.knob.cheaper in ("low", "high"), name


def test_the_ratio_moves_monotonically_with_the_knob(vit):
    ratios = [flops_ratio("evit", vit, 64, keep) for keep in (0.5, 0.75, 1.0)]
    assert ratios[0] < ratios[1] < ratios[2] == pytest.approx(1.0)


def test_a_middle_ratio_is_reached_within_the_knobs_resolution(vit):
    keep, reached = setting_for_flops("evit", vit, 64, 0.8)
    assert reached == pytest.approx(0.8, abs=0.01)
    assert flops_ratio("evit", vit, 64, keep) == pytest.approx(reached)
    r, reached = setting_for_flops("dtem", vit, 64, 0.8)  # whole tokens: the nearest count
    assert isinstance(r, int)
    neighbours = [flops_ratio("dtem", vit, 64, other) for other in (r - 1, r + 1) if other >= 0]
    assert all(abs(reached - 0.8) <= abs(other - 0.8) for other in neighbours)


def test_tome_s_knob_is_a_decreasing_schedule_that_reaches_the_ratio(vit):
    schedule, reached = setting_for_flops("tome", vit, 64, 0.8)
    assert schedule["inflection"] == -0.9 and reached == pytest.approx(0.8, abs=0.02)


def test_an_unreachable_ratio_is_one_sentence_with_the_nearest(vit):
    with pytest.raises(TietaError, match=r"fpet cannot reach a FLOPs ratio of 0.29 .*its nearest is"):
        setting_for_flops("fpet", vit, 64, 0.29)
    with pytest.raises(TietaError, match="declares no knob"):
        setting_for_flops("diffrate", vit, 64, 0.5)
